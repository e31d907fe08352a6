"""The safetensors reader: bit-exact round trips of every dtype, agreement with the official
reader both ways, sharded folders, and a one-line CheckpointError naming file and tensor for
every way a download can be broken."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from ufmjax.models.hf.checkpoint import (INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError,
                                         write_safetensors)

BF16 = np.dtype(ml_dtypes.bfloat16)


def every_dtype(rng) -> dict[str, np.ndarray]:
    """One tensor per safetensors dtype the reader knows, with random bits, odd shapes."""
    floats = rng.standard_normal((3, 5)) * 100
    return {
        "f64": floats.astype(np.float64),
        "f32": floats.astype(np.float32),
        "f16": floats.astype(np.float16),
        "bf16": floats.astype(BF16),
        "f8e4m3": (floats / 100).astype(ml_dtypes.float8_e4m3fn),
        "i64": rng.integers(-2**62, 2**62, (4,), dtype=np.int64),
        "i32": rng.integers(-2**31, 2**31 - 1, (2, 2, 2), dtype=np.int32),
        "i16": rng.integers(-2**15, 2**15 - 1, (7,), dtype=np.int16),
        "i8": rng.integers(-128, 127, (1, 9), dtype=np.int8),
        "u8": rng.integers(0, 255, (6,), dtype=np.uint8),
        "bool": rng.integers(0, 2, (3, 1)).astype(bool),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, so float comparisons see NaN payloads and -0 too."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def raw_file(path, header, data: bytes = b"", length: int | None = None):
    """A safetensors file written byte by byte: header as dict or raw bytes, optional length lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def write_sharded(folder, shards: dict[str, dict[str, np.ndarray]], extra_map=None):
    """Shard files plus the index naming them, as transformers writes a large checkpoint."""
    weight_map = {}
    for shard_name, tensors in shards.items():
        write_safetensors(folder / shard_name, tensors, metadata={"shard": shard_name})
        weight_map.update({name: shard_name for name in tensors})
    weight_map.update(extra_map or {})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_round_trip_every_dtype(tmp_path, rng):
    tensors = every_dtype(rng)
    write_safetensors(tmp_path / SINGLE_FILE, tensors, metadata={"format": "np"})
    with Checkpoint(tmp_path) as ck:
        assert ck.names() == sorted(tensors)
        assert ck.metadata() == {"format": "np"}
        assert ck.nbytes == sum(a.nbytes for a in tensors.values())
        assert ck.dtypes() == {a.dtype for a in tensors.values()}
        for name, a in tensors.items():
            assert name in ck and ck.shape(name) == a.shape and ck.dtype(name) == a.dtype
            assert ck.file_of(name) == tmp_path / SINGLE_FILE
            got = ck.read(name)
            assert got.dtype == a.dtype and got.shape == a.shape
            assert got.flags.writeable and got.flags.c_contiguous
            assert got.size == 0 or got.ctypes.data % 64 == 0  # so jax.device_put on CPU adopts it
            np.testing.assert_array_equal(bits(got), bits(a))
        assert "missing" not in ck


