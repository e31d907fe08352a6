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
from ufmjax.kernel import Measure, make_measure, sweep, top_tokens
from ufmjax.optimize import Problem
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

    def measure(self, tokens=None) -> Measure:
        """The validated Measure of these rows, tracking `tokens` (all by default)."""
        return make_measure(self.steered, concept_of=self.concept_of, ce_target=self.ce_target,
                            weights=self.weights, tokens=tokens, dtype=self.dtype)

    def top_tokens(self, alphas, k: int) -> np.ndarray:
        """The k most likely tokens (mean over rows) at the grid's largest |alpha| (Fig. 6).

        `gpt_sweep(top_k=...)` (and so `ufmjax sweep` on a GPT run) takes them at the largest
        positive alpha instead; on a symmetric grid the two ends differ.
        """
        return top_tokens(self.steered, alphas, k)

    def sweep(self, alphas, *, tokens=None, derivatives: int = 2, chunk_size: int | None = None,
              devices=None, method: str = "auto") -> dict[str, np.ndarray]:
        """The kernel's sweep of these rows, with P, N and the steering vector added."""
        out = sweep(self.steered, alphas, concept_of=self.concept_of, ce_target=self.ce_target,
                    weights=self.weights, tokens=tokens, derivatives=derivatives, chunk_size=chunk_size,
                    dtype=self.dtype, devices=devices, method=method)
        out.update(P=np.asarray(self.P), N=np.asarray(self.N), steering_vector=np.asarray(self.vector))
        return out

    def problem(self, *, contexts=None, method: str = "auto") -> Problem:
        """The optimisation problem of these rows toward the target (`ufmjax.optimize`), in this
        steering's dtype (steer with dtype=jnp.float64, inside jax.enable_x64, for float64)."""
        return Problem(self.steered, concept_of=self.concept_of, target=self.target, ce_target=self.ce_target,
                       weights=self.weights, contexts=contexts, dtype=jnp.dtype(self.dtype), method=method)


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


def add_text_ce(arrays: dict, meta: dict, st: Steering, all_positions, labels_M, alphas, derivatives: int,
                chunk_size) -> None:
    """Sec. 4's CE on held-out text with EVERY position steered, into arrays/meta.

    `all_positions` is the closure with one row per (window, position) (rows="all"), and
    `labels_M` the token that follows each row: text_delta_ce (with d_/d2_), text_kl and
    text_concept_prob (means over rows).
    """
    tx = sweep(all_positions, alphas, concept_of=st.concept_of, ce_target=labels_M, tokens=np.asarray([0]),
               derivatives=derivatives, dtype=st.dtype, chunk_size=chunk_size)
    arrays["text_delta_ce"] = tx["delta_ce"]
    arrays["text_kl"] = tx["kl"].mean(axis=1)
    arrays["text_concept_prob"] = tx["concept_prob"][:, :, st.target].mean(axis=1)
    for prefix in ("d_", "d2_")[:derivatives]:
        arrays[prefix + "text_delta_ce"] = tx[prefix + "delta_ce"]
    meta["text_ce_rows"] = int(np.asarray(labels_M).size)
