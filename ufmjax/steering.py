"""The contract between models and the kernel: `Steered`, difference of means, and registries.

Shape legend: M = contexts/rows, V = vocabulary, D = residual width.

A model hands the kernel (and the optimiser) a `Steered(fn, params)` with
`fn(params, alpha) -> logits [M, V]` (docs/theory.md, Eq. 1). The kernel knows no model: a
model that has more structure declares it here, through two registries,

- `register_affine(fn)`: fn is exactly affine in alpha (logits l + alpha u, the UFM by
  Lemma B.2), so the kernel takes its closed-form affine path;
- `register_rowwise(fn, rowwise)`: `rowwise(params, alpha_M)` steers row j by alpha_M[j] in one
  pass, so the per-context optimiser needs one model evaluation instead of M.

Both registries are keyed by the function object, so `fn` must be stable (module level or
memoised); everything that varies between models lives in `params`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ufmjax.data import check_steering_sets


class Steered(NamedTuple):
    """A steered model as the kernel sees it: `fn(params, alpha) -> logits [M, V]`."""

    fn: Callable[[Any, jax.Array], jax.Array]
    params: Any


def diff_of_means(h_MxD, P, N) -> np.ndarray:
    """Eq. 3: v = mean_{j in P} h_j - mean_{j in N} h_j over rows of h_MxD (in float64)."""
    h_MxD = np.asarray(h_MxD, dtype=np.float64)  # exact means even for float32 models
    P, N = check_steering_sets(P, N, h_MxD.shape[0])
    return h_MxD[P].mean(axis=0) - h_MxD[N].mean(axis=0)


# ---------------------------------------------------------------- registries

_AFFINE: set = set()
_ROWWISE: dict = {}


def register_affine(fn):
    """Declare `fn(params, alpha)` exactly affine in alpha, so sweeps take the affine path."""
    _AFFINE.add(fn)
    return fn


def is_affine(fn) -> bool:
    """Whether `fn` was declared affine in alpha (`register_affine`)."""
    return fn in _AFFINE


def register_rowwise(fn: Callable, rowwise: Callable) -> None:
    """Declare `rowwise(params, alpha_M) -> logits [M, V]` (row j at alpha_M[j]) for closure fn.

    Without it, per-context optimisation evaluates the model once per row (M times the work).
    `rowwise` must be stable (module level or memoised), like fn.
    """
    _ROWWISE[fn] = rowwise


@functools.lru_cache(maxsize=64)
def diagonal_rowwise(fn):
    """Row j of fn(params, alpha_M[j]) for every j: one full model evaluation per row."""

    def rowwise(params, alpha_M):
        rows = jnp.arange(alpha_M.shape[0])
        return jax.vmap(lambda a, j: jnp.take(fn(params, a), j, axis=0))(alpha_M, rows)

    return rowwise


def residual_rowwise(fn):
    """One-pass per-row alphas for a transformer closure that steers a cached residual.

    Such a closure (the GPT's, a pretrained model's) adds `alpha * params["steer"]` to the
    residual it caches (`h` [B, T, D] for all positions, `x` [B, D] for the last one) and has
    one row per prompt; scaling the vector per prompt and calling it at alpha = 1 steers
    prompt j by alpha_M[j] in one model evaluation instead of B.
    """

    def rowwise(params, alpha_M):
        lead = params["h"] if "h" in params else params["x"]
        scale = alpha_M.reshape((-1,) + (1,) * (lead.ndim - 1))
        return fn({**params, "steer": scale * params["steer"]}, jnp.ones((), alpha_M.dtype))

    return rowwise


def rowwise_of(fn) -> tuple[Callable, bool]:
    """(rowwise closure, whether it is one pass) for a steered closure fn."""
    if fn in _ROWWISE:
        return _ROWWISE[fn], True
    return diagonal_rowwise(fn), False


# ---------------------------------------------------------------- a closure of no model

@register_affine
def linear_logits(params, alpha):
    """Logits linear in alpha: base + alpha * direction (any UFM-like toy)."""
    return params["base"] + alpha * params["direction"]


def linear_rowwise(params, alpha_M):
    """`linear_logits` with row j at alpha_M[j]."""
    return params["base"] + alpha_M[:, None] * params["direction"]


register_rowwise(linear_logits, linear_rowwise)


def linear_steered(base_MxV, direction) -> Steered:
    """`alpha -> base + alpha * direction`; direction is [V] (shared) or [M, V]."""
    return Steered(linear_logits, {"base": jnp.asarray(base_MxV), "direction": jnp.asarray(direction)})
