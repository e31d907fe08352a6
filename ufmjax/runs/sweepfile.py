"""Sweep files streamed to disk, and the output-size limit checked before a sweep starts.

`SweepFile` is a sink for the kernel's `drive` (and a mapping for the arrays a run adds):
each output [A, ...] is a raw `.npy` file in a temporary folder beside the target, filled one
chunk at a time by plain writes at offsets (not np.memmap: dirty mapped pages count in the
process's resident memory), so host memory stays flat in the grid's length; small whole
arrays wait in memory. `commit(meta)` streams every member into the `.npz`'s zip entries in
blocks (deflate level 1, or stored), under a temporary name renamed over the target (`io.atomic_path`);
the temporary folder goes whether the sweep succeeds, fails or is interrupted. The result
loads with `folders.load_sweep` exactly as a file from `folders.save_sweep`: the same arrays
and the same JSON `meta` member.

Before any work a sweep estimates the bytes its arrays will take (`OutputSize`, uncompressed,
so a bound on the file) and refuses a grid over `max_output` (`check_output_size`; `ufmjax
sweep --max-output`, `MAX_OUTPUT` by default); `config_size` does it for a UFM run from its
config.json alone, before its checkpoint is read.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ufmjax.runs import io
from ufmjax.runs.folders import check_output
from ufmjax.runs.progress import Progress

# The default of `ufmjax sweep --max-output` (uncompressed arrays): the reference UFM's
# 1e6-alpha sweep with both derivatives (2.6 GB) fits, ten times that grid does not; 4 GiB is
# 1.3-1.7 GiB on disk and about a minute to compress on one core (~67 MB/s at deflate level 1).
MAX_OUTPUT = 4 << 30
# Deflate level 1: on the kernel's float32 arrays it compresses 1.8x faster than numpy's
# savez_compressed (zlib's default level 6) for a file 3% larger (measured on a UFM sweep:
# 260 MB of arrays -> 109 MB in 3.8 s, against 106 MB in 6.8 s; stored: 260 MB in 0.4 s).
# On a UFM, whose kernel is cheap, compressing still takes most of a long sweep (1e6 alphas:
# 8 s of sweep, 39 s to deflate 2.6 GB into 0.87 GB; stored, the whole command takes 25 s
# instead of 49 s), hence `compress=False` (--no-compress).
COMPRESSLEVEL = 1
BLOCK = 1 << 20       # bytes per read and write when a member is copied into the zip
SPILL_BYTES = 1 << 20  # a whole array larger than this goes to disk at once, not kept in memory
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # member names: a file name on any system
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
         "gi": 1 << 30, "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40}


# ---------------------------------------------------------------- sizes

@dataclass(frozen=True)
class OutputSize:
    """Bytes a sweep file's arrays take (uncompressed): per alpha, and independent of the grid."""

    per_alpha: int
    fixed: int

    def total(self, num_alphas: int) -> int:
        return self.per_alpha * int(num_alphas) + self.fixed


def parse_size(text, name: str = "--max-output") -> int:
    """'8GiB', '500MB', '1.5G' or plain bytes -> bytes (decimal k/M/G/T, binary Ki/Mi/Gi/Ti)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        raise ValueError(f"{name} must be a size such as 8GiB, 500MB or 1000000 (bytes), got {text!r}")
    value = float(m.group(1)) * UNITS[unit]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{name} must be at least 1 byte, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes in binary units (B, KiB, MiB, GiB, TiB), 3 significant digits."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def check_output_size(nbytes: int, max_output: int | None, num_alphas: int, *, at_least: bool = False) -> None:
    """ValueError naming --max-output when a sweep's arrays would exceed it (None: no limit)."""
    if max_output is not None and nbytes > max_output:
        about = "at least" if at_least else "about"
        raise ValueError(f"--max-output: a sweep of {num_alphas:,} alphas would write {about} "
                         f"{format_bytes(nbytes)} of arrays (uncompressed), over the limit of "
                         f"{format_bytes(max_output)}; sweep fewer alphas or raise --max-output (max_output= in Python)")


