"""Run folders, results and checkpoints, all written atomically.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed
over the target: a reader, or a run interrupted at any point, sees the previous file or the
new one, never a truncated one. Checkpoints are Orbax step folders (committed by rename) with
a SHA-256 manifest of their files, checked before anything is loaded.

A run's `config.json` carries the top-level key `RUN_MARKER` ("ufmjax_run": format version),
which is how a folder is known to be ufmjax's own (`owns_config`); `folders` documents the rule.
Readers of `config.json` and `metrics.json` turn every malformed file (random bytes, truncated
JSON, a list where an object belongs, a missing or wrong-typed field) into a RunError naming
the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ufmjax.common import jsonable

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CKPT_DIR = "checkpoints"
LOCK_FILE = ".ufmjax.lock"
# Unverifiable step folders are moved here (inside checkpoints/, under a name Orbax never
# parses as a step), each as `<step>-<unix time>/`: never deleted, never reused.
UNVERIFIED_DIR = ".unverified"
RUN_MARKER = "ufmjax_run"
RUN_FORMAT = 1
MODELS = ("ufm", "gpt")


class RunError(ValueError):
    """A run folder that does not exist, is not a ufmjax run, is unfinished, or is malformed."""


class TrainingDiverged(RuntimeError):
    """Training whose loss became non-finite or blew up; nothing of it was saved."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupted."""


def warn(message: str) -> None:
    """One warning line on stderr (Python's `warnings` would add a file:line and a source line)."""
    print(f"ufmjax: warning: {message}", file=sys.stderr, flush=True)


# `atomic_path` writes `.<name>.<8 random>.tmp`: that many bytes longer than the name itself.
TEMP_EXTRA = len(".") + len(".") + 8 + len(".tmp")


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


def is_temporary(name: str, of: str) -> bool:
    """Whether `name` is a temporary file `atomic_path` makes for a file named `of`."""
    return name.startswith(f".{of}.") and name.endswith(".tmp")


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


def read_json(path):
    """The JSON value of a file, or RunError naming the file when it is not UTF-8 JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunError(f"{str(path)!r} is not a JSON file (byte {e.start} is not UTF-8)") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{str(path)!r} is not valid JSON (truncated or damaged?): {e}") from None
    except RecursionError:
        raise RunError(f"{str(path)!r} is not a usable JSON file (nested too deeply)") from None
    except IsADirectoryError:
        raise RunError(f"{str(path)!r} is a folder, not a JSON file") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunError(f"{str(path)!r} cannot be read: {e.strerror}") from None


def _kind(value) -> str:
    """A JSON value's type in JSON's words, for messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# The fields each model's config.json must hold, with their JSON types; a config that has
# them is a ufmjax run even without RUN_MARKER (runs written before the marker existed).
_FIELDS = {
    "ufm": {"data": dict, "ufm": dict, "train": dict, "seed": int},
    "gpt": {"corpus": str, "gpt": dict, "train": dict, "batch": int, "seed": int},
}
_CORPUS_FIELDS = {"concept": {"data": dict}, "text": {"text": dict, "text_sha256": str}}


