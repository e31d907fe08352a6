"""Bounded sweeps (issue 12): results streamed into the .npz chunk by chunk, the output size
refused up front, nothing left behind on failure, and --top-k at a named end of the grid.

Everything runs on the session's reference UFM (V=9, G=3, 12 contexts); the transformer
probes' estimate on a small affine closure.
"""

import time
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.cli import main
from ufmjax.kernel import parse_grid, sweep
from ufmjax.runs import load_sweep, save_sweep, steer, sweepfile, ufm_sweep
from ufmjax.runs.steer import Steering, add_probes, add_text_ce, probe_size, sweep_grid
from ufmjax.runs.sweepfile import SweepFile, config_size, parse_size
from ufmjax.steering import linear_steered

GRID = np.linspace(-20, 20, 41)  # symmetric, as the README's examples
CHUNK = 8  # one compiled chunk shared by most tests here (41 alphas: 6 chunks, the last one short)


def concept_tokens(run, g):
    return np.flatnonzero(run.data.concept_of == g)


# ---------------------------------------------------------------- the streamed file

@pytest.mark.parametrize("compress", [True, False])
def test_a_streamed_file_holds_what_save_sweep_writes(reference_run, tmp_path, monkeypatch, compress):
    """Chunk by chunk, with whole arrays spilled to disk too (a spill threshold of 64 bytes),
    the file loads as the in-memory sweep saved by folders.save_sweep: the same arrays, dtypes
    and meta; deflated (as save_sweep) or stored (--no-compress)."""
    monkeypatch.setattr(sweepfile, "SPILL_BYTES", 64)
    kw = dict(target=1, chunk_size=CHUNK)
    arrays, meta = ufm_sweep(reference_run, GRID, **kw)
    save_sweep(tmp_path / "old.npz", arrays, meta)
    with SweepFile(tmp_path / "new.npz", compress=compress) as sink:
        streamed, meta2 = ufm_sweep(reference_run, GRID, sink=sink, **kw)
        assert streamed is sink and set(streamed) == set(arrays)
        np.testing.assert_array_equal(streamed["delta_p"], arrays["delta_p"])  # read back before the commit
        sink.commit(meta2)
    old, old_meta = load_sweep(tmp_path / "old.npz")
    new, new_meta = load_sweep(tmp_path / "new.npz")
    assert list(new) == list(old)  # the same members, in the same order
    for key in old:
        assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape, key
        np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    assert new_meta == old_meta and new_meta["top_k_at"] == "max"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npz", "old.npz"]  # no temporary left
    with zipfile.ZipFile(tmp_path / "new.npz") as zf:
        kinds = {i.compress_type for i in zf.infolist()}
    assert kinds == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}


def test_a_failed_or_interrupted_sweep_leaves_nothing(reference_run, tmp_path):
    """An error or Ctrl-C inside the block: no file, no temporary folder, no folder created for
    it; a file already at the target is left as it was, also when the commit itself fails."""
    for exc in (RuntimeError, KeyboardInterrupt):
        out = tmp_path / "new" / "deep" / "s.npz"
        with pytest.raises(exc):
            with SweepFile(out) as sink:
                assert sink.parts.is_dir() and sink.parts.parent == out.parent
                ufm_sweep(reference_run, GRID, target=0, chunk_size=CHUNK, sink=sink)
                raise exc()
        assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept.npz"
    kept.write_bytes(b"the user's own bytes")
    with pytest.raises(RuntimeError, match="3 of 5 rows were written"):
        with SweepFile(kept) as sink:
            sink.allocate("half", (5, 2), np.float32)[0:3] = np.ones((3, 2))
            sink.commit({})
    assert kept.read_bytes() == b"the user's own bytes" and list(tmp_path.iterdir()) == [kept]


def test_ctrl_c_in_the_middle_of_a_cli_sweep(reference_run, tmp_path, monkeypatch, capsys):
    """Interrupted after its second chunk, `ufmjax sweep` exits 130 and writes nothing."""

    class Interrupting:
        def __init__(self, total, desc="", enabled=True):
            self.calls = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1, **info):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(steer, "Progress", Interrupting)
    out = tmp_path / "s.npz"
    assert main(["sweep", str(reference_run.path), "--target", "0", "--alphas", "-20:20:41", "--chunk-size",
                 str(CHUNK), "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, match", [("file/s.npz", "is a file, not a folder"),
                                         ("dir.npz", "is an existing folder"),
                                         ("/proc/s.npz", "cannot be written"), ("x" * 240 + ".npz", "is longer than")])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(reference_run, tmp_path, capsys, where, match):
    """Today a /proc output fails after the whole sweep, naming a temporary file."""
    if where.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    (tmp_path / "file").write_text("a plain file")
    (tmp_path / "dir.npz").mkdir()
    out = tmp_path / where
    with pytest.raises(ValueError, match=match):
        SweepFile(out)
    t0 = time.perf_counter()
    assert main(["sweep", str(reference_run.path), "--target", "0", "--quiet", "--out", str(out)]) == 2
    assert time.perf_counter() - t0 < 1.0  # refused before the run's checkpoint is read
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.npz", "file"]


def test_sweeps_report_progress_over_their_grid(reference_run, monkeypatch):
    """A bar over the grid's alphas, told each chunk (41 alphas in chunks of 8), on when asked."""
    bars = []

    class Recording:
        def __init__(self, total, desc="", enabled=True):
            self.total, self.desc, self.enabled, self.told = total, desc, enabled, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1, **info):
            self.told.append(n)

    monkeypatch.setattr(steer, "Progress", Recording)
    for progress in (True, False):
        ufm_sweep(reference_run, GRID, target=0, chunk_size=CHUNK, progress=progress)
        bar = bars.pop()
        assert (bar.total, bar.enabled, bar.desc) == (41, progress, "sweep ufm")
        assert bar.told == [8, 8, 8, 8, 8, 1]


