"""Run folders and sweep files: open one for a configuration, lock it, replace it, save sweeps.

A run folder holds `config.json` (written first), Orbax checkpoints under `checkpoints/`, and
`metrics.json` (written last: a folder without it is an unfinished run), plus the lock file
`.ufmjax.lock` and, while a file is being written, temporaries `.<name>.<random>.tmp`.

Ownership. Every config.json ufmjax writes for a run carries the top-level key
`"ufmjax_run": 1` (`io.RUN_MARKER`, the run-folder format). A folder is ufmjax's own when its
config.json parses as an object that carries the marker or, for runs written before the marker
existed, is a complete UFM or GPT run config (model "ufm"/"gpt" with every field a config of
that model holds: data/ufm/train/seed, or corpus/gpt/train/batch/seed and the corpus' fields).
Requiring every field, not just `model`, keeps another tool's config.json that happens to say
`"model": "gpt"` from being taken for a run; such old runs still load and resume, and
`same_config` ignores the marker (as it ignores "versions"), so they are not "another
configuration" either.

Replacing (`force=True`) removes only what ufmjax writes (metrics.json, checkpoints/ with the
checkpoints moved aside into checkpoints/.unverified/, config.json, their temporaries), entry
by entry, never the folder itself; anything else in the folder (a user's notes, a sweep
written beside the run) survives, and the folder, its lock file showing it was a run, takes the
new run. A folder that is not a ufmjax run is refused by name even then, `--force` refuses a
symbolic link to a folder, and a symbolic link inside a run folder is removed as a link, never
followed. `check_output` refuses outputs (a sweep, an optimisation result) that would land on
a run's own files.

Locking. `run_lock` holds an `fcntl.flock` on `.ufmjax.lock` from opening a run to writing its
metrics: a second process training into the same folder is refused at once, naming the pid
that holds it. The kernel drops the lock when its holder dies, so a lock file left by a killed
process blocks nothing. The file itself is never removed: unlinking a lock file that another
process has open would let a third one lock a new file beside it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ufmjax.runs import io

# What ufmjax writes into a run folder, in the order `clear_run_dir` removes it: metrics first
# (an interrupted clear leaves an unfinished run, not a finished one without checkpoints) and
# config.json last (the folder stays recognisably a run until the end).
OWN_ENTRIES = (io.METRICS_FILE, io.CKPT_DIR, io.CONFIG_FILE)


def versions() -> dict:
    """The versions of the libraries a result was computed with."""
    import flax
    import jax
    import optax

    from ufmjax import __version__

    return {"ufmjax": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _own_entry(name: str) -> bool:
    """Whether an entry of a run folder is one ufmjax writes there."""
    return name in OWN_ENTRIES or name == io.LOCK_FILE or any(io.is_temporary(name, f) for f in OWN_ENTRIES)


def _incidental(name: str) -> bool:
    """The lock file and ufmjax's temporaries: they do not make a folder someone else's."""
    return name == io.LOCK_FILE or any(io.is_temporary(name, f) for f in (io.CONFIG_FILE, io.METRICS_FILE))


def run_folder_problem(path) -> str | None:
    """Why `path` is not a ufmjax run folder (None when it is one)."""
    path = Path(path)
    cfg_path = path / io.CONFIG_FILE
    if not cfg_path.is_file():
        return f"no {io.CONFIG_FILE}"
    try:
        cfg = io.read_json(cfg_path)
    except (io.RunError, OSError):
        return f"its {io.CONFIG_FILE} is unreadable"
    if not io.owns_config(cfg):
        return f"its {io.CONFIG_FILE} is not a ufmjax run config"
    return None


def is_run_folder(path) -> bool:
    """Whether `path` is a folder whose config.json ufmjax wrote for a run (see the module doc)."""
    return Path(path).is_dir() and run_folder_problem(path) is None


def _check_out_dir(out: Path, force: bool) -> bool:
    """Refuse an `out` no run may go into, before anything is written; whether it holds a run."""
    try:
        return _check_out_entries(out, force)
    except OSError as e:  # a name too long, a folder that cannot be read, ...
        raise io.RunError(f"out {str(out)!r} cannot be used as a run folder: {e.strerror}") from None


def check_run_out(out, force: bool = False) -> bool:
    """Refuse (RunError naming it) a folder no run may be trained into; whether it holds a run.

    What `train --out` refuses, checked alone: a file, a folder that is not a ufmjax run, a
    folder inside a run's own files, with `force` a symbolic link. Nothing is written.
    """
    return _check_out_dir(Path(out), force)


def _check_out_entries(out: Path, force: bool) -> bool:
    """`_check_out_dir`, whose file-system errors it turns into RunError."""
    if out.is_symlink() and not out.exists():
        raise io.RunError(f"out {str(out)!r} is a broken symbolic link (to {os.readlink(out)!r})")
    hit = inside_run_files(out)
    if hit is not None:  # e.g. RUN/checkpoints/sub: the next --force of RUN would remove it
        raise io.RunError(f"out {str(out)!r} lies inside {hit[1]!r} of the ufmjax run {str(hit[0])!r}; "
                          f"choose a folder outside that run's own files")
    if force and out.is_symlink():
        raise io.RunError(f"--force refuses out {str(out)!r}: it is a symbolic link (to {os.readlink(out)!r}); "
                          f"give the folder itself")
    if out.exists() and not out.is_dir():
        raise io.RunError(f"out {str(out)!r} exists and is not a folder")
    if not out.is_dir():
        return False
    names = [p.name for p in out.iterdir()]
    if all(_incidental(n) for n in names):
        return False
    if io.LOCK_FILE in names and not set(names) & set(OWN_ENTRIES):
        return False  # a run folder that --force cleared around its user's files: it takes a run
    problem = run_folder_problem(out)
    if problem is not None:
        raise io.RunError(f"out {str(out)!r} is a non-empty folder that is not a ufmjax run ({problem}); "
                          f"runs go into new folders or their own (--force replaces ufmjax runs only): "
                          f"choose another --out")
    return True


# Real paths of the run folders this process holds. flock locks belong to an open file, so a
# second open() in the same process would conflict with the first; nested users (open_run
# inside a training, clear_run_dir inside open_run) share the outermost lock instead.
_HELD: set[str] = set()


@contextlib.contextmanager
def run_lock(out, force: bool = False):
    """Hold the run folder `out` for this process (created if missing); RunError if another holds it.

    Re-entrant within one process. Refuses, before creating anything, the outs `open_run`
    refuses with the same `force` (a file, a folder that is not a ufmjax run, with `force` a
    symbolic link: no lock file is written through it).
    """
    out = Path(out)
    key = os.path.realpath(out)
    if key in _HELD:
        yield out
        return
    _check_out_dir(out, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / io.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise io.RunError(f"out {str(out)!r} cannot be used as a run folder: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise io.RunError(f"run folder {str(out)!r} cannot be locked: {e.strerror}") from None
        raise io.RunError(f"run folder {str(out)!r} is in use by another ufmjax process (pid {holder})") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD.add(key)
        yield out
    finally:
        _HELD.discard(key)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_entry(path: Path) -> None:
    """Remove a file or folder ufmjax wrote; a symbolic link goes as a link, its target stays."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)  # does not follow symbolic links inside the tree


