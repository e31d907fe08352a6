"""Steering vectors and the pure `alpha -> steered logits` closures the sweep kernel consumes.

Shape legend: M = contexts/rows, V = vocabulary, D = residual width.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ufmjax.data import check_steering_sets


class Steered(NamedTuple):
    """A steered model as the kernel sees it: `fn(params, alpha) -> logits [M, V]`.

    `fn` must be a stable, hashable function (module level or memoised), since the kernel
    compiles once per `fn`; everything that varies between models lives in `params`.
    """

    fn: Callable[[Any, jax.Array], jax.Array]
    params: Any


def diff_of_means(h_MxD, P, N) -> np.ndarray:
    """Eq. 3: v = mean_{j in P} h_j - mean_{j in N} h_j over rows of h_MxD."""
    h_MxD = np.asarray(h_MxD, dtype=np.float64)  # exact means even for float32 models
    P, N = check_steering_sets(P, N, h_MxD.shape[0])
    return h_MxD[P].mean(axis=0) - h_MxD[N].mean(axis=0)


def linear_logits(params, alpha):
    """Logits linear in alpha: base + alpha * direction (the UFM exactly, Lemma B.2)."""
    return params["base"] + alpha * params["direction"]


def linear_steered(base_MxV, direction) -> Steered:
    """`alpha -> base + alpha * direction`; direction is [V] (shared) or [M, V]."""
    return Steered(linear_logits, {"base": jnp.asarray(base_MxV), "direction": jnp.asarray(direction)})


def ufm_logits(params, alpha):
    """Steered UFM logits W (h_j + alpha v) = l_j + alpha W v (Lemma B.2).

    The parameters, not precomputed logits, are the closure's inputs, so a float64 sweep is
    float64 all the way; W H does not depend on alpha, so vmap computes it once per chunk.
    """
    W_VxD = params["W"]
    return (W_VxD @ params["H"]).T + alpha * (W_VxD @ params["v"])


def ufm_steered(model, v_D) -> Steered:
    """The UFM steered along v."""
    W_VxD = model.W[...]
    v_D = jnp.asarray(v_D)
    if v_D.shape != (W_VxD.shape[1],):
        raise ValueError(f"steering vector must have width {W_VxD.shape[1]}, got shape {tuple(v_D.shape)}")
    return Steered(ufm_logits, {"W": W_VxD, "H": model.H[...], "v": v_D})


def ufm_steering_vector(model, P, N) -> np.ndarray:
    """Difference of means of the trained context embeddings (columns of H)."""
    return diff_of_means(np.asarray(model.H[...]).T, P, N)
