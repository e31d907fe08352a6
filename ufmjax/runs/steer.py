"""`Steering`: everything a sweep or an optimisation needs from a steered run, built in one place.

Every run type (`UFMRun`, `GPTRun`) has `run.steer(target=..., negatives=..., layer=...,
positions=...)` returning a `Steering`; the sweep, the optimiser, the CLI and `reproduce`
all start from it, so they steer the same rows with the same vector and measure the same
things.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np

from ufmjax.analysis.gpt_probes import LOCAL_UFM_KL, grid_extras, refine_validity_range
from ufmjax.kernel import Measure, grid_size, grid_values, make_measure, output_bytes, sweep, top_tokens
from ufmjax.kernel.grid import resolve_top_k, tracked_count
from ufmjax.kernel.measure import output_shape
from ufmjax.optimize import Problem
from ufmjax.runs.progress import Progress
from ufmjax.runs.sweepfile import OutputSize, check_output_size
from ufmjax.steering import Steered

CE_AGAINST = ("data", "model")


def check_ce_against(ce_against: str) -> str:
    if ce_against not in CE_AGAINST:
        raise ValueError(f"ce_against must be 'data' or 'model', got {ce_against!r}")
    return ce_against


@dataclass(frozen=True)
class Steering:
    """A run steered toward a target: the closure, what is measured on it, and how it was built.

    Fields:
      steered: the `alpha -> logits [M, V]` closure (in `dtype`).
      concept_of: [V] concept of each token.
      ce_target: the CE reference of the rows (None: the unsteered model; [M, V] table; [M] labels).
      weights: [M] row weights (None: uniform).
      P, N: indices of the steering sets (into the contexts, or into `arrays["steer_prompts"]`).
      vector: [D] the difference-of-means steering vector (Eq. 3).
      target: the target concept.
      dtype: the closure's precision.
      meta: JSON-able description (model, run, target, negatives, layer, ...).
      arrays: run-specific arrays a sweep file carries beside the kernel's (p_data, prompts, ...).
      features: (rows of P [|P|, D], rows of N [|N|, D]) whose means' difference is `vector`
        (Eq. 3), for bootstrap resamples of the steering sets; None for a vector from a file.
    """

    steered: Steered
    concept_of: np.ndarray
    ce_target: Any
    weights: np.ndarray | None
    P: np.ndarray
    N: np.ndarray
    vector: np.ndarray
    target: int
    dtype: Any
    meta: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    features: tuple | None = None

    def measure(self, tokens=None) -> Measure:
        """The validated Measure of these rows, tracking `tokens` (all by default)."""
        return make_measure(self.steered, concept_of=self.concept_of, ce_target=self.ce_target,
                            weights=self.weights, tokens=tokens, dtype=self.dtype)

    def top_tokens(self, alphas, k: int, at: str = "max") -> np.ndarray:
        """The k most likely tokens (mean over rows) at the grid's largest alpha (`at="max"`),
        its smallest ("min"), or the union of both ends ("both": up to 2k tokens); Fig. 6."""
        return top_tokens(self.steered, alphas, k, at)

    def sweep(self, alphas, *, tokens=None, derivatives: int = 2, chunk_size: int | None = None,
              devices=None, method: str = "auto", sink=None, progress=None) -> dict[str, np.ndarray]:
        """The kernel's sweep of these rows over an increasing grid, with P, N and the steering
        vector added; `sink` and `progress` as for `kernel.sweep` (a `SweepFile` streams to disk)."""
        out = sweep(self.steered, grid_values(alphas), concept_of=self.concept_of, ce_target=self.ce_target,
                    weights=self.weights, tokens=tokens, derivatives=derivatives, chunk_size=chunk_size,
                    dtype=self.dtype, devices=devices, method=method, sink=sink, progress=progress)
        out.update(P=np.asarray(self.P), N=np.asarray(self.N), steering_vector=np.asarray(self.vector))
        return out

    @property
    def vocab(self) -> int:
        """The model's vocabulary (the closure's output width)."""
        return output_shape(self.steered, self.dtype)[1]

    def output_size(self, *, top_k: int | None = None, top_k_at: str = "max", derivatives: int = 2) -> OutputSize:
        """The bytes of a sweep file of these rows (kernel arrays, P, N, vector, `arrays`), uncompressed."""
        rows, vocab = output_shape(self.steered, self.dtype)
        tokens = tracked_count(vocab, top_k, top_k_at)
        per_alpha, fixed = output_bytes(rows=rows, vocab=vocab, concepts=int(np.max(self.concept_of)) + 1,
                                        tokens=tokens, derivatives=derivatives, dtype=self.dtype)
        fixed += sum(np.asarray(x).nbytes for x in (self.P, self.N, self.vector, *self.arrays.values()))
        return OutputSize(per_alpha, fixed)

    def problem(self, *, contexts=None, method: str = "auto") -> Problem:
        """The optimisation problem of these rows toward the target (`ufmjax.optimize`), in this
        steering's dtype (steer with dtype=jnp.float64, inside jax.enable_x64, for float64)."""
        return Problem(self.steered, concept_of=self.concept_of, target=self.target, ce_target=self.ce_target,
                       weights=self.weights, contexts=contexts, dtype=jnp.dtype(self.dtype), method=method)


