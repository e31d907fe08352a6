"""What the kernel measures: the validated `Measure`, the alpha = 0 `Reference`, the quantities.

Shape legend: M = rows (contexts or text positions), V = vocabulary, G = concepts, K = tracked
tokens.

A `Measure` is built and checked once (`make_measure`) and then travels through every compiled
call as a pytree; the `Reference` holds the unsteered (alpha = 0) values each steered quantity
is measured against. Both are `flax.struct` dataclasses, so their fields are typed and jit
sees them as pytrees (static fields are part of the compiled shape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ufmjax.common import cast_floats
from ufmjax.steering import Steered

# The quantities the kernel returns per alpha and their shapes (docs/theory.md) are defined in
# `kernel.grid` (numpy only), where output sizes are computed before JAX is imported.


@struct.dataclass
class Measure:
    """What to compute at every alpha, checked once by `make_measure`."""

    tokens_K: jax.Array         # int32 ids of the tracked tokens
    onehot_VxG: jax.Array       # concept indicator of every token
    inv_size_G: jax.Array       # 1 / |C| of every concept
    targets: jax.Array          # CE reference: [M, V] distributions, or [M] int32 labels
    weights_M: jax.Array        # weights of the rows in delta_ce
    label_targets: bool = struct.field(pytree_node=False, default=False)

    @property
    def num_rows(self) -> int:
        return int(self.weights_M.shape[0])

    @property
    def num_concepts(self) -> int:
        return int(self.onehot_VxG.shape[1])

    def target_log_prob(self, logp_MxV):
        """sum_z t_j(z) log p(z) per row: the negative cross-entropy against the targets."""
        if self.label_targets:
            return jnp.take_along_axis(logp_MxV, self.targets[:, None], axis=-1)[:, 0]
        return jnp.sum(self.targets * logp_MxV, axis=-1)


@struct.dataclass
class Reference:
    """The unsteered (alpha = 0) values every steered quantity is measured against."""

    logp_MxV: jax.Array
    p_tokens_MxK: jax.Array
    F_MxG: jax.Array
    ce_M: jax.Array


# What tracing a closure tells (its output shape, its largest per-alpha array) depends on the
# closure and its parameters' shapes and dtypes only: kept here, a repeated sweep of the same
# model does not trace it again (on a small model tracing was most of a sweep's time).
_TRACED: dict = {}
_TRACED_MAX = 256


def traced(kind: str, fn, params, dtype, compute):
    """compute() once per (kind, fn, parameter shapes and dtypes, dtype)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    key = (kind, fn, tree, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves), jnp.dtype(dtype))
    if key not in _TRACED:
        if len(_TRACED) >= _TRACED_MAX:
            _TRACED.clear()
        _TRACED[key] = compute()
    return _TRACED[key]


def output_shape(steered: Steered, dtype) -> tuple[int, ...]:
    """The shape of `fn(params, alpha)`, by tracing only (once per closure and shapes)."""
    def compute():
        params = cast_floats(steered.params, dtype)
        out = jax.eval_shape(steered.fn, params, jax.ShapeDtypeStruct((), dtype))
        return tuple(getattr(out, "shape", ()))

    return traced("output_shape", steered.fn, steered.params, dtype, compute)


@functools.lru_cache(maxsize=64)
def _logits_at_zero_fn(fn, dtype_name: str):
    """jit(params -> fn(params, 0)): the unsteered logits, compiled, not run op by op (eagerly
    the CE target was a large share of a small model's sweep)."""
    return jax.jit(lambda params: fn(params, jnp.zeros((), dtype_name)))


def logits_at_zero(steered: Steered, dtype):
    """The unsteered logits [M, V] of a closure. `sweep` computes them once for both the CE
    target and the Reference: at a large vocabulary one evaluation reads the whole
    unembedding (5 ms at 50,257 x 384 on 2 CPU cores, a tenth of a 64-alpha sweep)."""
    return _logits_at_zero_fn(steered.fn, str(jnp.dtype(dtype)))(cast_floats(steered.params, dtype))


_softmax = jax.jit(lambda x: jax.nn.softmax(x, axis=-1))