def config_problem(cfg) -> str | None:
    """What makes `cfg` (a parsed config.json) unusable as a ufmjax run config, or None."""
    if not isinstance(cfg, dict):
        return f"holds {_kind(cfg)}, not a ufmjax run config (an object)"
    model = cfg.get("model")
    if model not in MODELS:
        return f"is not a ufmjax run config (model={model!r}; ufmjax runs are {' or '.join(MODELS)})"
    fields = dict(_FIELDS[model])
    if model == "gpt":
        corpus = cfg.get("corpus")
        if "corpus" not in cfg:
            return "lacks the field 'corpus' that a gpt run config holds"
        if corpus not in _CORPUS_FIELDS:
            return f"field 'corpus' must be one of {tuple(_CORPUS_FIELDS)}, got {corpus!r}"
        fields.update(_CORPUS_FIELDS[corpus])
    for key, kind in fields.items():
        if key not in cfg:
            return f"lacks the field {key!r} that a {model} run config holds"
        value = cfg[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            want = {dict: "an object", str: "a string", int: "an integer"}[kind]
            return f"field {key!r} must be {want}, got {_kind(value)}"
    if isinstance(cfg["seed"], int) and cfg["seed"] < 0:
        return f"field 'seed' must be a non-negative integer, got {cfg['seed']}"
    return None


def owns_config(cfg) -> bool:
    """Whether a parsed config.json was written by ufmjax for a run.

    Either it carries RUN_MARKER, or (runs written before the marker) it is a complete UFM or
    GPT run config: model "ufm"/"gpt" with every field that model's config holds. A foreign
    config.json (a Hugging Face model's, another project's) has neither.
    """
    if isinstance(cfg, dict) and RUN_MARKER in cfg:
        return True
    return config_problem(cfg) is None


def load_run_config(run_dir) -> dict:
    """The config of a ufmjax run folder, checked field by field, or RunError naming the file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {str(run_dir)!r} does not exist")
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise RunError(f"run folder {str(run_dir)!r} is not a ufmjax run (no {CONFIG_FILE})")
    try:
        cfg = read_json(cfg_path)
    except RunError as e:
        raise RunError(f"run folder {str(run_dir)!r} has an unreadable {CONFIG_FILE}: {e}") from None
    problem = config_problem(cfg)
    if problem is not None:
        where = f"run folder {str(run_dir)!r}"
        if not isinstance(cfg, dict) or cfg.get("model") not in MODELS:
            raise RunError(f"{where} is not a ufmjax run: its {CONFIG_FILE} {problem}")
        raise RunError(f"{where}: {CONFIG_FILE} {problem}")
    return cfg


def from_config(run_dir, field: str, build: Callable[[], Any]):
    """`build()` (a constructor fed by config.json's `field`), its errors as RunError naming the file."""
    try:
        return build()
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, IndexError) as e:
        detail = f"{e}" if not isinstance(e, KeyError) else f"missing {e}"
        raise RunError(f"run folder {str(run_dir)!r}: {CONFIG_FILE} field {field!r} is invalid: {detail}") from None


def run_finished(run_dir) -> bool:
    return (Path(run_dir) / METRICS_FILE).is_file()


def check_metrics(metrics: dict, run_dir, keys) -> dict:
    """`metrics` if each of `keys` holds a finite number, else RunError naming the key and the
    file (a damaged metrics.json is reported, not printed as a KeyError)."""
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RunError(f"run folder {str(run_dir)!r}: {METRICS_FILE} has no finite number {key!r} "
                           f"(damaged? train again with --force)")
    return metrics


def read_metrics(run_dir) -> dict:
    """A finished run's metrics.json (an object), or RunError naming the file."""
    path = Path(run_dir) / METRICS_FILE
    try:
        metrics = read_json(path)
    except FileNotFoundError:
        raise RunError(f"run folder {str(run_dir)!r} is unfinished (no {METRICS_FILE})") from None
    except RunError as e:
        raise RunError(f"run folder {str(run_dir)!r} has an unreadable {METRICS_FILE}: {e}") from None
    if not isinstance(metrics, dict):
        raise RunError(f"run folder {str(run_dir)!r}: {METRICS_FILE} holds {_kind(metrics)}, not an object")
    return metrics


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
        if _manifest_step(old) is not None and _manifest_step(old) not in kept:
            old.unlink(missing_ok=True)


def _manifest_step(path: Path) -> int | None:
    """The step a `manifest_<step>.json` name gives, or None for another name."""
    m = re.fullmatch(r"manifest_(\d+)\.json", path.name)
    return int(m.group(1)) if m else None


def verify_step(run_dir, step: int) -> bool:
    """Whether checkpoint `step` exists and its files match its SHA-256 manifest."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    try:
        m = read_json(_manifest_path(ckpt_dir, step))
        step_dir = ckpt_dir / str(step)
        return (isinstance(m, dict) and m.get("step") == step and step_dir.is_dir()
                and not step_dir.is_symlink() and _digest_dir(step_dir) == m.get("files"))
    except (OSError, ValueError):
        return False


def verified_steps(run_dir) -> list[int]:
    """Checkpoint steps whose files match their manifest, newest first."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    steps = {_manifest_step(p) for p in ckpt_dir.glob("manifest_*.json")} - {None}
    return sorted((s for s in steps if verify_step(run_dir, s)), reverse=True)


def all_steps(run_dir) -> list[int]:
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def set_aside_unverified(run_dir) -> list[tuple[int, Path]]:
    """Move every checkpoint that fails its manifest out of Orbax's sight, before training resumes.

    A step folder that fails (or lacks) its manifest, a manifest without its folder, and a step
    folder Orbax left uncommitted (`<step>.orbax-checkpoint-tmp-*`) go, with their manifest, to
    `checkpoints/.unverified/<step>-<unix time>/`: kept for inspection, never reused. Left in
    place, Orbax would refuse to save that step again ("already exists") on every retry.
    Returns [(step, where it went)], oldest step first.
    """
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    good = set(verified_steps(run_dir))
    entries: dict[int, list[Path]] = {}
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"(\d+)(\.orbax-checkpoint-tmp.*)?", p.name) if p.is_dir() or p.is_symlink() else None
        step = int(m.group(1)) if m else _manifest_step(p)
        if step is not None and step not in good:
            entries.setdefault(step, []).append(p)
    moved = []
    stamp = int(time.time())
    for step in sorted(entries):
        dest = ckpt_dir / UNVERIFIED_DIR / f"{step}-{stamp}"
        k = 1
        while dest.exists():  # a second move within the same second keeps both
            dest, k = ckpt_dir / UNVERIFIED_DIR / f"{step}-{stamp}-{k}", k + 1
        dest.mkdir(parents=True)
        for p in entries[step]:
            os.rename(p, dest / p.name)  # a rename moves a symbolic link as a link
        moved.append((step, dest))
    return moved


