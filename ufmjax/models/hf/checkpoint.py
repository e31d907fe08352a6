"""A memory-mapped reader (and a small writer) of Hugging Face safetensors checkpoints.

Written here rather than taken from `safetensors.numpy` because that API cannot return
bfloat16, the dtype most checkpoints ship in, and because loading a model should cost about
(checkpoint size + largest tensor) of resident memory, not twice the checkpoint: each tensor is
copied out of a read-only memory map and the kernel is then told (madvise MADV_DONTNEED) that
the mapped pages are no longer needed. Every header is parsed and checked when the checkpoint
is opened, so a truncated or inconsistent download is reported before any computation starts.

The format: an 8-byte little-endian u64 header length N, N bytes of JSON mapping tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the first byte after the
header) plus an optional "__metadata__" of strings, then the tensor bytes, little-endian, C order.

This module imports numpy and ml_dtypes only (no JAX, no torch), so it can be used by tools
that never build a model.
"""

from __future__ import annotations

import difflib
import json
import math
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype code -> numpy dtype (all little-endian; one byte ones have no order)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES: dict[np.dtype, str] = {dt: code for code, dt in DTYPES.items()}
# ml_dtypes floats have numpy kind "V", so "is it a float" is answered by this set, not by kind
_FLOATS = frozenset(DTYPES[c] for c in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))

_HEADER_LEN = 8
ALIGNMENT = 64  # bytes; what XLA's CPU client needs to adopt a host buffer without a copy
_MAX_HEADER = 100 << 20  # the official reader's limit: a larger "length" is garbage, not a header
_HAS_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the one-line message names file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file and absolute byte range [begin, end) in that file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _fail(file: Path | str, message: str, tensor: str | None = None) -> CheckpointError:
    """The error, on one line: `FILE: tensor 'NAME': message`."""
    where = f"{file}: tensor {tensor!r}: " if tensor is not None else f"{file}: "
    return CheckpointError(" ".join((where + message).split()))


