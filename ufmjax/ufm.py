"""The Unconstrained Features Model (THEORY.md, Def. 2.2).

Shape legend: M = contexts (m), V = vocabulary, D = feature width (d).
Logits of context j are f(c_j) = W h_j; W (V x D) and H (D x M) are both free parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx


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
