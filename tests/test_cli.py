"""The `ufmjax` command: train and sweep end to end, and user errors as exit status 2."""

import json

import numpy as np
import pytest

from ufmjax.cli import main

REQUIRED_KEYS = {"alphas", "probs_base", "delta_p", "tokens", "delta_p_concept", "delta_ce", "kl",
                 "d_delta_p", "d_delta_p_concept", "d_delta_ce", "d2_delta_ce", "P", "N",
                 "steering_vector", "concept_of", "meta"}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "ufm", "--vocab", "9", "--concepts", "3", "--eps", "0.05", "--dim", "12",
                 "--seed", "1", "--out", str(out), "--quiet"]) == 0
    return out


def test_train_writes_a_run_folder(cli_run):
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["final_ce"] - metrics["entropy"] < 1e-4
    config = json.loads((cli_run / "config.json").read_text())
    assert config["model"] == "ufm" and config["ufm"]["dim"] == 12 and config["data"]["eps"] == 0.05


@pytest.mark.parametrize("negatives", ["contrastive", "random"])
def test_sweep_writes_documented_npz(cli_run, tmp_path, negatives):
    out = tmp_path / "s.npz"
    assert main(["sweep", str(cli_run), "--target", "1", "--negatives", negatives,
                 "--alphas", "-10:10:41", "--float64", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert REQUIRED_KEYS <= set(f.files)
        meta = json.loads(str(f["meta"]))
        assert meta["model"] == "ufm" and meta["target"] == 1 and meta["negatives"] == negatives
        assert f["alphas"].shape == (41,) and f["delta_p"].shape == (41, 12, 9)
        assert f["delta_p_concept"].shape == (41, 12, 3) and f["kl"].shape == (41, 12)
        assert f["delta_p"].dtype == np.float64
        assert f["delta_p_concept"][-1, :, 1].min() > 0  # the target concept rises
        assert f["delta_ce"][20] == 0.0 or abs(f["delta_ce"][20]) < 1e-12


@pytest.mark.parametrize("argv, match", [
    (["--target", "3"], "target"),
    (["--target", "0", "--negative-concept", "0"], "negative_concept"),
    (["--target", "0", "--alphas", "1:2"], "alphas"),
    (["--target", "0", "--alphas", "0:nan:5"], "alphas"),
    (["--target", "0", "--alphas", "0:1:0"], "alphas"),
    (["--target", "0", "--alphas", "5:1:3"], "alphas"),
    (["--target", "0", "--layer", "1"], "layer"),
    (["--target", "0", "--top-k", "20"], "top_k"),
    (["--target", "0", "--top-k", "0"], "--top-k must be a positive integer"),
    (["--target", "0", "--top-k", "most"], "--top-k must be a positive integer, 'all' or 'auto'"),
    (["--target", "0", "--positions", "last"], "--positions applies to GPT runs"),
    (["--target", "0", "--positions", "all"], "--positions applies to GPT runs"),  # once silently accepted
    (["--target", "uppercase"], "unknown target concept 'uppercase'"),
    (["--target", "0", "--negatives", "random", "--seed", "-1"], "seed must be a non-negative integer"),
    (["--target", "0", "--seed", "5"], "--seed applies to --negatives random"),  # once ignored, yet in meta
    (["--target", "0", "--top-k-at", "min"], "--top-k-at applies with --top-k"),  # once ignored
    (["--target", "0", "--top-k", "all", "--top-k-at", "min"], "--top-k-at applies with --top-k K"),
    (["--target", "0", "--alphas", "-1e39:1e39:3"], "beyond float32"),  # once inf everywhere, exit 0  # a name reaches the run's check
])
def test_sweep_user_errors(cli_run, tmp_path, capsys, argv, match):
    out = tmp_path / "bad.npz"
    assert main(["sweep", str(cli_run), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, match", [
    (["--vocab", "10"], "must divide vocab"),
    (["--eps", "0.9"], "eps"),
    (["--gamma", "0.2,0.3"], "gamma"),
    (["--gamma", "a,b"], "gamma"),
])
def test_train_user_errors(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    assert main(["train", "ufm", *argv, "--out", str(out), "--quiet"]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, match", [
    (["--batch", "0"], "batch must be a positive integer, got 0"),  # once silently 256
    (["--corpus", "text", "--vocab", "12"], "--vocab applies to --corpus concept only"),  # once ignored
    (["--corpus", "text", "--context-len", "3"], "--context-len applies to --corpus concept only"),
    (["--val-frac", "0.2"], "--val-frac applies to --corpus text only"),
])
def test_train_gpt_refuses_what_it_would_ignore(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    assert main(["train", "gpt", *argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_run_folder(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing"), "--target", "0", "--out", str(tmp_path / "x.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path), "--target", "0", "--out", str(tmp_path / "x.npz")]) == 2
    assert "not a ufmjax run" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_diverging_training_exits_1_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"  # --lr 1e6 once ran to a CE of 5.5e9 and exited 0
    assert main(["train", "ufm", "--lr", "1e6", "--steps", "5", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "diverged" in err and "--lr" in err and len(err.splitlines()) == 1
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("where", ["config.json", "metrics.json", "checkpoints/x.json", "dir.json", "file/x.json",
                                   "/proc/opt.json"])
def test_optimize_output_refused_before_any_work(cli_run, tmp_path, capsys, where):
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "file").write_text("a file\n")
    before = {p: p.read_bytes() for p in cli_run.rglob("*") if p.is_file()}
    out = cli_run / where if where.split("/")[0] in ("config.json", "metrics.json", "checkpoints") \
        else (tmp_path / where if not where.startswith("/") else where)
    assert main(["optimize", str(cli_run), "--target", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in cli_run.rglob("*") if p.is_file()} == before  # the run is untouched


def test_sweep_never_writes_into_a_runs_own_files(cli_run, capsys):
    out = cli_run / "checkpoints" / "s.npz"
    assert main(["sweep", str(cli_run), "--target", "0", "--alphas", "0:1:3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "checkpoints" in err and not out.exists()
    beside = cli_run / "s.npz"  # beside the run's files is fine
    assert main(["sweep", str(cli_run), "--target", "0", "--alphas", "0:1:3", "--out", str(beside)]) == 0
    beside.unlink()


def test_a_grid_too_large_is_refused_before_jax_is_imported(cli_run, tmp_path):
    """1e8 alphas: refused from the run's config.json alone, with the estimate, in a process
    that never imports JAX (its ~2 s import would be most of the wait)."""
    import subprocess
    import sys

    code = ("import sys; from ufmjax.cli import main; "
            f"rc = main(['sweep', {str(cli_run)!r}, '--target', '0', '--alphas', '0:1:100000000', "
            f"'--out', {str(tmp_path / 'huge.npz')!r}]); print(rc, 'jax' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr)
    assert "--max-output" in proc.stderr and "GiB" in proc.stderr and not (tmp_path / "huge.npz").exists()