def check_free_space(nbytes: int, out, *, compress: bool = True) -> None:
    """ValueError naming `out` when its file system cannot hold a sweep of `nbytes` of arrays:
    the raw members (nbytes) and, while they are assembled, the .npz beside them (as large with
    --no-compress; deflate needs about a third). Checked before the work, not found after it."""
    folder = Path(os.path.abspath(out)).parent
    while not folder.exists():
        folder = folder.parent
    need = nbytes * (2 if not compress else 1.35)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ValueError(f"--out {str(out)!r}: the sweep needs about {format_bytes(int(need))} of disk while it "
                         f"is written, and {str(folder)!r} has {format_bytes(free)} free; free space, write "
                         f"elsewhere or sweep fewer alphas")


def config_size(config: dict, *, top_k: int | None = None, top_k_at: str = "max", derivatives: int = 2,
                dtype=np.float32) -> OutputSize | None:
    """The output size of a UFM run's sweep from its config.json alone (no checkpoint read: a
    grid too long is refused at once), an upper bound of `Steering.output_size`; None for
    other models or a config this does not understand (loading the run then says what is wrong)."""
    from ufmjax.kernel.grid import output_bytes, tracked_count

    try:
        if config.get("model") != "ufm":
            return None
        rows, vocab, dim = (int(config["ufm"][k]) for k in ("contexts", "vocab", "dim"))
        concepts = int(config["data"]["concepts"])
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        return None
    if min(rows, vocab, dim, concepts) < 1:
        return None
    tokens = tracked_count(vocab, top_k, top_k_at)
    per_alpha, fixed = output_bytes(rows=rows, vocab=vocab, concepts=concepts, tokens=tokens,
                                    derivatives=derivatives, dtype=dtype)
    # P and N (int64, at most every row each), the vector, p_data [M, V] and context_concept [M].
    return OutputSize(per_alpha, fixed + 16 * rows + 8 * dim + 8 * rows * vocab + 8 * rows)


# ---------------------------------------------------------------- the streamed file

class _Member:
    """One output streamed to a raw .npy file: its header, then rows written at their offsets."""

    def __init__(self, path: Path, shape: tuple, dtype):
        self.path, self.shape, self.dtype = path, tuple(int(n) for n in shape), np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        self.rows = 0
        self.file = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.file, header)
        self.data_offset = self.file.tell()

    def __setitem__(self, index, values) -> None:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a streamed sweep array takes slices of its first axis only")
        lo = index.start or 0
        values = np.ascontiguousarray(values, self.dtype)
        if values.shape[1:] != self.shape[1:] or lo < 0 or lo + values.shape[0] > self.shape[0]:
            raise ValueError(f"rows {lo}:{lo + values.shape[0]} of shape {values.shape} do not fit {self.shape}")
        self.file.seek(self.data_offset + lo * self.row_bytes)
        self.file.write(values.data)
        self.rows += values.shape[0]

    def read(self) -> np.ndarray:
        """The whole array (read into memory)."""
        if not self.file.closed:
            self.file.flush()
        return np.load(self.path, allow_pickle=False)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