def clear_run_dir(out) -> list[str]:
    """Remove what ufmjax wrote in the run folder `out` (the `--force` of a run). Returns the names.

    Only metrics.json, checkpoints/, config.json and their temporaries go, under the run's lock;
    every other entry stays. RunError for a folder that is not a ufmjax run or is a symbolic
    link, or one another process holds.
    """
    out = Path(out)
    if not _check_out_dir(out, force=True):
        return []
    removed = []
    with run_lock(out):
        entries = {p.name: p for p in out.iterdir() if _own_entry(p.name) and p.name != io.LOCK_FILE}
        order = {name: k for k, name in enumerate(OWN_ENTRIES)}
        for name in sorted(entries, key=lambda n: order.get(n, -1)):  # temporaries first
            _remove_entry(entries[name])
            removed.append(name)
    return removed


def clear_run_dirs(parent) -> list[Path]:
    """Clear (`clear_run_dir`) every ufmjax run folder directly in `parent`; returns them.

    The `--force` of `reproduce`, whose runs live in OUT/runs/. Other entries are left alone
    and unmentioned: whoever needs one of their names refuses it by name then, and a user's
    folder beside the runs is none of `--force`'s business. Symbolic links (`parent` itself or
    a run in it) are refused before anything is removed.
    """
    parent = Path(parent)
    if parent.is_symlink():
        raise io.RunError(f"--force refuses {str(parent)!r}: it is a symbolic link (to {os.readlink(parent)!r})")
    if not parent.is_dir():
        return []
    found = sorted(p for p in parent.iterdir() if is_run_folder(p))
    for p in found:
        if p.is_symlink():
            raise io.RunError(f"--force refuses {str(p)!r}: it is a symbolic link (to {os.readlink(p)!r})")
    for p in found:
        clear_run_dir(p)
    return found


def prepare_run_dir(out, force: bool = False) -> Path:
    """An empty folder, or an existing run (cleared first with `force`); refuses to mix runs."""
    out = Path(out)
    holds_run = _check_out_dir(out, force)  # every refusal before the lock file is written
    with run_lock(out):
        if holds_run and force:
            clear_run_dir(out)
    return out