def check_logits_shape(shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"the steered closure must return logits [M, V], got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def make_measure(steered: Steered, *, concept_of, ce_target=None, weights=None, tokens=None,
                 dtype=jnp.float32, logits0=None) -> Measure:
    """Validate what a sweep or an optimisation measures on a steered model.

    Args:
      steered: the model's `alpha -> logits [M, V]` closure (only its output shape is read,
        and its alpha = 0 distribution when `ce_target` is None).
      concept_of: [V] concept index of each token (concepts 0..G-1, none empty).
      ce_target: None (the model's own unsteered distribution, Assumption 2), a float [M, V]
        table of next-token distributions, or an int [M] array of observed next tokens.
      weights: [M] non-negative weights of the rows in delta_ce; uniform by default.
      tokens: [K] token ids to report delta_p for; all V tokens by default.
      dtype: float32 or float64.
      logits0: the unsteered logits (`logits_at_zero`) when the caller has them already: the
        default CE target is their softmax.
    Returns:
      Measure. Raises ValueError naming the argument that is wrong.
    """
    M, V = check_logits_shape(output_shape(steered, dtype))
    concept_of = np.asarray(concept_of)
    if concept_of.shape != (V,) or not np.issubdtype(concept_of.dtype, np.integer) or concept_of.min() < 0:
        raise ValueError(f"concept_of must be {V} non-negative integer concept ids, got shape {concept_of.shape}")
    G = int(concept_of.max()) + 1
    sizes = np.bincount(concept_of, minlength=G)
    if np.any(sizes == 0):
        raise ValueError(f"concept_of leaves concepts {np.flatnonzero(sizes == 0).tolist()} empty")
    tokens = np.arange(V) if tokens is None else np.asarray(tokens).reshape(-1)
    if tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"tokens must be a non-empty list of token ids in [0, {V})")
    weights = np.full(M, 1.0 / M) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (M,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be {M} finite non-negative numbers")
    label_targets = False
    if ce_target is None:
        targets = _softmax(logits_at_zero(steered, dtype) if logits0 is None else logits0)
    else:
        targets = np.asarray(ce_target)
        label_targets = bool(np.issubdtype(targets.dtype, np.integer))
        if label_targets:
            if targets.shape != (M,) or targets.min() < 0 or targets.max() >= V:
                raise ValueError(f"ce_target labels must be {M} token ids in [0, {V})")
            targets = jnp.asarray(targets, jnp.int32)
        else:
            if targets.shape != (M, V) or not np.all(np.isfinite(targets)):
                raise ValueError(f"ce_target must be a finite [{M}, {V}] table or {M} labels")
            targets = jnp.asarray(targets, dtype)
    return Measure(tokens_K=jnp.asarray(tokens, jnp.int32), onehot_VxG=jnp.asarray(np.eye(G)[concept_of], dtype),
                   inv_size_G=jnp.asarray(1.0 / sizes, dtype), targets=targets,
                   weights_M=jnp.asarray(weights, dtype), label_targets=label_targets)


# ---------------------------------------------------------------- quantities at one alpha

def values(logp_MxV, p_MxV, ref: Reference, ms: Measure) -> dict:
    """Every quantity of QUANTITIES at one alpha, from the steered log-probabilities."""
    F_MxG = p_MxV @ ms.onehot_VxG
    dce_M = -ms.target_log_prob(logp_MxV) - ref.ce_M
    return {
        "delta_p": p_MxV[:, ms.tokens_K] - ref.p_tokens_MxK,
        "concept_prob": F_MxG,
        "delta_p_concept": (F_MxG - ref.F_MxG) * ms.inv_size_G,
        "delta_ce": jnp.dot(ms.weights_M, dce_M),
        "delta_ce_ctx": dce_M,
        # p log p is taken as 0 where p underflows (alpha = +-1e6), never 0 * -inf.
        "kl": jnp.sum(p_MxV * (logp_MxV - ref.logp_MxV), axis=-1),
        "entropy": -jnp.sum(p_MxV * logp_MxV, axis=-1),
    }


def quantities(logits_MxV, ref: Reference, ms: Measure) -> dict:
    """Every quantity at one alpha from the steered logits (differentiable in any mode)."""
    logp_MxV = jax.nn.log_softmax(logits_MxV, axis=-1)
    return values(logp_MxV, jnp.exp(logp_MxV), ref, ms)


def derivative_tree(dp_MxV, dlogp_MxV, extra_M, logp_MxV, ref: Reference, ms: Measure) -> dict:
    """One derivative of every quantity, from p^(k) = dp and (log p)^(k) = dlogp.

    `extra_M` is the part of KL^(k) and -H^(k) that is not sum_z p^(k) (log p - ...): 0 for
    the first derivative, Var(dx) for the second (from differentiating log p itself).
    """
    F_MxG = dp_MxV @ ms.onehot_VxG
    dce_M = -ms.target_log_prob(dlogp_MxV)
    return {
        "delta_p": dp_MxV[:, ms.tokens_K],
        "concept_prob": F_MxG,
        "delta_p_concept": F_MxG * ms.inv_size_G,
        "delta_ce": jnp.dot(ms.weights_M, dce_M),
        "delta_ce_ctx": dce_M,
        "kl": jnp.sum(dp_MxV * (logp_MxV - ref.logp_MxV), axis=-1) + extra_M,
        "entropy": -jnp.sum(dp_MxV * logp_MxV, axis=-1) - extra_M,
    }


def reference_of(logits_MxV, ms: Measure) -> Reference:
    """The Reference of unsteered logits."""
    logp_MxV = jax.nn.log_softmax(logits_MxV, axis=-1)
    p_MxV = jnp.exp(logp_MxV)
    return Reference(logp_MxV=logp_MxV, p_tokens_MxK=p_MxV[:, ms.tokens_K], F_MxG=p_MxV @ ms.onehot_VxG,
                     ce_M=-ms.target_log_prob(logp_MxV))


reference_from_logits = jax.jit(reference_of)


@functools.lru_cache(maxsize=64)
def reference_fn(fn):
    """jit((params, measure) -> Reference of fn at alpha = 0), one per closure."""

    def ref(params, ms: Measure):
        return reference_of(fn(params, jnp.zeros((), ms.onehot_VxG.dtype)), ms)

    return jax.jit(ref)
