"""Run folders, results and checkpoints, all written atomically.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed
over the target: a reader, or a run interrupted at any point, sees the previous file or the
new one, never a truncated one. Checkpoints are Orbax step folders (committed by rename) with
a SHA-256 manifest of their files, checked before anything is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ufmjax.common import jsonable

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CKPT_DIR = "checkpoints"


class RunError(ValueError):
    """A run folder that does not exist, is not a ufmjax run, or is unfinished."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupted."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the result the mode an ordinary open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def to_json(obj, **kwargs) -> str:
    """JSON text of `obj` by the package's one rule (`common.jsonable`: NaN as null, +-inf as
    "inf"/"-inf"), so every file ufmjax writes is standard JSON."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def write_json_atomic(path, obj) -> None:
    write_bytes_atomic(path, (to_json(obj, indent=2, sort_keys=True) + "\n").encode())


def save_npz_atomic(path, arrays: dict) -> None:
    """np.savez_compressed to memory, then one atomic write."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_run_config(run_dir) -> dict:
    """The config of a finished ufmjax run, or RunError naming the folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {str(run_dir)!r} does not exist")
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise RunError(f"run folder {str(run_dir)!r} is not a ufmjax run (no {CONFIG_FILE})")
    try:
        cfg = read_json(cfg_path)
    except json.JSONDecodeError as e:
        raise RunError(f"run folder {str(run_dir)!r} has an unreadable {CONFIG_FILE}: {e}") from None
    if cfg.get("model") not in ("ufm", "gpt"):
        raise RunError(f"run folder {str(run_dir)!r} is not a ufmjax run (model={cfg.get('model')!r})")
    return cfg


def run_finished(run_dir) -> bool:
    return (Path(run_dir) / METRICS_FILE).is_file()


# ---------------------------------------------------------------- checkpoints

def _digest_dir(step_dir: Path) -> dict:
    files = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(step_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def _manifest_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"manifest_{step}.json"


def _manager(ckpt_dir: Path, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        ckpt_dir.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))


def save_checkpoint(run_dir, step: int, tree) -> None:
    """Save a pytree as Orbax step `step`, then its manifest (both committed by rename)."""
    import orbax.checkpoint as ocp

    ckpt_dir = Path(run_dir) / CKPT_DIR
    with _manager(ckpt_dir) as mgr:
        mgr.save(step, args=ocp.args.StandardSave(tree), force=True)
        mgr.wait_until_finished()
        kept = set(mgr.all_steps())
    write_json_atomic(_manifest_path(ckpt_dir, step), {"step": step, "files": _digest_dir(ckpt_dir / str(step))})
    for old in ckpt_dir.glob("manifest_*.json"):
        if int(old.stem.split("_")[1]) not in kept:
            old.unlink(missing_ok=True)


def verified_steps(run_dir) -> list[int]:
    """Checkpoint steps whose files match their manifest, newest first."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    good = []
    for manifest in ckpt_dir.glob("manifest_*.json"):
        try:
            m = read_json(manifest)
            step_dir = ckpt_dir / str(m["step"])
            if step_dir.is_dir() and _digest_dir(step_dir) == m["files"]:
                good.append(int(m["step"]))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(good, reverse=True)


def all_steps(run_dir) -> list[int]:
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def restore_checkpoint(run_dir, template, step: int | None = None):
    """Restore a pytree shaped like `template` from a verified checkpoint.

    Args:
      run_dir: the run folder.
      template: a pytree of arrays (or ShapeDtypeStructs) with the saved structure.
      step: a given step, or None for the newest verified one.
    Returns:
      (step, tree).
    Raises:
      CheckpointError when there is no checkpoint or the requested one fails its manifest.
    """
    import jax
    import orbax.checkpoint as ocp

    good = verified_steps(run_dir)
    if step is None:
        if not good:
            present = all_steps(run_dir)
            what = f"checkpoints {present} fail their SHA-256 manifest (truncated or corrupted)" if present \
                else "no checkpoint"
            raise CheckpointError(f"run folder {str(run_dir)!r}: {what}")
        step = good[0]
        skipped = [s for s in all_steps(run_dir) if s > step]
        if skipped:
            warnings.warn(f"run folder {str(run_dir)!r}: checkpoints {skipped} fail their SHA-256 manifest "
                          f"(truncated or corrupted); using step {step}", stacklevel=2)
    elif step not in good:
        raise CheckpointError(
            f"run folder {str(run_dir)!r}: checkpoint {step} is missing or fails its SHA-256 manifest")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with _manager(Path(run_dir) / CKPT_DIR) as mgr:
        try:
            tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - any Orbax failure means an unusable checkpoint
            raise CheckpointError(f"run folder {str(run_dir)!r}: checkpoint {step} cannot be read: {e}") from None
    return step, tree