def sweep_grid(st: Steering, alphas, *, top_k: int | None = None, top_k_at: str = "max", derivatives: int = 2,
               chunk_size: int | None = None, max_output: int | None = None, extra: OutputSize | None = None,
               sink=None, progress: bool = False, desc: str = "sweep", bands: bool = False):
    """The sweep every run type shares (`ufm_sweep`, `gpt_sweep`, `hf_sweep`).

    Args:
      st: the steering.
      alphas: an increasing grid, or a `kernel.Grid` (built only once its output is accepted).
      top_k, top_k_at: track only the k most likely tokens at the grid's "max" end, its "min"
        end, or "both" (`kernel.top_tokens`); all tokens when top_k is None; "auto" as
        `kernel.grid.resolve_top_k` (every token up to 1,024, else the top 256).
      derivatives, chunk_size: as for the kernel.
      max_output: most bytes the sweep's arrays may take (uncompressed), checked before the
        grid is built; None for no limit (the Python API's default: a caller that wants every
        token of a large vocabulary, as reproduce --hf does, is not refused; `ufmjax sweep`
        passes --max-output, `sweepfile.MAX_OUTPUT` by default).
      extra: what the caller adds beside the kernel's arrays (`probe_size`), for that check.
      sink: where the results go (`runs.sweepfile.SweepFile` streams them to disk); a dict by default.
      progress: show a progress bar over the grid.
      desc: the bar's label.
      bands: bootstrap bands follow (`runs.several.add_bands`): their two copies of every
        curve count toward max_output.
    Returns:
      (alphas [A] as float64 numpy, arrays: the sink with the kernel's keys, P, N,
      steering_vector and the run's `arrays`).
    """
    num = grid_size(alphas)
    size = st.output_size(top_k=top_k, top_k_at=top_k_at, derivatives=derivatives)
    if bands:
        size = OutputSize(3 * size.per_alpha, size.fixed)
    if extra is not None:
        size = OutputSize(size.per_alpha + extra.per_alpha, size.fixed + extra.fixed)
    check_output_size(size.total(num), max_output, num)
    alphas = grid_values(alphas)
    top_k = resolve_top_k(top_k, st.vocab)
    tokens = None if top_k is None else st.top_tokens(alphas, top_k, top_k_at)
    with Progress(alphas.size, desc, enabled=progress) as bar:
        arrays = st.sweep(alphas, tokens=tokens, derivatives=derivatives, chunk_size=chunk_size, sink=sink,
                          progress=bar.update)
    arrays.update(st.arrays)
    return alphas, arrays


def probe_size(st: Steering, *, limits: bool = False, local_ufm: bool = False, text_ce_derivatives: int | None = None,
               presence: int = 0, fixed: int = 0) -> OutputSize:
    """Bytes that `add_probes`, `add_text_ce` and sampled presence add to a sweep file: per
    alpha float64 probes and the text CE's [A] arrays; fixed, the [M, V] local-UFM direction,
    the [2, V] limits, `presence` subgrid points (3 float64 arrays) and `fixed` more."""
    rows, vocab = output_shape(st.steered, st.dtype)
    item = np.dtype(st.dtype).itemsize
    per_alpha = 8 * limits + 16 * local_ufm
    fixed += limits * (2 * vocab * 8 + 32) + local_ufm * (rows * vocab * item + 18) + 24 * presence
    if text_ce_derivatives is not None:
        per_alpha += (text_ce_derivatives + 3) * item
    return OutputSize(per_alpha, fixed)


