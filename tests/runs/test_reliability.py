"""Failures provoked on purpose: killed writers, killed training, determinism, extreme alphas."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from ufmjax.runs import io
from ufmjax.cli import main

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def test_killed_writer_leaves_old_file_or_none(tmp_path):
    """SIGKILL a process in the middle of atomic .npz writes: the target is always whole."""
    target = tmp_path / "big.npz"
    script = (
        "import numpy as np, sys\n"
        "from ufmjax.runs.io import save_npz_atomic\n"
        "rng = np.random.default_rng(0)\n"
        "i = 0\n"
        "while True:\n"
        "    save_npz_atomic(sys.argv[1], {'x': rng.random(2_000_000), 'i': np.asarray(i)})\n"
        "    i += 1\n"
    )
    seen = 0
    for delay in (0.3, 0.8, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)], env=ENV)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            with np.load(target) as f:  # a truncated zip would raise here
                assert f["x"].shape == (2_000_000,)
                seen += 1
    assert seen >= 1, "the writer never finished one file; make the delays longer"
    # Only the finished file (and perhaps the killed writer's temporary) remain; no other name.
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".big.npz.")} == {"big.npz"}


def _train_cmd(out, steps=3000, ckpt=500):
    return [sys.executable, "-m", "ufmjax.cli", "train", "ufm", "--steps", str(steps), "--ckpt-every",
            str(ckpt), "--dim", "12", "--quiet", "--out", str(out)]


def test_killed_training_resumes_from_last_checkpoint(tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not io.verified_steps(killed):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / io.METRICS_FILE).exists(), "killed too late: training had finished"
    assert subprocess.run(_train_cmd(killed), env=ENV).returncode == 0
    resumed = json.loads((killed / io.METRICS_FILE).read_text())
    assert resumed["resumed_from"] is not None and resumed["resumed_from"] % 500 == 0

    whole = tmp_path / "whole"
    assert subprocess.run(_train_cmd(whole), env=ENV).returncode == 0
    straight = json.loads((whole / io.METRICS_FILE).read_text())
    # Resuming replays the same steps: the same final cross-entropy to the last bit.
    assert resumed["final_ce"] == straight["final_ce"]


def test_same_seed_is_bit_identical(tmp_path):
    outs = []
    for k in range(2):
        run = tmp_path / f"r{k}"
        assert main(["train", "ufm", "--steps", "300", "--seed", "5", "--quiet", "--out", str(run)]) == 0
        assert main(["sweep", str(run), "--target", "1", "--negatives", "random", "--seed", "2",
                     "--out", str(run / "s.npz")]) == 0
        with np.load(run / "s.npz") as f:
            outs.append({k: f[k] for k in f.files if k != "meta"})
    for key in outs[0]:
        np.testing.assert_array_equal(outs[0][key], outs[1][key], err_msg=key)


def test_extreme_alphas_via_cli(tmp_path):
    run = tmp_path / "r"
    assert main(["train", "ufm", "--steps", "200", "--quiet", "--out", str(run)]) == 0
    assert main(["sweep", str(run), "--target", "0", "--alphas", "-1e6:1e6:5", "--out", str(run / "s.npz")]) == 0
    with np.load(run / "s.npz") as f:
        for key in f.files:
            if key != "meta":
                assert np.all(np.isfinite(f[key])), key


def test_user_errors_print_no_traceback(tmp_path):
    bad = [
        ["train", "ufm", "--eps", "2", "--out", str(tmp_path / "a")],
        ["sweep", str(tmp_path / "none"), "--target", "0", "--out", str(tmp_path / "x.npz")],
        ["sweep", str(tmp_path), "--target", "0", "--alphas", "0:1:-3", "--out", str(tmp_path / "x.npz")],
    ]
    for argv in bad:
        r = subprocess.run([sys.executable, "-m", "ufmjax.cli", *argv], env=ENV, capture_output=True, text=True)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr and "error:" in r.stderr


def test_atomic_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