def _is_count(x: Any) -> bool:
    """A JSON non-negative integer (bool is an int in Python, and not a count)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header: (tensors by name, __metadata__).

    Reads the header only, never the data, so opening a multi-gigabyte checkpoint is cheap.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(_HEADER_LEN)
            if len(head) < _HEADER_LEN:
                raise _fail(file, f"truncated: {size} bytes, less than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - _HEADER_LEN or n > _MAX_HEADER:
                raise _fail(file, f"header length {n} is larger than the file ({size} bytes): "
                                  "truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise _fail(file, f"cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(file, f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise _fail(file, f"header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(file, "__metadata__ is not a JSON object")
    data_start = _HEADER_LEN + n
    data_size = size - data_start
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(file, name, entry, data_start, data_size)
    return tensors, {str(k): v for k, v in metadata.items()}


def _tensor_info(file: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    """One header entry checked: known dtype, a shape, offsets inside the file and of the right
    length."""
    if not isinstance(entry, dict):
        raise _fail(file, "header entry is not a JSON object", name)
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in DTYPES:
        raise _fail(file, f"unknown dtype {code!r} (known: {', '.join(DTYPES)})", name)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(file, f"shape {shape!r} is not a list of non-negative integers", name)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise _fail(file, f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end", name)
    begin, end = offsets
    if end > data_size:
        raise _fail(file, f"data_offsets [{begin}, {end}] run past the end of the data "
                          f"({data_size} bytes): the file is truncated", name)
    dtype = DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _fail(file, f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but {code} "
                          f"shape {tuple(shape)} needs {expected}", name)
    return TensorInfo(name, dtype, tuple(shape), file, data_start + begin, data_start + end)


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder, read one at a time from memory maps.

    `Checkpoint(folder)` opens `model.safetensors`, or else the shards that
    `model.safetensors.index.json` names in its "weight_map". All headers are checked here;
    tensor data is touched only by `read`. Use as a context manager, or call `close()`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise _fail(self.folder, "checkpoint folder does not exist")
        if not self.folder.is_dir():
            raise _fail(self.folder, "checkpoint path is not a directory")
        self._tensors: dict[str, TensorInfo] = {}
        self._metadata: dict[str, str] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._closed = False
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        if single.is_file():
            self.source = single
            self._tensors, self._metadata = read_header(single)
        elif index.is_file():
            self.source = index
            self._open_index(index)
        else:
            raise _fail(self.folder, f"no {SINGLE_FILE} or {INDEX_FILE} in {self.folder}")

    @classmethod
    def from_file(cls, file: str | os.PathLike) -> Checkpoint:
        """One safetensors file on its own (e.g. a saved steering vector), not a model folder."""
        file = Path(file)
        if not file.is_file():
            raise _fail(file, "no such file")
        self = cls.__new__(cls)
        self.folder, self.source = file.parent, file
        self._maps, self._closed = {}, False
        self._tensors, self._metadata = read_header(file)
        return self

    def _open_index(self, index: Path) -> None:
        """Every shard the index names, checked against its weight_map."""
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(index, f"index is not valid JSON ({e})") from e
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise _fail(index, "index has no \"weight_map\" object of tensor name -> shard file")
        shards: dict[str, tuple[dict[str, TensorInfo], Path]] = {}
        for name, shard_name in sorted(weight_map.items()):
            if shard_name not in shards:
                shard = self.folder / shard_name
                if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts:
                    raise _fail(index, f"shard {shard_name!r} is outside the checkpoint folder", name)
                if not shard.is_file():
                    raise _fail(index, f"shard file {shard} named by the index is missing", name)
                tensors, metadata = read_header(shard)
                shards[shard_name] = (tensors, shard)
                self._metadata.update(metadata)
            tensors, shard = shards[shard_name]
            if name not in tensors:
                raise _fail(shard, f"listed in {index.name} but not in this shard's header", name)
            self._tensors[name] = tensors[name]

    # --- what is in the checkpoint (headers only) ---

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def info(self, name: str) -> TensorInfo:
        """Where `name` lies; an unknown name is an error listing close names."""
        try:
            return self._tensors[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._tensors, n=5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise _fail(self.source, f"no such tensor ({len(self._tensors)} tensors){hint}", name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self.info(name).dtype

    def file_of(self, name: str) -> Path:
        """The file (the shard, when sharded) holding `name`."""
        return self.info(name).file

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data across all files."""
        return sum(t.nbytes for t in self._tensors.values())

    def dtypes(self) -> set[np.dtype]:
        """The dtypes present: tells a caller whether bf16 (or anything else) must be handled."""
        return {t.dtype for t in self._tensors.values()}

    def metadata(self) -> dict[str, str]:
        """The __metadata__ of every file, merged (shards in name order)."""
        return dict(self._metadata)

    # --- tensor data ---

    def read(self, name: str, dtype: Any = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A fresh writable, C-contiguous copy of tensor `name`, as `dtype` when given.

        The copy lives in its own 64-byte aligned buffer (`aligned_empty`), nothing of the file
        map, so it outlives `close()`; the alignment lets jax.device_put on CPU adopt the buffer
        instead of copying it again.

        `shape`, when given, is the shape the caller's model expects: anything else is an error
        naming both, not a broadcast failure later. Only the pages of this tensor are mapped in,
        and they are released once copied.
        """
        t = self.info(name)
        if shape is not None and tuple(shape) != t.shape:
            raise _fail(t.file, f"shape {t.shape}, expected {tuple(shape)}", name)
        target = t.dtype if dtype is None else np.dtype(dtype)
        if target != t.dtype and not _converts(t.dtype, target):
            raise _fail(t.file, f"will not convert {t.dtype} to {target}", name)
        if self._closed:
            raise _fail(self.source, "checkpoint is closed", name)
        out = aligned_empty(t.shape, target)
        if t.nbytes == 0:
            return out
        mm = self._map(t.file)
        view = np.frombuffer(mm, dtype=t.dtype, count=t.nbytes // t.dtype.itemsize, offset=t.begin)
        try:
            np.copyto(out, view.reshape(t.shape), casting="unsafe")  # the conversion was vetted above
        finally:
            del view  # the map cannot be released or closed while a view of it exists
        self._release(t.file, mm, t.begin, t.end)
        return out

    def read_into(self, name: str, put: Callable[[np.ndarray], Any], dtype: Any = None,
                  shape: tuple[int, ...] | None = None) -> Any:
        """`put(copy)` for the tensor `name` (e.g. jax.device_put), the host copy dropped after,
        so a whole model moves to the device holding one host tensor at a time."""
        array = self.read(name, dtype=dtype, shape=shape)
        try:
            return put(array)
        finally:
            del array

    def _map(self, file: Path) -> mmap.mmap:
        """The read-only map of `file`, opened on first use and kept."""
        mm = self._maps.get(file)
        if mm is None:
            try:
                with open(file, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise _fail(file, f"cannot memory-map: {e}") from e
            self._maps[file] = mm
        return mm

    def _release(self, file: Path, mm: mmap.mmap, begin: int, end: int) -> None:
        """Drop the pages of [begin, end) from this process (they stay in the page cache), or,
        where madvise is missing, close the map so the next read maps the file afresh."""
        if _HAS_MADVISE:
            start = begin - begin % mmap.PAGESIZE
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
                return
            except (OSError, ValueError):
                pass
        self._maps.pop(file, None)
        mm.close()

    def close(self) -> None:
        """Unmap every file; headers stay readable, tensor data does not."""
        self._closed = True
        maps, self._maps = self._maps, {}
        for mm in maps.values():
            mm.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.folder)!r}, {len(self)} tensors, {self.nbytes / 2**20:.1f} MiB)"


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary.

    XLA's CPU client adopts (zero-copy) a host buffer so aligned, and copies any other one;
    numpy's own large allocations sit 16 bytes past a page. With the copy adopted, loading a
    model on CPU holds each tensor once; without, the freed host copies of tensors under
    glibc's 32 MiB mmap threshold stayed in the heap and the peak grew by 13-23% of the model.
    The array is a window of a private uint8 buffer (so `owndata` is False); it keeps that
    buffer alive, and nothing else refers to it.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _converts(source: np.dtype, target: np.dtype) -> bool:
    """Conversions `read` allows: any to a float, and between integers / bool; never a float
    silently truncated to an integer."""
    if target in _FLOATS or target.kind == "f":
        return True
    return source not in _FLOATS and target.kind in "iub"


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` as one safetensors file, atomically (a temp file beside it, then
    os.replace), so a reader never sees a half-written checkpoint. bfloat16 arrays
    (ml_dtypes) are written as BF16. Returns the path."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise _fail(path, "metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise _fail(path, "reserved tensor name", name)
        a = np.asarray(tensors[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = _CODES.get(a.dtype)
        if code is None:
            raise _fail(path, f"dtype {a.dtype} has no safetensors code", name)
        arrays[name] = np.ascontiguousarray(a)
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the official writer does

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is meant to be shared
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for a in arrays.values():
                if a.nbytes:
                    f.write(a.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
