"""The Unconstrained Features Model (Def. 2.2; docs/theory.md, Sec. 2) and its steering closure.

Shape legend: M = contexts (m), V = vocabulary, D = feature width (d).
Logits of context j are f(c_j) = W h_j; W (V x D) and H (D x M) are both free parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax.steering import (
    Steered,
    check_vectors,
    diff_of_means,
    preserve_norm,
    register_affine,
    register_rowwise,
)


@dataclass(frozen=True)
class UFMConfig:
    vocab: int = 9
    contexts: int = 12
    dim: int = 16
    init_scale: float = 0.5

    def __post_init__(self):
        for name in ("vocab", "contexts", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class UFM(nnx.Module):
    """W: [V, D] decoder, H: [D, M] free context embeddings."""

    def __init__(self, config: UFMConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw, kh = rngs.params(), rngs.params()
        scale = config.init_scale / jnp.sqrt(config.dim)
        # Drawn in float32 whatever jax_enable_x64 says, so a run does not depend on that switch.
        self.W = nnx.Param(scale * jax.random.normal(kw, (config.vocab, config.dim), jnp.float32))
        self.H = nnx.Param(config.init_scale * jax.random.normal(kh, (config.dim, config.contexts), jnp.float32))

    def __call__(self) -> jax.Array:
        """Logits of every context, [M, V]."""
        return (self.W[...] @ self.H[...]).T


def expected_ce(logits_MxV: jax.Array, p_MxV: jax.Array, pi_M: jax.Array) -> jax.Array:
    """Exact expected cross-entropy -sum_j pi_j sum_z p(z|c_j) log softmax_z(logits_j)."""
    return -jnp.sum(pi_M * jnp.sum(p_MxV * jax.nn.log_softmax(logits_MxV, axis=-1), axis=-1))


def ufm_loss(model: UFM, batch) -> jax.Array:
    """Training loss of the UFM: batch = (p_MxV, pi_M), the whole data table."""
    p_MxV, pi_M = batch
    return expected_ce(model(), p_MxV, pi_M)


# ---------------------------------------------------------------- steering

@register_affine
def ufm_logits(params, alpha):
    """Steered UFM logits W (h_j + alpha v) = l_j + alpha W v (Lemma B.2): affine in alpha.

    The parameters, not precomputed logits, are the closure's inputs, so a float64 sweep is
    float64 all the way; W H does not depend on alpha, so vmap computes it once per chunk.
    """
    W_VxD = params["W"]
    return (W_VxD @ params["H"]).T + alpha * (W_VxD @ params["v"])


def ufm_rowwise(params, alpha_M):
    """`ufm_logits` with context j steered by alpha_M[j], in one pass."""
    W_VxD = params["W"]
    return (W_VxD @ params["H"]).T + alpha_M[:, None] * (W_VxD @ params["v"])[None, :]


register_rowwise(ufm_logits, ufm_rowwise)


def ufm_steered(model: UFM, v_D) -> Steered:
    """The UFM steered along v."""
    W_VxD = model.W[...]
    v_D = jnp.asarray(v_D)
    if v_D.shape != (W_VxD.shape[1],):
        raise ValueError(f"steering vector must have width {W_VxD.shape[1]}, got shape {tuple(v_D.shape)}")
    return Steered(ufm_logits, {"W": W_VxD, "H": model.H[...], "v": v_D})


def ufm_steering_vector(model: UFM, P, N) -> np.ndarray:
    """Eq. 3: difference of means of the trained context embeddings (columns of H)."""
    return diff_of_means(np.asarray(model.H[...]).T, P, N)


# ---------------------------------------------------------------- several steering terms

@register_affine
def ufm_multi_logits(params, alpha_k):
    """W (h_j + sum_i alpha_i v_i) = l_j + sum_i alpha_i W v_i (Lemma B.2, k terms): affine.

    params: "W" [V, D], "H" [D, M], "V" [k, D] (the k steering vectors as rows).
    """
    W_VxD = params["W"]
    return (W_VxD @ params["H"]).T + (alpha_k @ params["V"]) @ W_VxD.T


def ufm_multi_rowwise(params, alpha_Mxk):
    """`ufm_multi_logits` with context j steered by alpha_Mxk[j], in one pass."""
    W_VxD = params["W"]
    return (W_VxD @ params["H"]).T + (alpha_Mxk @ params["V"]) @ W_VxD.T


register_rowwise(ufm_multi_logits, ufm_multi_rowwise)


def ufm_multi_preserve_logits(params, alpha_k):
    """W applied to each context's steered h_j + sum_i alpha_i v_i rescaled to |h_j|.

    Norm-preserving steering: no longer affine in alpha (the rescaling bends the line).
    """
    h_MxD = params["H"].T
    return preserve_norm(h_MxD, h_MxD + alpha_k @ params["V"]) @ params["W"].T


def ufm_multi_preserve_rowwise(params, alpha_Mxk):
    """`ufm_multi_preserve_logits` with context j steered by alpha_Mxk[j], in one pass."""
    h_MxD = params["H"].T
    return preserve_norm(h_MxD, h_MxD + alpha_Mxk @ params["V"]) @ params["W"].T


register_rowwise(ufm_multi_preserve_logits, ufm_multi_preserve_rowwise)


def ufm_multi_steered(model: UFM, vectors_kxD, preserve: bool = False) -> Steered:
    """The UFM steered along k vectors at once, alpha in R^k (rescaled to |h_j| if preserve).

    Args:
      model: a UFM.
      vectors_kxD: the k steering vectors, an array [k, D] or a list of [D] vectors.
      preserve: rescale each context's steered embedding to its unsteered norm.
    Returns:
      Steered(fn, {"W", "H", "V"}) with fn(params, alpha_k) -> logits [M, V].
    """
    W_VxD = model.W[...]
    V_kxD = jnp.asarray(check_vectors(vectors_kxD, W_VxD.shape[1]))
    fn = ufm_multi_preserve_logits if preserve else ufm_multi_logits
    return Steered(fn, {"W": W_VxD, "H": model.H[...], "V": V_kxD})


def ufm_median_norm(model: UFM) -> float:
    """Median |h_j| over contexts (the unit of alpha under the "residual" norm convention)."""
    return float(np.median(np.linalg.norm(np.asarray(model.H[...], np.float64), axis=0)))