# ---------------------------------------------------------------- the output size

def test_1e8_alphas_are_refused_at_once_with_the_estimate(reference_run, tmp_path, capsys):
    """Today a MemoryError traceback after minutes; now one line, well under a second."""
    out = tmp_path / "s.npz"
    t0 = time.perf_counter()
    rc = main(["sweep", str(reference_run.path), "--target", "0", "--alphas", "0:1:100000000", "--out", str(out)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and seconds < 1.0, (rc, seconds, err)
    # 2612 bytes per alpha (see test_the_estimate_is_the_bytes_written): 261 GB, 243 GiB.
    assert "--max-output" in err and "100,000,000 alphas" in err and "243 GiB" in err and "4 GiB" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("top_k, top_k_at, derivatives, dtype", [
    (None, "max", 2, jnp.float32), (3, "both", 0, jnp.float32)])
def test_the_estimate_is_the_bytes_written(reference_run, tmp_path, top_k, top_k_at, derivatives, dtype):
    """Exact for the UFM's arrays when the tracked tokens are known (an upper bound for "both",
    which tracks 2k tokens at most); the config-only estimate (used before the checkpoint is
    read) bounds it within 1%; the compressed file is smaller than either."""
    st = reference_run.steer(0, dtype=dtype)
    with SweepFile(tmp_path / "s.npz") as sink:
        arrays, meta = ufm_sweep(reference_run, GRID, target=0, top_k=top_k, top_k_at=top_k_at,
                                 derivatives=derivatives, dtype=dtype, sink=sink, chunk_size=CHUNK)
        sink.commit(meta)
    written, _ = load_sweep(tmp_path / "s.npz")
    actual = sum(a.nbytes for a in written.values())
    size = st.output_size(top_k=top_k, top_k_at=top_k_at, derivatives=derivatives)
    estimate = size.total(GRID.size)
    from_config = config_size(reference_run.config, top_k=top_k, top_k_at=top_k_at, derivatives=derivatives,
                              dtype=dtype).total(GRID.size)
    if top_k_at == "both":
        assert actual <= estimate <= 1.5 * actual
    else:
        assert estimate == actual
    assert estimate <= from_config <= 1.01 * estimate
    assert (tmp_path / "s.npz").stat().st_size < actual
    # Per alpha: 7 quantities x 3 orders x (12 x 9 + 2 x 12 x 3 + 1 + 3 x 12) float32s and the
    # float64 alpha; a million alphas of this run, 2.6 GB.
    assert st.output_size().per_alpha == 4 * 3 * (108 + 72 + 1 + 36) + 8 == 2612


def test_the_probe_estimate_bounds_what_the_probes_add():
    """What gpt_sweep and hf_sweep add beside the kernel (Prop. 4.1 limits, the local UFM, the
    text CE) is estimated by probe_size between the bytes added and 1.5 times that, on 9 and
    45 alphas; the kernel's part and the steering's arrays exactly (a small affine closure
    stands in for a transformer: the probes' sizes depend on shapes only). The text CE, reduced
    over its rows chunk by chunk, equals the same means of the whole sweep."""
    steered = linear_steered(np.zeros((3, 5)), np.arange(5.0) - 2.0)
    st = Steering(steered, concept_of=np.array([0, 0, 1, 1, 1]), ce_target=None, weights=None, P=np.arange(2),
                  N=np.arange(2, 4), vector=np.ones(4, np.float32), target=1, dtype=jnp.dtype(jnp.float32),
                  arrays={"prompts": np.zeros((3, 4), np.int64)})
    for num in (9, 45):
        alphas = np.linspace(-4, 4, num)
        _, arrays = sweep_grid(st, alphas, derivatives=0, chunk_size=9)
        kernel = sum(a.nbytes for a in arrays.values())
        assert st.output_size(derivatives=0).total(num) == kernel
        add_probes(arrays, {}, st, alphas, 9, np.zeros((2, 5), np.float32), local_ufm=True)
        add_text_ce(arrays, {}, st, steered, np.zeros(3, np.int64), alphas, 0, 9)
        added = sum(np.asarray(a).nbytes for a in arrays.values()) - kernel
        estimate = probe_size(st, limits=True, local_ufm=True, text_ce_derivatives=0).total(num)
        assert added <= estimate <= 1.5 * added, (num, added, estimate)
    # The text CE keeps row means chunk by chunk: the same curves as from the whole sweep.
    full = sweep(steered, alphas, concept_of=st.concept_of, ce_target=np.zeros(3, np.int64), tokens=[0],
                 derivatives=0, chunk_size=9)
    np.testing.assert_array_equal(arrays["text_delta_ce"], full["delta_ce"])
    np.testing.assert_array_equal(arrays["text_kl"], full["kl"].mean(axis=1))
    np.testing.assert_array_equal(arrays["text_concept_prob"], full["concept_prob"][:, :, 1].mean(axis=1))


@pytest.mark.parametrize("text, size", [("8GiB", 8 << 30), ("500MB", 500 * 10**6), ("1000000", 10**6),
                                        ("1.5 GiB", 3 << 29), ("2kib", 2048), ("4G", 4 * 10**9)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "5XB", "0", "1e400", "0.5"])
def test_bad_sizes_name_max_output(reference_run, tmp_path, capsys, text):
    with pytest.raises(ValueError, match="--max-output"):
        parse_size(text)
    assert main(["sweep", str(reference_run.path), "--target", "0", f"--max-output={text}", "--quiet",
                 "--out", str(tmp_path / "s.npz")]) == 2
    assert "--max-output" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_max_output_is_the_limit(reference_run, tmp_path, capsys):
    """41 alphas of the reference run take 106 KiB: refused under 100KB, written under 1MB;
    the API refuses the same (and takes max_output=None for no limit)."""
    argv = ["sweep", str(reference_run.path), "--target", "0", "--alphas", "-20:20:41", "--quiet",
            "--chunk-size", str(CHUNK)]
    assert main(argv + ["--max-output", "100KB", "--out", str(tmp_path / "a.npz")]) == 2
    assert "over the limit of 97.7 KiB" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    assert main(argv + ["--max-output", "1MB", "--out", str(tmp_path / "a.npz")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "a.npz").is_file()
    with pytest.raises(ValueError, match="over the limit of 1000 B"):
        ufm_sweep(reference_run, parse_grid("-20:20:41"), target=0, max_output=1000)
    arrays, _ = ufm_sweep(reference_run, parse_grid("-20:20:41"), target=0, max_output=None, chunk_size=CHUNK)
    np.testing.assert_array_equal(arrays["alphas"], GRID)


# ---------------------------------------------------------------- --top-k at a named end

def test_top_k_takes_the_target_end_of_a_symmetric_grid(reference_run, tmp_path, capsys):
    """The README's `--target 2 --top-k 3` on -20:20: today the tokens at -20 (none of concept
    2); now those at +20, concept 2's own. min takes the other end, both the union."""
    st = reference_run.steer(2)
    target = concept_tokens(reference_run, 2)
    np.testing.assert_array_equal(st.top_tokens(GRID, 3), target)
    low = st.top_tokens(GRID, 3, "min")
    assert np.intersect1d(low, target).size == 0
    np.testing.assert_array_equal(st.top_tokens(GRID, 3, "both"), np.union1d(low, target))
    out = tmp_path / "random.npz"
    assert main(["sweep", str(reference_run.path), "--target", "2", "--negatives", "random", "--seed", "3",
                 "--top-k", "3", "--quiet", "--out", str(out)]) == 0
    arrays, meta = load_sweep(out)
    np.testing.assert_array_equal(arrays["tokens"], target)
    assert meta["top_k"] == 3 and meta["top_k_at"] == "max"
    assert arrays["delta_p"][-1].mean(axis=0).min() > 0  # every tracked token rises toward +20
    assert "Traceback" not in capsys.readouterr().err


def test_run_sweeps_take_increasing_grids_only(reference_run):
    """The kernel evaluates points in any order, but a sweep file's grid increases (the CLI's
    START:STOP:NUM always does): a reversed or shuffled grid is refused, not half-honoured."""
    for grid in (GRID[::-1], np.array([0.0, 2.0, 1.0])):
        with pytest.raises(ValueError, match="alphas must be a strictly increasing grid"):
            ufm_sweep(reference_run, grid, target=0)
        with pytest.raises(ValueError, match="strictly increasing"):
            reference_run.steer(0).sweep(grid)


def test_a_sweep_the_disk_cannot_hold_is_refused_before_any_work(reference_run, tmp_path, capsys, monkeypatch):
    """A 243 GiB request with --max-output raised once filled the disk for minutes, then said
    'No space left on device' naming no file."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))  # 1 MiB free
    out = tmp_path / "s.npz"
    assert main(["sweep", str(reference_run.path), "--target", "0", "--alphas", "0:1:10000", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "free" in err and len(err.splitlines()) == 1 and not out.exists()
