"""Steering terms as the command line writes them, numpy only: `--vector target=K,layer=L,...`.

A steering spec is a list of terms (vector, layer, positions); alpha has one entry per term
(docs/theory.md, "Several vectors"). This module parses and checks the terms before JAX is
imported (a bad term is refused at once, naming it); `runs.several` builds them on a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ufmjax.data.prompts import InputError

NEGATIVES = ("contrastive", "random")
POSITIONS = ("all", "last")
KEYS = ("target", "negatives", "negative", "layer", "positions", "file", "weight")


@dataclass(frozen=True)
class TermSpec:
    """One `--vector` term: where its vector comes from, where and how it is added.

    Fields:
      target: the concept the term steers toward (run folders: its difference-of-means vector,
        Eq. 3, and the optimiser's target); None with `file`.
      negatives, negative: the negative set of that vector (as `--negatives`, `--negative-concept`).
      layer, positions: where alpha_i v_i is added (GPT and pretrained models; default the
        middle layer, every position).
      file: a .npy or .safetensors vector instead of a difference of means.
      weight: the target's weight in the optimiser's steering effect (sum of weighted targets).
    """

    target: str | None = None
    negatives: str | None = None
    negative: int | None = None
    layer: int | None = None
    positions: str | None = None
    file: str | None = None
    weight: float = 1.0

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in KEYS if getattr(self, k) is not None and k != "weight"]
        return ",".join(parts + ([f"weight={self.weight:g}"] if self.weight != 1.0 else []))


def parse_term(spec: str, index: int = 0, option: str = "--vector") -> TermSpec:
    """'target=K[,negatives=contrastive|random][,negative=K2][,layer=L][,positions=all|last]
    [,weight=W]' or 'file=V.npy[,layer=L][,positions=..]'; a bare path is file=PATH (the
    pretrained models' `--vector FILE`). ValueError names the term and the key."""
    name = f"{option} {index + 1}"
    spec = spec.strip()
    if not spec:
        raise ValueError(f"{name} is empty: give target=K (or file=V.npy) and optional layer=L, positions=all|last")
    if "=" not in spec:
        return TermSpec(file=spec)
    fields: dict = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"{name}: {part!r} is not key=value (keys: {', '.join(KEYS)})")
        if key not in KEYS:
            raise ValueError(f"{name}: unknown key {key!r} (keys: {', '.join(KEYS)})")
        if key in fields:
            raise ValueError(f"{name}: {key} given twice")
        fields[key] = value
    if "negatives" in fields and fields["negatives"] not in NEGATIVES:
        raise ValueError(f"{name}: negatives must be one of {', '.join(NEGATIVES)}, got {fields['negatives']!r}")
    if "positions" in fields and fields["positions"] not in POSITIONS:
        raise ValueError(f"{name}: positions must be one of {', '.join(POSITIONS)}, got {fields['positions']!r}")
    for key in ("negative", "layer"):
        if key in fields:
            try:
                fields[key] = int(fields[key])
            except ValueError:
                raise ValueError(f"{name}: {key} must be an integer, got {fields[key]!r}") from None
            if fields[key] < 0:
                raise ValueError(f"{name}: {key} must be >= 0, got {fields[key]}")
    if "weight" in fields:
        try:
            fields["weight"] = float(fields["weight"])
        except ValueError:
            raise ValueError(f"{name}: weight must be a number, got {fields['weight']!r}") from None
        if not math.isfinite(fields["weight"]) or fields["weight"] < 0:
            raise ValueError(f"{name}: weight must be a finite number >= 0, got {fields['weight']}")
    if "file" in fields and ("negatives" in fields or "negative" in fields):
        raise ValueError(f"{name}: negatives/negative choose a difference of means; a file= vector has none")
    if "negative" in fields and fields.get("negatives", "contrastive") != "contrastive":
        raise ValueError(f"{name}: negative=K2 is the concept of contrastive negatives (not with negatives=random)")
    return TermSpec(**fields)


def parse_terms(specs, option: str = "--vector") -> list[TermSpec]:
    """Every `--vector` of the command line, in order."""
    return [parse_term(s, i, option) for i, s in enumerate(specs or [])]


def read_vector(path) -> np.ndarray:
    """A steering vector from a .npy file or a .safetensors file holding one tensor."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--vector: no file {str(path)!r}")
    if path.suffix == ".npy":
        try:
            v = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"--vector: {path} is not a readable .npy file ({e})") from None
    elif path.suffix == ".safetensors":
        from ufmjax.models.hf.checkpoint import Checkpoint

        with Checkpoint.from_file(path) as ck:
            names = ck.names()
            if len(names) != 1:
                raise InputError(f"--vector: {path} holds {len(names)} tensors; it must hold exactly one")
            v = ck.read(names[0], "float32")
    else:
        raise InputError(f"--vector: {path} must be a .npy or .safetensors file")
    v = np.asarray(v).reshape(-1) if np.asarray(v).ndim == 2 and 1 in np.asarray(v).shape else np.asarray(v)
    if v.ndim != 1 or not np.issubdtype(v.dtype, np.floating):
        raise InputError(f"--vector: {path} must hold a 1-D float vector, got shape {v.shape} {v.dtype}")
    return v.astype(np.float64)
