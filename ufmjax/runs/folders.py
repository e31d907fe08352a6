"""Run folders and sweep files: open one for a configuration, save and read sweeps.

A run folder holds `config.json` (written first), Orbax checkpoints under `checkpoints/`, and
`metrics.json` (written last: a folder without it is an unfinished run).
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ufmjax.runs import io


def versions() -> dict:
    """The versions of the libraries a result was computed with."""
    import flax
    import jax
    import optax

    from ufmjax import __version__

    return {"ufmjax": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version()}


def prepare_run_dir(out, force: bool = False) -> Path:
    """An empty (or forced-clean) folder for a new run; refuses to mix runs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise io.RunError(f"out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not (out / io.CONFIG_FILE).is_file():
            raise io.RunError(f"out {str(out)!r} is a non-empty folder that is not a ufmjax run")
    out.mkdir(parents=True, exist_ok=True)
    return out


def same_config(saved: dict, config: dict) -> bool:
    """Whether a run folder's saved config is this one (versions aside; JSON turns tuples to lists)."""
    def norm(c):
        return json.loads(io.to_json({k: v for k, v in c.items() if k != "versions"}))

    return norm(saved) == norm(config)


def open_run(out, config: dict, force: bool = False) -> tuple[Path, dict | None]:
    """Open the run folder `out` for `config`: (folder, metrics if that run is already finished).

    A new folder gets `config.json` (written first); an existing run must hold the same
    configuration, else RunError; an unfinished one is left to resume from its checkpoints.
    """
    out = prepare_run_dir(out, force)
    cfg_path = out / io.CONFIG_FILE
    if not cfg_path.is_file():
        io.write_json_atomic(cfg_path, config)
        return out, None
    if not same_config(io.read_json(cfg_path), config):
        raise io.RunError(f"out {str(out)!r} holds a run with another configuration (use --force to replace it)")
    return out, io.read_json(out / io.METRICS_FILE) if io.run_finished(out) else None


def check_finished(run_dir) -> dict:
    """The config of a finished run folder, else RunError naming it."""
    cfg = io.load_run_config(run_dir)
    if not io.run_finished(run_dir):
        raise io.RunError(f"run folder {str(run_dir)!r} is unfinished (no {io.METRICS_FILE}); train it again to resume")
    return cfg


def save_sweep(path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write a sweep's arrays and its JSON `meta` string into one .npz, atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"out must be a .npz file, got {str(path)!r}")
    io.save_npz_atomic(path, {**arrays, "meta": np.asarray(io.to_json(meta))})


def load_sweep(path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a sweep file written by `save_sweep`."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
        meta = json.loads(str(f["meta"]))
    return arrays, meta