def _tree_mismatch(step_dir: Path, abstract) -> str | None:
    """How the arrays saved in an Orbax step differ from `abstract`'s (None when they match).

    Checked from the checkpoint's metadata before restoring: when Orbax itself meets an array
    of another shape, it raises while its other reads are in flight, and those abandoned
    asyncio reads later print ~120 lines of "Exception ignored" tracebacks and "Event loop is
    closed" errors after the one message that matters.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        stored = ocp.tree.to_flat_dict(ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir / "default")))
    except Exception:  # noqa: BLE001 - no readable metadata: let the restore itself judge
        return None
    wanted = ocp.tree.to_flat_dict(abstract)
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing:
        return f"it has no array {'.'.join(missing[0])!r}"
    if extra:
        return f"it holds an array {'.'.join(extra[0])!r} this model does not have"
    for key in sorted(wanted, key=lambda k: (k[0] != "params", k)):  # a parameter names it best
        have, want = tuple(stored[key].shape), tuple(wanted[key].shape)
        if have != want:
            return f"array {'.'.join(key)!r} has shape {have} in the checkpoint, {want} in this run's model"
    return None


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

    if step is None:
        good = verified_steps(run_dir)
        if not good:
            present = all_steps(run_dir)
            what = f"checkpoints {present} fail their SHA-256 manifest (truncated or corrupted)" if present \
                else "no checkpoint"
            raise CheckpointError(f"run folder {str(run_dir)!r}: {what}")
        step = good[0]
        skipped = [s for s in all_steps(run_dir) if s > step]
        if skipped:
            warn(f"run folder {str(run_dir)!r}: checkpoints {skipped} fail their SHA-256 manifest "
                 f"(truncated or corrupted); using step {step}")
    elif not verify_step(run_dir, step):
        raise CheckpointError(
            f"run folder {str(run_dir)!r}: checkpoint {step} is missing or fails its SHA-256 manifest")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    mismatch = _tree_mismatch(Path(run_dir) / CKPT_DIR / str(step), abstract)
    if mismatch is not None:
        raise CheckpointError(f"run folder {str(run_dir)!r}: checkpoint {step} does not fit the model its "
                              f"{CONFIG_FILE} describes: {mismatch}")
    with _manager(Path(run_dir) / CKPT_DIR) as mgr:
        try:
            tree = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - any Orbax failure means an unusable checkpoint
            first = f"{e}".splitlines()[0] if f"{e}" else type(e).__name__
            raise CheckpointError(f"run folder {str(run_dir)!r}: checkpoint {step} cannot be read: {first}") from None
    return step, tree
