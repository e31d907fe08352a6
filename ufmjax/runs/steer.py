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