class SweepFile(MutableMapping):
    """An .npz sweep file written as it is computed; use as a context manager.

    `with SweepFile(path) as sink: arrays, meta = ufm_sweep(run, grid, ..., sink=sink);
    sink.commit(meta)`. Leaving the block without `commit` (an error, Ctrl-C) removes the
    temporary folder and leaves no file, nor any folder this created; reading a streamed
    array back (`sink[name]`, before the commit) loads it whole. A process killed outright
    leaves its temporary folder, `.<name>.<random>.parts`, beside the output.

    Args:
      path: the .npz to write; its folder is created if missing.
      progress: show a progress bar while the file is assembled.
      compress: deflate the members (level 1), else store them (faster; a file as large as
        the arrays). np.load reads either.
    Raises:
      ValueError naming the file when it is not a .npz, is a folder, or cannot be written
      (checked now, before any sweep).
    """

    def __init__(self, path, *, progress: bool = False, compress: bool = True):
        self.path = Path(path)
        if self.path.suffix != ".npz":
            raise ValueError(f"out must be a .npz file, got {str(self.path)!r}")
        # A folder, a name too long for the commit's temporary, a run's own file, a folder that
        # cannot be written: refused now, not once everything is computed.
        check_output(self.path, "out")
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The name stays short of the 255-byte limit of a path component whatever out's is.
            self.parts = Path(tempfile.mkdtemp(prefix=f".{self.path.name[:64]}.", suffix=".parts",
                                               dir=self.path.parent))
        except OSError as e:
            self._remove_created(missing)
            raise ValueError(f"out {str(self.path)!r} cannot be written: {e.strerror or e}") from None
        self.progress, self.compress = progress, compress
        self.committed = False
        self._created = missing
        self._entries: dict = {}  # name -> np.ndarray (kept) or _Member (on disk), in file order

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the sink of kernel.drive
    def allocate(self, name: str, shape: tuple, dtype) -> _Member:
        """A member of `shape` on disk, filled by `member[lo:hi] = rows`."""
        self._check_name(name)
        self._discard(name)
        member = _Member(self.parts / f"{name}.npy", shape, dtype)
        self._entries[name] = member
        return member

    # -- the mapping
    def __setitem__(self, name: str, value) -> None:
        self._check_name(name)
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise ValueError(f"sweep array {name!r} holds Python objects; a sweep file holds numbers and strings")
        self._discard(name)
        if arr.nbytes > SPILL_BYTES:
            member = self.allocate(name, arr.shape, arr.dtype)
            member[0:arr.shape[0]] = arr
            member.close()
        else:
            self._entries[name] = arr

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        return entry.read() if isinstance(entry, _Member) else entry

    def __delitem__(self, name: str) -> None:
        if name not in self._entries:
            raise KeyError(name)
        self._discard(name)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # -- the end
    def commit(self, meta: dict) -> Path:
        """Assemble every array and the JSON `meta` into the .npz, atomically. Returns its path."""
        if self.committed:
            raise RuntimeError(f"{str(self.path)!r} is already written")
        if "meta" in self._entries:
            raise ValueError("'meta' is the sweep file's JSON member; no array may take its name")
        members = [*self._entries.items(), ("meta", np.asarray(io.to_json(meta)))]
        for name, entry in members:
            if isinstance(entry, _Member):
                entry.close()
                if entry.rows != entry.shape[0]:
                    raise RuntimeError(f"sweep array {name!r}: {entry.rows} of {entry.shape[0]} rows were written")
        total = sum(e.path.stat().st_size if isinstance(e, _Member) else e.nbytes for _, e in members)
        with Progress(total, f"write {self.path.name}", enabled=self.progress) as bar, \
                io.atomic_path(self.path) as tmp, \
                zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED if self.compress else zipfile.ZIP_STORED,
                                compresslevel=COMPRESSLEVEL if self.compress else None) as zf:
            for name, entry in members:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                    if isinstance(entry, _Member):
                        with open(entry.path, "rb") as src:
                            while block := src.read(BLOCK):
                                dst.write(block)
                                bar.update(len(block))
                        entry.path.unlink()  # its disk space back as soon as it is in the zip
                    else:
                        np.lib.format.write_array(dst, entry, allow_pickle=False)
                        bar.update(entry.nbytes)
        self.committed = True
        return self.path

    def close(self) -> None:
        """Remove the temporary folder; without a commit, also the folders this created."""
        for entry in self._entries.values():
            if isinstance(entry, _Member):
                entry.close()
        self._entries = {}
        shutil.rmtree(self.parts, ignore_errors=True)
        if not self.committed:
            self._remove_created(self._created)

    # -- helpers
    @staticmethod
    def _check_name(name) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"sweep array names are identifiers, got {name!r}")

    def _discard(self, name: str) -> None:
        """Forget `name` (an array set twice keeps its last value), its file with it."""
        entry = self._entries.pop(name, None)
        if isinstance(entry, _Member):
            entry.close()
            entry.path.unlink(missing_ok=True)

    @staticmethod
    def _remove_created(folders) -> None:
        """Remove the (still empty) folders a failed sweep created, deepest first."""
        for folder in folders:
            with contextlib.suppress(OSError):
                folder.rmdir()