def test_conversions(tmp_path, rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    write_safetensors(tmp_path / SINGLE_FILE, {"bf": x.astype(BF16), "f": x, "i": np.arange(3)})
    ck = Checkpoint(tmp_path)
    np.testing.assert_array_equal(ck.read("bf", dtype=np.float32), x.astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(ck.read("f", dtype=ml_dtypes.bfloat16).view(np.uint16),
                                  x.astype(BF16).view(np.uint16))
    assert ck.read("f", dtype="float64").dtype == np.float64
    assert ck.read("i", dtype=np.float32).tolist() == [0.0, 1.0, 2.0]
    assert "float32 to int32" in error_of(ck.read, "f", dtype=np.int32)
    # the returned copy is the caller's: writing to it does not touch the file or a later read
    a = ck.read("f")
    a[:] = 0
    np.testing.assert_array_equal(ck.read("f"), x)
    assert ck.read_into("f", lambda arr: float(arr.sum())) == pytest.approx(float(x.sum()), rel=1e-6)


def test_agrees_with_official_reader(tmp_path, rng):
    from safetensors.numpy import load_file, save_file

    tensors = {"a.weight": rng.standard_normal((5, 7)).astype(np.float32),
               "b.bias": rng.standard_normal((11,)).astype(np.float16),
               "c": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    (tmp_path / "theirs").mkdir()
    save_file(tensors, str(tmp_path / "theirs" / SINGLE_FILE), metadata={"format": "pt"})
    with Checkpoint(tmp_path / "theirs") as ck:
        assert ck.metadata() == {"format": "pt"}
        for name, a in tensors.items():
            np.testing.assert_array_equal(bits(ck.read(name)), bits(a))

    ours = write_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"k": "v"})
    loaded = load_file(str(ours))
    assert sorted(loaded) == sorted(tensors)
    for name, a in tensors.items():
        assert loaded[name].dtype == a.dtype
        np.testing.assert_array_equal(bits(loaded[name]), bits(a))


def test_torch_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensor = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": tensor, "ids": torch.arange(4)}, str(tmp_path / SINGLE_FILE))
    with Checkpoint(tmp_path) as ck:
        assert ck.dtype("w") == BF16
        np.testing.assert_array_equal(ck.read("w", dtype=np.float32), tensor.float().numpy())
        np.testing.assert_array_equal(ck.read("ids"), np.arange(4))


def test_sharded_round_trip(tmp_path, rng):
    shards = {"model-00001-of-00002.safetensors": {"embed": rng.standard_normal((4, 2)).astype(BF16),
                                                   "layer.0": rng.standard_normal(3).astype(np.float32)},
              "model-00002-of-00002.safetensors": {"layer.1": rng.standard_normal(3).astype(np.float32),
                                                   "head": rng.standard_normal((2, 4)).astype(np.float16)}}
    write_sharded(tmp_path, shards)
    with Checkpoint(tmp_path) as ck:
        assert ck.source == tmp_path / INDEX_FILE
        assert ck.names() == ["embed", "head", "layer.0", "layer.1"]
        assert ck.metadata() == {"shard": "model-00002-of-00002.safetensors"}  # merged, later wins
        for shard_name, tensors in shards.items():
            for name, a in tensors.items():
                assert ck.file_of(name) == tmp_path / shard_name
                np.testing.assert_array_equal(bits(ck.read(name)), bits(a))
        assert ck.dtypes() == {BF16, np.dtype(np.float32), np.dtype(np.float16)}


def test_without_madvise_maps_afresh(tmp_path, rng, monkeypatch):
    from ufmjax.models.hf import checkpoint as mod

    monkeypatch.setattr(mod, "_HAS_MADVISE", False)
    tensors = {"a": rng.standard_normal(3000).astype(np.float32), "b": np.arange(5)}
    write_safetensors(tmp_path / SINGLE_FILE, tensors)
    with Checkpoint(tmp_path) as ck:
        for _ in range(2):
            for name, a in tensors.items():
                np.testing.assert_array_equal(ck.read(name), a)
        assert ck._maps == {}


def test_closed(tmp_path):
    write_safetensors(tmp_path / SINGLE_FILE, {"a": np.ones(3, np.float32)})
    with Checkpoint(tmp_path) as ck:
        a = ck.read("a")
    np.testing.assert_array_equal(a, 1.0)  # the copy is nothing of the (now closed) map
    assert ck.shape("a") == (3,)  # headers stay
    assert "closed" in error_of(ck.read, "a")


# --- every broken download gives one line naming the file and the tensor ---

def test_folder_errors(tmp_path):
    assert "does not exist" in error_of(Checkpoint, tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in error_of(Checkpoint, tmp_path / "file")
    message = error_of(Checkpoint, tmp_path)
    assert f"no {SINGLE_FILE} or {INDEX_FILE} in {tmp_path}" in message


def test_truncated(tmp_path, rng):
    path = write_safetensors(tmp_path / SINGLE_FILE, {"a": rng.standard_normal(100).astype(np.float32),
                                                      "z.last": rng.standard_normal(100).astype(np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    message = error_of(Checkpoint, tmp_path)
    assert "truncated" in message and SINGLE_FILE in message and "'z.last'" in message
    path.write_bytes(data[:5])
    assert "truncated" in error_of(Checkpoint, tmp_path)


def test_header_errors(tmp_path):
    path = tmp_path / SINGLE_FILE
    raw_file(path, b"{not json at all", b"")
    message = error_of(Checkpoint, tmp_path)
    assert "not JSON" in message and SINGLE_FILE in message

    raw_file(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), length=10**6)
    assert "header length 1000000 is larger than the file" in error_of(Checkpoint, tmp_path)

    path.write_bytes(bytes(range(40)))  # garbage from the first byte
    assert SINGLE_FILE in error_of(Checkpoint, tmp_path)

    raw_file(path, {"w": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    message = error_of(Checkpoint, tmp_path)
    assert "unknown dtype 'F31'" in message and "'w'" in message and SINGLE_FILE in message

    raw_file(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(12))
    message = error_of(Checkpoint, tmp_path)
    assert "hold 8 bytes" in message and "needs 12" in message and "'w'" in message

    raw_file(path, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8))
    assert "'w'" in error_of(Checkpoint, tmp_path)
    raw_file(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8))
    assert "'w'" in error_of(Checkpoint, tmp_path)
    raw_file(path, [1, 2], b"")
    assert "not an object" in error_of(Checkpoint, tmp_path)


def test_index_errors(tmp_path, rng):
    a = rng.standard_normal(3).astype(np.float32)
    index = tmp_path / INDEX_FILE
    index.write_text("{weight_map: oops")
    message = error_of(Checkpoint, tmp_path)
    assert "not valid JSON" in message and INDEX_FILE in message
    index.write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in error_of(Checkpoint, tmp_path)

    write_sharded(tmp_path, {"s1.safetensors": {"a": a}}, extra_map={"b.gone": "s2.safetensors"})
    message = error_of(Checkpoint, tmp_path)
    assert "s2.safetensors" in message and "missing" in message and "'b.gone'" in message

    write_sharded(tmp_path, {"s1.safetensors": {"a": a}}, extra_map={"b.absent": "s1.safetensors"})
    message = error_of(Checkpoint, tmp_path)
    assert "s1.safetensors" in message and "'b.absent'" in message and "not in this shard" in message

    write_sharded(tmp_path, {"s1.safetensors": {"a": a}}, extra_map={"b": "../s1.safetensors"})
    assert "outside" in error_of(Checkpoint, tmp_path)

    # a truncated shard is reported when the folder is opened
    write_sharded(tmp_path, {"s1.safetensors": {"a": a}, "s2.safetensors": {"b": a}})
    shard = tmp_path / "s2.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    message = error_of(Checkpoint, tmp_path)
    assert "truncated" in message and "s2.safetensors" in message and "'b'" in message


def test_read_errors(tmp_path, rng):
    write_safetensors(tmp_path / SINGLE_FILE,
                      {f"model.layers.{i}.mlp.weight": rng.standard_normal((2, 3)).astype(np.float32)
                       for i in range(8)})
    ck = Checkpoint(tmp_path)
    message = error_of(ck.read, "model.layers.0.mlp.weight", shape=(3, 2))
    assert "'model.layers.0.mlp.weight'" in message and SINGLE_FILE in message
    assert "(2, 3)" in message and "expected (3, 2)" in message
    assert ck.read("model.layers.0.mlp.weight", shape=(2, 3)).shape == (2, 3)

    message = error_of(ck.read, "model.layer.1.mlp.weight")
    assert "'model.layer.1.mlp.weight'" in message and SINGLE_FILE in message and "no such tensor" in message
    close = message.split("close names: ")[1].split(", ")
    assert len(close) == 5 and "model.layers.1.mlp.weight" in close
    for method in (ck.shape, ck.dtype, ck.file_of):
        assert "no such tensor" in error_of(method, "nope")


def test_writer_refuses_what_it_cannot_write(tmp_path):
    assert "no safetensors code" in error_of(write_safetensors, tmp_path / "x.safetensors",
                                             {"c": np.ones(2, np.complex64)})
    assert "metadata" in error_of(write_safetensors, tmp_path / "x.safetensors", {}, metadata={"k": 1})
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind
    # big-endian and non-contiguous inputs are written as little-endian C order
    a = np.arange(12, dtype=">f4").reshape(3, 4).T
    write_safetensors(tmp_path / SINGLE_FILE, {"a": a})
    np.testing.assert_array_equal(Checkpoint(tmp_path).read("a"), a)