def same_config(saved: dict, config: dict) -> bool:
    """Whether a run folder's saved config is this one (versions and the run marker aside; JSON
    turns tuples to lists)."""
    def norm(c):
        return json.loads(io.to_json({k: v for k, v in c.items() if k not in ("versions", io.RUN_MARKER)}))

    return norm(saved) == norm(config)


def open_run(out, config: dict, force: bool = False) -> tuple[Path, dict | None]:
    """Open the run folder `out` for `config`: (folder, metrics if that run is already finished).

    A new folder gets `config.json` (written first, with the run marker); an existing run must
    hold the same configuration, else RunError; an unfinished one is left to resume from its
    checkpoints. The folder is locked meanwhile; hold `run_lock(out)` around training too.
    """
    out = Path(out)
    _check_out_dir(out, force)  # every refusal before the lock file is written
    with run_lock(out):
        prepare_run_dir(out, force)
        cfg_path = out / io.CONFIG_FILE
        if not cfg_path.is_file():
            io.write_json_atomic(cfg_path, {**config, io.RUN_MARKER: io.RUN_FORMAT})
            return out, None
        if not same_config(io.load_run_config(out), config):
            raise io.RunError(f"out {str(out)!r} holds a run with another configuration "
                              f"(use --force to replace it)")
        return out, io.read_metrics(out) if io.run_finished(out) else None


def check_finished(run_dir) -> dict:
    """The config of a finished run folder, else RunError naming it."""
    cfg = io.load_run_config(run_dir)
    if not io.run_finished(run_dir):
        raise io.RunError(f"run folder {str(run_dir)!r} is unfinished (no {io.METRICS_FILE}); train it again to resume")
    return cfg


def _name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of `directory` takes."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def inside_run_files(path) -> tuple[Path, str] | None:
    """(run folder, entry) when `path` is, or lies inside, one of a ufmjax run's own entries
    (config.json, metrics.json, checkpoints/, the lock), as written or with links resolved."""
    path = Path(path)
    for candidate in (Path(os.path.abspath(path)), path.resolve(strict=False)):
        for folder in candidate.parents:
            first = candidate.relative_to(folder).parts[0]
            if _own_entry(first) and is_run_folder(folder):
                return folder, first
    return None


def check_output(path, param: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written or would land on a run's files.

    Refused (ValueError naming `param` and the path): a path that is, or is inside, a ufmjax
    run folder's own entries (config.json, metrics.json, checkpoints/, the lock file; a file
    beside them is fine); an existing folder; a path under a plain file; a component longer
    than the file system allows; a nearest existing folder that cannot be written (probed with
    a temporary file, so /proc and /sys are refused up front). Nothing is created: the atomic
    writer makes missing parent folders later.

    Args:
      path: the output file.
      param: the option or argument that named it, for the message.
    Returns:
      the path, as a Path.
    """
    path = Path(path)
    where = f"{param} {str(path)!r}"
    absolute = Path(os.path.abspath(path))
    # Walk down from the root: names are checked against the limit of the folder that would
    # hold them, and the walk stops at the first missing name (the rest does not exist yet).
    existing = Path(absolute.anchor)
    limit = _name_max(existing)
    for k, part in enumerate(absolute.parts[1:], start=1):
        # The file itself is first written as `.<name>.<8 random>.tmp` (io.atomic_path), 14 bytes
        # longer: a name that fits only without them would fail after all the work.
        extra = io.TEMP_EXTRA if k == len(absolute.parts) - 1 else 0
        if len(os.fsencode(part)) + extra > limit:
            raise ValueError(f"{where}: the name {part[:40]!r}... is longer than the {limit - extra} bytes "
                             f"a name may have here")
        if existing is None:
            continue
        below = existing / part
        if below.is_symlink() and not below.exists():
            raise ValueError(f"{where}: {str(below)!r} is a broken symbolic link")
        if not below.exists():
            existing = None  # the names below are checked against the same limit
            continue
        last = k == len(absolute.parts) - 1
        if below.is_dir():
            if last:
                raise ValueError(f"{where} is an existing folder; give a file name")
            existing, limit = below, _name_max(below)
        elif not last:
            raise ValueError(f"{where}: {str(below)!r} is a file, not a folder")
    hit = inside_run_files(path)
    if hit is not None:
        raise ValueError(f"{where} would overwrite {hit[1]!r} of the ufmjax run {str(hit[0])!r}; "
                         f"write it beside the run's files, not onto them")
    parent = absolute.parent
    while not parent.exists():
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".ufmjax-write-check.", dir=parent)
    except OSError as e:
        raise ValueError(f"{where} cannot be written: {e.strerror} in {str(parent)!r}") from None
    os.close(fd)
    os.unlink(probe)
    return path


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
