"""The contract between models and the kernel: `Steered`, difference of means, and registries.

Shape legend: M = contexts/rows, V = vocabulary, D = residual width.

A model hands the kernel (and the optimiser) a `Steered(fn, params)` with
`fn(params, alpha) -> logits [M, V]` (docs/theory.md, Eq. 1). The kernel knows no model: a
model that has more structure declares it here, through two registries,

- `register_affine(fn)`: fn is exactly affine in alpha (logits l + alpha u, the UFM by
  Lemma B.2), so the kernel takes its closed-form affine path;
- `register_rowwise(fn, rowwise)`: `rowwise(params, alpha_M)` steers row j by alpha_M[j] in one
  pass, so the per-context optimiser needs one model evaluation instead of M;
- `register_head(fn, hidden, unembedding)`: fn ends in an unembedding (logits = h W^T, maybe
  soft-capped), so the kernel takes its head path: it never forms the [M, V] logits but walks
  the vocabulary in blocks, the head's product and the softmax sums together.

The registries are keyed by the function object, so `fn` must be stable (module level or
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
_HEADS: dict = {}


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


class Unembedding(NamedTuple):
    """What a head-declared closure's `unembedding(params)` returns (traced, alpha-free).

    logits = softcap * tanh(h W^T / softcap) (no cap: h W^T), with W [V, D] when vocab_axis is
    0 (transformers' layout, a tied embedding) or [D, V] when it is 1 (a Flax Dense kernel):
    the kernel slices vocabulary blocks out of W where it lies instead of transposing a copy.
    """

    W: Any
    vocab_axis: int = 0
    softcap: float | None = None


class Head(NamedTuple):
    """A closure's declared head: `hidden(params, alpha) -> h [M, D]` (the state the
    unembedding reads, after the final norm) and `unembedding(params) -> Unembedding`."""

    hidden: Callable[[Any, jax.Array], jax.Array]
    unembedding: Callable[[Any], Unembedding]


def register_head(fn, hidden: Callable, unembedding: Callable) -> None:
    """Declare fn(params, alpha) = head(hidden(params, alpha)) with an alpha-free unembedding.

    The kernel then evaluates the softmax quantities from h and W block by block over the
    vocabulary (`kernel.head`) and never holds the logits. hidden and unembedding must be
    stable (module level or memoised), like fn; tests hold fn against the two.
    """
    _HEADS[fn] = Head(hidden, unembedding)


def head_of(fn) -> Head | None:
    """The head `fn` was declared with (`register_head`), or None."""
    return _HEADS.get(fn)


def head_logits(unembedding: Unembedding, h_xD):
    """The logits a declared head gives for hidden states h [..., D] (the closure's own output)."""
    W = unembedding.W.astype(h_xD.dtype)
    y = h_xD @ (W.T if unembedding.vocab_axis == 0 else W)
    cap = unembedding.softcap
    return y if cap is None else jnp.tanh(y / cap) * cap


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


# ---------------------------------------------------------------- several steering terms
#
# A multi-term spec is k terms (v_i [D], layer l_i, positions_i); alpha is a vector [k] and at
# each layer l the residual gets h_l <- h_l + sum_{i: l_i = l} alpha_i v_i at the term's
# positions (Eq. 1, once per term). Its closures keep the scalar contract with alpha_k in place
# of alpha: `fn(params, alpha_k) -> logits [M, V]`, pure, memoised, everything else in params.
# A rowwise form of a multi closure takes alpha_Mxk (row j steered by alpha_Mxk[j]).

NORMS = ("raw", "unit", "residual", "preserve")
TERM_POSITIONS = ("all", "last")


def check_norm(norm) -> str:
    """The vector convention `normalize` names (one of NORMS), or a ValueError listing them."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"normalize must be one of {NORMS}, got {norm!r}")
    return norm


def scale_vector(v_D, norm: str, residual_norm=None) -> np.ndarray:
    """A steering vector under a norm convention, in float64.

    raw: v as it is (the paper's convention, alpha in units of v); unit: v / |v|; residual:
    v / |v| * residual_norm, so alpha counts median residual norms at the layer; preserve: v
    as it is (the closure rescales each steered residual to its unsteered norm instead).
    """
    norm = check_norm(norm)
    v = np.asarray(v_D, dtype=np.float64)
    if norm in ("raw", "preserve"):
        return v.copy()
    n = float(np.linalg.norm(v)) if v.size else 0.0
    if not (np.all(np.isfinite(v)) and np.isfinite(n) and n > 0):
        raise ValueError(f"normalize={norm!r} needs a finite, non-zero steering vector (|v| = {n!r})")
    if norm == "unit":
        return v / n
    r = None if residual_norm is None else float(residual_norm)
    if r is None or not (np.isfinite(r) and r > 0):
        raise ValueError(f"normalize='residual' needs a positive finite residual norm, got {residual_norm!r}")
    return v / n * r


def _safe_norm(x_xD):
    """|x| over the last axis with a finite derivative at x = 0 (the sqrt sees 1 there)."""
    sq = jnp.sum(jnp.square(x_xD), axis=-1, keepdims=True)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0), pos


def preserve_norm(h_xD, steered_xD):
    """`steered` rescaled row by row to the norm of `h` (norm-preserving steering).

    A row whose steered norm is 0 (padding) comes back unchanged; the denominators are made
    safe with jnp.where so values and forward/backward derivatives stay finite.
    """
    n_h, _ = _safe_norm(h_xD)
    n_s, pos = _safe_norm(steered_xD)
    return jnp.where(pos, steered_xD * (n_h / jnp.where(pos, n_s, 1)), steered_xD)


@functools.lru_cache(maxsize=64)
def scalar_of(fn):
    """A k = 1 multi closure as a scalar one: fn1(params, alpha) = fn(params, [alpha]).

    So a single term keeps the scalar kernel and its output keys; fn1 inherits fn's affine
    declaration and, through alpha_M[:, None], its rowwise form.
    """

    def fn1(params, alpha):
        return fn(params, jnp.reshape(alpha, (1,)))

    fn1.__qualname__ = f"scalar_of[{getattr(fn, '__qualname__', fn)}]"
    if is_affine(fn):
        register_affine(fn1)
    if fn in _ROWWISE:
        rowwise_k = _ROWWISE[fn]
        register_rowwise(fn1, lambda params, alpha_M: rowwise_k(params, alpha_M[:, None]))
    return fn1


def mask_rowwise(fn):
    """One-pass per-row alpha vectors for a transformer multi closure with one row per prompt.

    Such a closure (the GPT's, a pretrained model's) adds term i as alpha_i * mask_i * v_i with
    params["mask"] [k, 1 or B, ...] (axis 1 the prompt); scaling mask_i per prompt by
    alpha_Mxk[:, i] and calling at alpha = 1 steers prompt j by alpha_Mxk[j] in one pass.
    """

    def rowwise(params, alpha_Mxk):
        mask = params["mask"]
        scale = alpha_Mxk.T.reshape(alpha_Mxk.shape[::-1] + (1,) * (mask.ndim - 2))
        return fn({**params, "mask": scale * mask}, jnp.ones(alpha_Mxk.shape[1], alpha_Mxk.dtype))

    return rowwise


class Term(NamedTuple):
    """One steering term: alpha_i * vector [D] added at `layer`, at positions "all" or "last"."""

    vector: Any
    layer: int
    positions: str = "all"


def split_terms(terms) -> tuple[list, list, list]:
    """(vectors, layers, positions) of a sequence of Terms, the form the closures take."""
    terms = [Term(*t) if not isinstance(t, Term) else t for t in terms]
    return [t.vector for t in terms], [t.layer for t in terms], [t.positions for t in terms]


def check_vectors(vectors, width: int) -> np.ndarray:
    """Steering vectors [k, D] (float64): an array [k, D], a list of [D] vectors, or one [D]."""
    if isinstance(vectors, np.ndarray | jax.Array) and np.ndim(vectors) == 1:
        vectors = [vectors]
    rows = list(vectors) if not isinstance(vectors, np.ndarray | jax.Array) else list(np.asarray(vectors))
    if not rows:
        raise ValueError("vectors: at least one steering term is needed (k >= 1), got none")
    out = []
    for i, v in enumerate(rows):
        v = np.asarray(v)
        if v.shape != (width,):
            raise ValueError(f"steering vector {i} must have width {width} (the residual width), got shape {v.shape}")
        if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)) \
                or not np.all(np.isfinite(v)):
            raise ValueError(f"steering vector {i} must hold finite numbers")
        out.append(v.astype(np.float64))
    return np.stack(out)


def check_terms(vectors, layers, positions, width: int, num_layers: int):
    """Validated (vectors [k, D] float64, layers tuple, positions tuple) of a k-term spec.

    `layers` and `positions` are length-k sequences (or one int / one string for every term);
    a layer is a cut point in [0, num_layers]. Every error names the parameter and the term.
    """
    vectors_kxD = check_vectors(vectors, width)
    k = vectors_kxD.shape[0]
    if isinstance(layers, int | np.integer) and not isinstance(layers, bool):
        layers = [layers] * k
    if isinstance(positions, str):
        positions = [positions] * k
    layers, positions = list(layers), list(positions)
    if len(layers) != k or len(positions) != k:
        raise ValueError(f"one layer and one positions per term: vectors has {k} terms, layers {len(layers)}, "
                         f"positions {len(positions)}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, int | np.integer) or isinstance(layer, bool):
            raise ValueError(f"layer {layer!r} of term {i} must be an integer in [0, {num_layers}]")
        if not 0 <= layer <= num_layers:
            raise ValueError(f"layer {layer} of term {i} is outside [0, {num_layers}]")
    for i, p in enumerate(positions):
        if p not in TERM_POSITIONS:
            raise ValueError(f"positions {p!r} of term {i} must be one of {TERM_POSITIONS}")
    return vectors_kxD, tuple(int(x) for x in layers), tuple(positions)


def layer_groups(layers: tuple) -> dict:
    """{layer: indices of the terms added there}, the static plan of a multi closure."""
    groups: dict = {}
    for i, layer in enumerate(layers):
        groups.setdefault(layer, []).append(i)
    return {layer: tuple(idx) for layer, idx in sorted(groups.items())}


def add_terms(h_xD, alpha_k, vectors_kxD, mask_kx, idx: tuple, preserve: bool = False):
    """h + sum_{i in idx} alpha_i mask_i v_i (Eq. 1 for each term added at this layer).

    mask_kx [k, ...] says where (and, for rowwise forms, how strongly) term i acts; with
    `preserve`, each position some term touches is rescaled to its norm before the addition.
    """
    sel = np.asarray(idx)
    coeff = alpha_k[sel].reshape((-1,) + (1,) * (mask_kx.ndim - 1)) * mask_kx[sel]
    steered = h_xD + jnp.einsum("n...,nd->...d", coeff, vectors_kxD[sel])
    if not preserve:
        return steered
    touched = jnp.any(mask_kx[sel] != 0, axis=0)[..., None]
    return jnp.where(touched, preserve_norm(h_xD, steered), steered)


# ---------------------------------------------------------------- a multi closure of no model

@register_affine
def linear_multi_logits(params, alpha_k):
    """Logits affine in alpha_k: base [M, V] + sum_i alpha_i directions_i [M, V] (a toy)."""
    return params["base"] + jnp.tensordot(alpha_k, params["directions"], axes=1)


def linear_multi_rowwise(params, alpha_Mxk):
    """`linear_multi_logits` with row j at alpha_Mxk[j]."""
    return params["base"] + jnp.einsum("mk,kmv->mv", alpha_Mxk, params["directions"])


register_rowwise(linear_multi_logits, linear_multi_rowwise)


def linear_multi_steered(base_MxV, directions_kxMxV) -> Steered:
    """`alpha_k -> base + tensordot(alpha_k, directions)`, directions [k, M, V]."""
    base, directions = jnp.asarray(base_MxV), jnp.asarray(directions_kxMxV)
    if directions.ndim != 3 or directions.shape[1:] != base.shape:
        raise ValueError(f"directions must be [k, M, V] with [M, V] = {tuple(base.shape)}, "
                         f"got shape {tuple(directions.shape)}")
    return Steered(linear_multi_logits, {"base": base, "directions": directions})
