"""Run folders that lose nothing: ownership, --force, locks, resume past bad checkpoints,
finished runs with a corrupt final checkpoint, divergence, malformed config and metrics files.

Most tests work on a copy of the session's reference run (tests/conftest.py), so nothing is
trained here but a few steps.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from ufmjax.cli import main
from ufmjax.data import ConceptData, DataConfig, reference_config
from ufmjax.report.reproduce import Section, reproduce
from ufmjax.runs import io, load_run, train_gpt_run, train_ufm_run
from ufmjax.runs.folders import (
    check_output,
    clear_run_dir,
    clear_run_dirs,
    is_run_folder,
    prepare_run_dir,
    run_lock,
)
from ufmjax.runs.train import TrainConfig, TrainingDiverged, diverged

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture
def run(reference_run, tmp_path):
    """A private copy of the finished reference UFM run (steps 1500 and 2000 checkpointed)."""
    out = tmp_path / "run"
    shutil.copytree(reference_run.path, out, ignore=shutil.ignore_patterns(io.LOCK_FILE))
    return out


def _truncate(step_dir):
    """Cut the largest file of a checkpoint step folder in half (a write interrupted by a crash)."""
    victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _config(run):
    return json.loads((run / io.CONFIG_FILE).read_text())


def _write_config(run, cfg):
    (run / io.CONFIG_FILE).write_text(json.dumps(cfg))


# ---------------------------------------------------------------- ownership and --force

def test_config_carries_the_marker_and_runs_without_it_still_load(run):
    cfg = _config(run)
    assert cfg[io.RUN_MARKER] == io.RUN_FORMAT and is_run_folder(run)
    # A run written before the marker existed: still a run, loads, and is not "another configuration".
    del cfg[io.RUN_MARKER]
    _write_config(run, cfg)
    assert is_run_folder(run)
    metrics = json.loads((run / io.METRICS_FILE).read_text())
    assert train_ufm_run(run, reference_config(), progress=False) == metrics
    assert load_run(run).metrics == metrics
    # Another tool's config.json that happens to say "model": "gpt" is no run.
    _write_config(run, {"model": "gpt", "layers": 12})
    assert not is_run_folder(run)


def test_force_refuses_folders_that_are_not_runs(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "checkpoints").mkdir()  # another project's checkpoints/ does not make it a run
    with pytest.raises(io.RunError, match="mine.*not a ufmjax run.*--force replaces ufmjax runs only"):
        prepare_run_dir(mine, force=True)
    with pytest.raises(io.RunError, match="not a ufmjax run"):
        train_ufm_run(mine, reference_config(), progress=False, force=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / io.CONFIG_FILE).write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    with pytest.raises(io.RunError, match="its config.json is not a ufmjax run config"):
        prepare_run_dir(hf, force=True)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "checkpoints").is_dir()
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints", "notes.txt"]  # no lock file left there
    assert (hf / io.CONFIG_FILE).is_file()


def test_force_removes_only_what_ufmjax_wrote_and_follows_no_link(run, tmp_path):
    (run / "notes.txt").write_text("mine")
    (run / "sweep.npz").write_bytes(b"a sweep the user wrote beside the run")
    (run / f".{io.CONFIG_FILE}.abc123.tmp").write_text("a temporary left by a killed writer")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "precious.bin").write_bytes(b"\x00" * 10)
    (run / io.CKPT_DIR / "escape").symlink_to(elsewhere / "data")  # a link inside checkpoints/
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(io.RunError, match="--force refuses out .*link.*symbolic link"):
        prepare_run_dir(link, force=True)
    assert (run / io.METRICS_FILE).is_file()  # the refusal removed nothing

    own = [io.METRICS_FILE, io.CKPT_DIR, io.CONFIG_FILE]
    assert sorted(clear_run_dir(run)) == sorted([f".{io.CONFIG_FILE}.abc123.tmp", *own])
    assert sorted(p.name for p in run.iterdir()) == [io.LOCK_FILE, "notes.txt", "sweep.npz"]
    assert (elsewhere / "data" / "precious.bin").read_bytes() == b"\x00" * 10
    # The run folder, emptied of ufmjax's files, takes a new run (its lock file says it was one).
    assert prepare_run_dir(run) == run

    # A symbolic link standing for checkpoints/ itself goes as a link; its target stays.
    (run / io.CONFIG_FILE).write_text(json.dumps(_complete_cfg()))
    (run / io.CKPT_DIR).symlink_to(elsewhere)
    clear_run_dir(run)
    assert not (run / io.CKPT_DIR).exists() and (elsewhere / "data" / "precious.bin").is_file()


def _complete_cfg():
    """The fields of a UFM run config (their values do not matter to ownership)."""
    return {"model": "ufm", "data": {}, "ufm": {}, "train": {}, "seed": 0}


def test_reproduce_force_clears_only_run_folders(run, tmp_path):
    out = tmp_path / "rep"
    (out / "runs" / "mine").mkdir(parents=True)
    (out / "runs" / "mine" / "notes.txt").write_text("mine")
    (out / "runs" / "loose.txt").write_text("loose")
    shutil.move(run, out / "runs" / "ufm_ref")
    (out / "runs" / "ufm_ref" / "notes.txt").write_text("inside a run")
    summary = reproduce(out, force=True, progress=False, sections=[lambda o, q, p: Section("nothing")])
    assert summary["total"] == 0
    assert (out / "runs" / "mine" / "notes.txt").read_text() == "mine"
    assert (out / "runs" / "loose.txt").read_text() == "loose"
    assert sorted(p.name for p in (out / "runs" / "ufm_ref").iterdir()) == [io.LOCK_FILE, "notes.txt"]
    assert prepare_run_dir(out / "runs" / "ufm_ref")  # and it takes the retrained run
    # A symbolic link among the runs is refused before anything is removed.
    shutil.copytree(tmp_path / "rep" / "runs" / "mine", tmp_path / "other")
    (tmp_path / "other" / io.CONFIG_FILE).write_text(json.dumps({**_complete_cfg(), io.RUN_MARKER: 1}))
    (out / "runs" / "zz").symlink_to(tmp_path / "other")
    with pytest.raises(io.RunError, match="zz.*symbolic link"):
        clear_run_dirs(out / "runs")
    assert (tmp_path / "other" / io.CONFIG_FILE).is_file()


def test_check_output_refuses_paths_that_cannot_or_must_not_be_written(run, tmp_path):
    for own in (io.CONFIG_FILE, io.METRICS_FILE, f"{io.CKPT_DIR}/2000/x.npz", io.LOCK_FILE):
        with pytest.raises(ValueError, match=f"^--out .*would overwrite '{own.split('/')[0]}' of the ufmjax run"):
            check_output(run / own)
    assert check_output(run / "sweep.npz") == run / "sweep.npz"  # beside the run's files is fine
    (tmp_path / "x.npz").mkdir()
    (tmp_path / "plain").write_text("a file")
    refused = {
        tmp_path / "x.npz": "is an existing folder",
        tmp_path / "plain" / "x.npz": "plain' is a file, not a folder",
        tmp_path / ("n" * 256) / "x.npz": "longer than the 255 bytes",
        tmp_path / ("é" * 128 + ".npz"): "longer than the 241 bytes",  # 256 bytes in UTF-8
        # 245 bytes fit a name but not its `.<name>.<8>.tmp` temporary (once found after the work)
        tmp_path / ("o" * 240 + ".json"): "longer than the 241 bytes",
        "/proc/ufmjax-probe/x.npz": "cannot be written",
    }
    for path, match in refused.items():
        with pytest.raises(ValueError, match="^--save "):
            check_output(path, param="--save")
        with pytest.raises(ValueError, match=match):
            check_output(path)
    deep = tmp_path / "new" / "deeper" / "x.npz"
    assert check_output(deep) == deep and not (tmp_path / "new").exists()  # nothing created
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ufmjax-write-check")]


# ---------------------------------------------------------------- checkpoints

def test_resume_past_a_truncated_newest_checkpoint_converges(run, capfd):
    """The newest checkpoint cut short by a crash: moved aside, step 1500 wins, step 2000 is
    retrained and saved again (before: "Checkpoint for step 2000 already exists", forever)."""
    final = json.loads((run / io.METRICS_FILE).read_text())
    (run / io.METRICS_FILE).unlink()  # interrupted before metrics.json
    _truncate(run / io.CKPT_DIR / "2000")
    capfd.readouterr()
    metrics = train_ufm_run(run, reference_config(), progress=False)
    err = capfd.readouterr().err
    assert metrics["resumed_from"] == 1500
    # Exact resume: the retrained steps give the uninterrupted run's result to the last bit.
    assert metrics["final_ce"] == final["final_ce"]
    assert io.verified_steps(run) == io.all_steps(run) == [2000, 1500]
    aside = list((run / io.CKPT_DIR / io.UNVERIFIED_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("2000-")
    assert sorted(p.name for p in aside[0].iterdir()) == ["2000", "manifest_2000.json"]  # kept, not deleted
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ufmjax: warning:") and "[2000]" in lines[0]
    assert str(aside[0]) in lines[0] and "resuming from step 1500" in lines[0]
    assert load_run(run).metrics["final_ce"] == final["final_ce"]


def test_unverifiable_checkpoints_are_moved_where_orbax_does_not_look(run):
    import orbax.checkpoint as ocp

    ckpt = run / io.CKPT_DIR
    (ckpt / "3000" / "default").mkdir(parents=True)  # committed by Orbax, killed before its manifest
    (ckpt / "3000" / "default" / "x").write_text("?")
    (ckpt / "manifest_2500.json").write_text("{}")  # a manifest whose folder is gone
    (ckpt / "3500.orbax-checkpoint-tmp-17").mkdir()  # a save Orbax never committed
    moved = io.set_aside_unverified(run)
    assert [step for step, _ in moved] == [2500, 3000, 3500]
    assert sorted(p.name for p in moved[1][1].iterdir()) == ["3000"]
    assert (moved[1][1] / "3000" / "default" / "x").read_text() == "?"
    assert sorted(p.name for p in ckpt.iterdir()) == [".unverified", "1500", "2000", "manifest_1500.json",
                                                        "manifest_2000.json"]
    with ocp.CheckpointManager(ckpt.absolute()) as mgr:
        assert sorted(mgr.all_steps()) == [1500, 2000]
    assert io.set_aside_unverified(run) == []  # nothing left to move; nothing moved is touched again


def test_finished_run_with_a_corrupt_final_checkpoint_is_reported(run):
    _truncate(run / io.CKPT_DIR / "2000")
    assert io.verified_steps(run) == [1500]  # an older step would load, but it is not the run
    with pytest.raises(io.CheckpointError, match=r"run.*final checkpoint \(step 2000.*SHA-256.*--force") as e:
        load_run(run)
    assert str(run) in str(e.value)
    # Training it again with the same configuration said "done" (exit 0) and repaired nothing.
    cfg = _config(run)
    with pytest.raises(io.CheckpointError, match=r"final checkpoint \(step 2000"):
        train_ufm_run(run, DataConfig.from_dict(cfg["data"]), dim=cfg["ufm"]["dim"], seed=cfg["seed"],
                      train_config=TrainConfig(**cfg["train"]), progress=False)


def test_checkpoint_of_another_shape_is_one_clean_error(run, capfd, monkeypatch):
    cfg = _config(run)
    cfg["ufm"]["dim"] = 8
    _write_config(run, cfg)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    with pytest.raises(io.CheckpointError, match=r"does not fit .*'params\.\w+\.value' has shape \(\d+, \d+\)"):
        load_run(run)
    import gc

    gc.collect()  # abandoned Orbax reads would report here
    err = capfd.readouterr().err
    assert not unraisable and "Traceback" not in err and "Exception ignored" not in err


def test_a_second_process_is_refused_by_the_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ufmjax.runs.folders import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(out)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = f"run folder '{out}' is in use by another ufmjax process \\(pid {holder.pid}\\)"
        with pytest.raises(io.RunError, match=msg):
            train_ufm_run(out, reference_config(), train_config=TrainConfig(steps=5), progress=False)
        with pytest.raises(io.RunError, match=msg):
            prepare_run_dir(out, force=True)
        assert not (out / io.CONFIG_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock file is still there and blocks nothing; one process nests freely.
    assert (out / io.LOCK_FILE).is_file()
    with run_lock(out), run_lock(out):
        assert (out / io.LOCK_FILE).read_text().strip() == str(os.getpid())


# ---------------------------------------------------------------- training and seeds

def test_diverging_training_stops_and_saves_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: loss .* smaller --lr"):
        train_ufm_run(out, reference_config(), train_config=TrainConfig(steps=5, lr=1e6, clip=0.0),
                      progress=False)
    assert not (out / io.METRICS_FILE).exists() and io.all_steps(out) == []


def test_divergence_rule():
    assert diverged(float("nan"), 2.0) and diverged(float("inf"), 2.0)
    assert diverged(5.5e9, 2.2) and not diverged(2.2, 2.2)
    assert not diverged(5e3, 2.2)          # below the absolute bar
    assert not diverged(2e5, 1e3)          # a loss of a larger scale: 200x its start


def test_negative_seeds_are_refused_by_name(tmp_path):
    msg = "seed must be a non-negative integer, got -1"
    with pytest.raises(ValueError, match=msg):
        train_ufm_run(tmp_path / "u", reference_config(), seed=-1, progress=False)
    with pytest.raises(ValueError, match=msg):
        ConceptData(DataConfig(seed=-1))
    with pytest.raises(ValueError, match=msg):
        train_gpt_run(tmp_path / "g", "text", seed=-1, progress=False)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- malformed files

BAD_CONFIGS = {
    "list": b"[1, 2]",
    "null": b"null",
    "string": b'"ufm"',
    "bytes": bytes(range(256)),
    "truncated": b'{"model": "ufm", "data": {"vocab": 9',
    "no data": {"model": "ufm", "ufm": {}, "train": {}, "seed": 0},
    "gpt no corpus": {"model": "gpt", "gpt": {}, "train": {}, "batch": 8, "seed": 0},
    "gpt text no text": {"model": "gpt", "corpus": "text", "gpt": {}, "train": {}, "batch": 8, "seed": 0},
    "data a list": {"data": [9, 3]},
    "seed a string": {"seed": "0"},
    "vocab a string": {"data": {"vocab": "nine"}},
    "unknown ufm field": {"ufm": {"vocab": 9, "contexts": 12, "dim": 16, "depth": 3}},
    "lr a string": {"train": {"lr": "fast"}},
    "ufm against its data": {"ufm": {"vocab": 12, "contexts": 12, "dim": 16}},
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_malformed_config_is_a_run_error_naming_the_file(run, name):
    bad = BAD_CONFIGS[name]
    if isinstance(bad, dict) and "model" not in bad:  # one field of the real config spoiled
        cfg = _config(run)
        for key, value in bad.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
        bad = cfg
    (run / io.CONFIG_FILE).write_bytes(bad if isinstance(bad, bytes) else json.dumps(bad).encode())
    with pytest.raises(io.RunError, match=io.CONFIG_FILE) as e:
        load_run(run)
    assert str(run) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b'{"final_ce": 1.33', b"[1.3]", b"\xff\xfe\x00\x01", b""])
def test_malformed_metrics_is_a_run_error_naming_the_file(run, content, capsys):
    (run / io.METRICS_FILE).write_bytes(content)
    with pytest.raises(io.RunError, match=f"{run}.*{io.METRICS_FILE}"):
        load_run(run)
    # The CLI prints it as one line and exits 2.
    assert main(["sweep", str(run), "--target", "0", "--out", str(run / "s.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and io.METRICS_FILE in err and "Traceback" not in err
    assert not (run / "s.npz").exists()


def test_no_run_inside_another_runs_own_files(reference_run, tmp_path, capsys):
    """`train --out RUN/checkpoints/sub` once made a run among Orbax's steps, which the next
    `--force` of RUN removed with them."""
    run = tmp_path / "run"
    shutil.copytree(reference_run.path, run)
    inner = run / "checkpoints" / "sub"
    assert main(["train", "ufm", "--steps", "5", "--out", str(inner), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "inside 'checkpoints'" in err and len(err.strip().splitlines()) == 1 and not inner.exists()


def test_force_on_a_symlink_writes_nothing_through_it(tmp_path, capsys):
    """The refusal comes before the lock file: nothing appears in the link's target."""
    target = tmp_path / "empty"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert main(["train", "ufm", "--steps", "5", "--force", "--out", str(tmp_path / "link"), "--quiet"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert list(target.iterdir()) == []


def test_reproduce_refuses_a_users_folder_among_its_runs_by_name(tmp_path, capsys):
    """A user's folder named like one of reproduce's runs: one line and exit 2 before any work
    (it was a section failure with a traceback in report.md), and the folder is untouched."""
    mine = tmp_path / "runs" / "gpt_concept"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    assert main(["reproduce", "--quick", "--force", "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gpt_concept" in err and "not a ufmjax run" in err and len(err.splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "mine\n" and not (tmp_path / "report.md").exists()