LIMIT_PROBE = 1e4  # Prop. 4.1 is also probed at alpha = +-1e4, beyond any grid


def add_probes(arrays: dict, meta: dict, st: Steering, alphas, chunk_size, limit_logits_2xV=None,
               local_ufm: bool = True) -> None:
    """Prop. 4.1 and the local UFM along a transformer's grid (`analysis.gpt_probes`), into
    arrays/meta: the limit distance (and at +-1e4) when `limit_logits_2xV` is given, the local
    UFM's KL and validity range when `local_ufm`."""
    dtype, w = st.dtype, arrays["weights"]
    limits = limit_logits_2xV is not None
    lim = limit_logits_2xV if limits else np.zeros((2, arrays["probs_base"].shape[1]))
    ex = grid_extras(st.steered, alphas, lim, w, chunk_size, dtype)
    if limits:
        probe = np.asarray([-LIMIT_PROBE, LIMIT_PROBE])
        arrays.update(limit_probe_alphas=probe,
                      limit_probe_distance=grid_extras(st.steered, probe, lim, w, 2, dtype)["limit_distance"],
                      limit_logits=lim, limit_distance=ex["limit_distance"])
    if local_ufm:
        lo, hi, censored = refine_validity_range(st.steered, alphas, ex["local_ufm_kl"], weights=w, dtype=dtype,
                                                 chunk_size=chunk_size)
        arrays.update(local_ufm_kl=ex["local_ufm_kl"], local_ufm_kl_max=ex["local_ufm_kl_max"],
                      local_ufm_direction=ex["local_ufm_direction"], local_ufm_range=np.asarray([lo, hi]),
                      local_ufm_censored=np.asarray(censored))
        meta["local_ufm_threshold"] = LOCAL_UFM_KL


class _TextCESink(dict):
    """A kernel sink keeping only what `add_text_ce` stores, reduced chunk by chunk: delta_ce
    (and its derivatives) [A], and the row means of kl and of the target concept's probability
    [A]; the [A, M, ...] rest is never held (M = every position of every window)."""

    KEEP = {"delta_ce": None, "d_delta_ce": None, "d2_delta_ce": None, "kl": "mean", "concept_prob": "target"}

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def allocate(self, name: str, shape: tuple, dtype):
        if name not in self.KEEP:
            return _Dropped()
        self[name] = np.empty(shape[:1], dtype)
        return _Reduced(self[name], self.KEEP[name], self.target)


class _Dropped:
    """A slot that discards what it is given."""

    def __setitem__(self, index, values) -> None:
        pass


class _Reduced:
    """A slot storing each chunk reduced over its rows (axis 1)."""

    def __init__(self, out, how, target: int):
        self.out, self.how, self.target = out, how, target

    def __setitem__(self, index, values) -> None:
        if self.how == "mean":
            values = values.mean(axis=1)
        elif self.how == "target":
            values = values[:, :, self.target].mean(axis=1)
        self.out[index] = values


def add_text_ce(arrays: dict, meta: dict, st: Steering, all_positions, labels_M, alphas, derivatives: int,
                chunk_size, progress: bool = False) -> None:
    """Sec. 4's CE on held-out text with EVERY position steered, into arrays/meta.

    `all_positions` is the closure with one row per (window, position) (rows="all"), and
    `labels_M` the token that follows each row: text_delta_ce (with d_/d2_), text_kl and
    text_concept_prob (means over rows, taken chunk by chunk: memory grows with the grid by
    these [A] curves only). `progress`: a bar over the grid (the longest part of a text sweep).
    """
    with Progress(np.size(alphas), "text CE", enabled=progress) as bar:
        tx = sweep(all_positions, alphas, concept_of=st.concept_of, ce_target=labels_M, tokens=np.asarray([0]),
                   derivatives=derivatives, dtype=st.dtype, chunk_size=chunk_size, progress=bar.update,
                   sink=_TextCESink(st.target))
    arrays["text_delta_ce"] = tx["delta_ce"]
    arrays["text_kl"] = tx["kl"]
    arrays["text_concept_prob"] = tx["concept_prob"]
    for prefix in ("d_", "d2_")[:derivatives]:
        arrays[prefix + "text_delta_ce"] = tx[prefix + "delta_ce"]
    meta["text_ce_rows"] = int(np.asarray(labels_M).size)
