"""The alpha-sweep kernel shared by every model.

Shape legend: A = alphas of the grid, C = alphas of one chunk, M = rows (contexts or text
positions), V = vocabulary, Vb = tokens of one vocabulary block, G = concepts, K = tracked
tokens, k = columns of the affine path's moment matrix.

A model hands the kernel a `Steered` closure `fn(params, alpha) -> logits_MxV`. The kernel
jit-compiles once per (closure, shapes) and walks the grid chunk by chunk, so that memory
depends on the chunk, never on the grid. Every reduction (tracked tokens, concept sums, CE,
KL, entropy) happens inside the kernel, so a [C, M, V] array never leaves the device. Three
paths, equal to rounding (tests/test_bench.py holds them to 1e-11 in float64):

- "taylor" (any closure, e.g. a GPT): the point function for ONE alpha, vmapped over a chunk;
  forward mode (`jax.jvp`, nested for the second derivative) through the MODEL only, then the
  softmax quantities differentiated in closed form from x, x', x'' (`_taylor_quantities`).
  Chunks are sized by the closure's largest intermediate, not only its logits.
- "affine" (closures in AFFINE_CLOSURES: the UFM, `linear_logits`): logits are l + alpha u,
  so every quantity and both derivatives are closed forms in a few sums over the vocabulary
  (THEORY.md), read off ONE matrix product e @ B of the unnormalised probabilities
  e = exp(logits - max) with a fixed matrix B of centred moments: one exponential per
  element, no autodiff. The most likely token comes from the exact upper envelope of the
  lines l_z + alpha u_z (no max pass) and is left out of the sums, so nothing cancels where
  the distribution concentrates (tested from alpha = -1e6 to 1e6). The vocabulary is walked
  in cache-sized blocks.
- "jvp": the reference, nested `jax.jvp` through everything (`method="jvp"`).

The alpha axis of each chunk is sharded over all visible devices (a 1-D `jax.sharding.Mesh`
and `NamedSharding`): with one device this is the plain single-device computation, and the
same code runs on many GPUs, a TPU slice or several hosts under `jax.distributed` (each
process passes the same grid and receives the whole result).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ufmjax import steering
from ufmjax.steering import Steered

# Quantities the kernel returns per alpha, with their per-alpha shapes.
QUANTITIES = {
    "delta_p": "MxK",          # steered minus base probability of each tracked token
    "concept_prob": "MxG",     # F_C(alpha) = sum_{z in C} p_alpha(z)
    "delta_p_concept": "MxG",  # Def. 3.5: (F_C(alpha) - F_C(0)) / |C|
    "delta_ce": "",            # Def. 3.7: sum_j w_j (CE_j(alpha) - CE_j(0))
    "delta_ce_ctx": "M",       # CE_j(alpha) - CE_j(0), per row
    "kl": "M",                 # KL(p_alpha || p_0) per row
    "entropy": "M",            # H(p_alpha) per row
}

# Elements of one [C, M, V] intermediate the default chunk size aims at (8 MiB in float32): a
# dozen such arrays live at once with second derivatives; larger chunks fall out of the CPU's
# caches and run slower, not faster (measured on a GPT: 2.4x slower at 4x the size).
CHUNK_ELEMENTS = 1 << 21
MAX_CHUNK = 512
METHODS = ("auto", "affine", "taylor", "jvp")

# Incremented each time the kernel is traced: tests use it to prove "no recompilation".
TRACE_COUNT = 0


def check_alphas(alphas) -> np.ndarray:
    """A 1-D, non-empty, finite alpha grid (as float64 numpy), else ValueError naming alphas."""
    arr = np.asarray(alphas, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"alphas must be a non-empty 1-D grid, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("alphas must be finite (found NaN or inf)")
    return arr


def parse_alphas(spec: str) -> np.ndarray:
    """'START:STOP:NUM' -> NUM evenly spaced alphas from START to STOP, both included."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"alphas must be START:STOP:NUM, got {spec!r}")
    try:
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"alphas must be START:STOP:NUM with numbers, got {spec!r}") from None
    if num < 1:
        raise ValueError(f"alphas NUM must be >= 1, got {num}")
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ValueError(f"alphas START and STOP must be finite, got {spec!r}")
    if num > 1 and stop <= start:
        raise ValueError(f"alphas STOP must exceed START (the grid is increasing), got {spec!r}")
    return check_alphas(np.linspace(start, stop, num))


def _quantities(logits_MxV, base, consts, label_targets: bool):
    """Every quantity of the theory at one alpha, reduced to at most [M, max(K, G)]."""
    logp_MxV = jax.nn.log_softmax(logits_MxV, axis=-1)
    return _values(logp_MxV, jnp.exp(logp_MxV), base, consts, label_targets)


def _values(logp_MxV, p_MxV, base, consts, label_targets: bool):
    tokens_K = consts["tokens"]
    F_MxG = p_MxV @ consts["onehot"]
    if label_targets:
        ce_M = -jnp.take_along_axis(logp_MxV, consts["targets"][:, None], axis=-1)[:, 0]
    else:
        ce_M = -jnp.sum(consts["targets"] * logp_MxV, axis=-1)
    dce_M = ce_M - base["ce"]
    return {
        "delta_p": p_MxV[:, tokens_K] - base["p_tokens"],
        "concept_prob": F_MxG,
        "delta_p_concept": (F_MxG - base["F"]) * consts["inv_size"],
        "delta_ce": jnp.dot(consts["weights"], dce_M),
        "delta_ce_ctx": dce_M,
        # p log p is taken as 0 where p underflows (alpha = +-1e6), never 0 * -inf.
        "kl": jnp.sum(p_MxV * (logp_MxV - base["logp"]), axis=-1),
        "entropy": -jnp.sum(p_MxV * logp_MxV, axis=-1),
    }


def _derivative_tree(dp_MxV, dlogp_MxV, extra_M, logp_MxV, base, consts, label_targets: bool):
    """One derivative of every quantity, from p^(k) = dp and (log p)^(k) = dlogp.

    `extra_M` is the part of KL^(k) and -H^(k) that is not sum_z p^(k) (log p - ...): 0 for
    the first derivative, Var(dx) for the second (from differentiating log p itself).
    """
    F_MxG = dp_MxV @ consts["onehot"]
    if label_targets:
        dce_M = -jnp.take_along_axis(dlogp_MxV, consts["targets"][:, None], axis=-1)[:, 0]
    else:
        dce_M = -jnp.sum(consts["targets"] * dlogp_MxV, axis=-1)
    return {
        "delta_p": dp_MxV[:, consts["tokens"]],
        "concept_prob": F_MxG,
        "delta_p_concept": F_MxG * consts["inv_size"],
        "delta_ce": jnp.dot(consts["weights"], dce_M),
        "delta_ce_ctx": dce_M,
        "kl": jnp.sum(dp_MxV * (logp_MxV - base["logp"]), axis=-1) + extra_M,
        "entropy": -jnp.sum(dp_MxV * logp_MxV, axis=-1) - extra_M,
    }


def _taylor_quantities(jets, base, consts, label_targets: bool):
    """Quantities and their derivatives from the logits' own Taylor coefficients in alpha.

    With x = logits, x' and x'' their first two derivatives (forward mode through the model
    only), the softmax part is differentiated by hand: (log p)' = g = x' - E[x'],
    (log p)'' = g2 = x'' - E[x''] - Var(x'), p' = p g, p'' = p (g^2 + g2). This is the chain
    rule the nested jvp through `_quantities` would apply, without pushing two tangents
    through every reduction of it (they cost more than the model on a large vocabulary).
    """
    x_MxV = jets[0]
    logp_MxV = jax.nn.log_softmax(x_MxV, axis=-1)
    p_MxV = jnp.exp(logp_MxV)
    out = [_values(logp_MxV, p_MxV, base, consts, label_targets)]
    if len(jets) == 1:
        return tuple(out)
    dx_MxV = jets[1]
    g_MxV = dx_MxV - jnp.sum(p_MxV * dx_MxV, axis=-1, keepdims=True)
    pg_MxV = p_MxV * g_MxV
    zero_M = jnp.zeros(x_MxV.shape[:1], x_MxV.dtype)
    out.append(_derivative_tree(pg_MxV, g_MxV, zero_M, logp_MxV, base, consts, label_targets))
    if len(jets) == 2:
        return tuple(out)
    var_M = jnp.sum(pg_MxV * g_MxV, axis=-1)
    d2x_MxV = jets[2]
    g2_MxV = d2x_MxV - (jnp.sum(p_MxV * d2x_MxV, axis=-1) + var_M)[:, None]
    q_MxV = p_MxV * (g_MxV * g_MxV + g2_MxV)
    out.append(_derivative_tree(q_MxV, g2_MxV, var_M, logp_MxV, base, consts, label_targets))
    return tuple(out)


def closure_jets(fn, params, alpha, order: int):
    """(x, dx/dalpha, d2x/dalpha2)[: order + 1] of the logits, by nested forward mode."""
    one = jnp.ones_like(alpha)
    if order == 0:
        return (fn(params, alpha),)

    def f1(a):
        return jax.jvp(lambda b: fn(params, b), (a,), (one,))

    if order == 1:
        return f1(alpha)
    # The tangent of (x, x') is (x', x''); XLA merges the two copies of x'.
    (x, dx), (_, d2x) = jax.jvp(f1, (alpha,), (one,))
    return x, dx, d2x


def _base_state(fn, params, consts, label_targets: bool):
    """Unsteered (alpha = 0) reference values every steered quantity is measured against."""
    logits_MxV = fn(params, jnp.zeros((), consts["onehot"].dtype))
    logp_MxV = jax.nn.log_softmax(logits_MxV, axis=-1)
    p_MxV = jnp.exp(logp_MxV)
    if label_targets:
        ce_M = -jnp.take_along_axis(logp_MxV, consts["targets"][:, None], axis=-1)[:, 0]
    else:
        ce_M = -jnp.sum(consts["targets"] * logp_MxV, axis=-1)
    return {"logp": logp_MxV, "p_tokens": p_MxV[:, consts["tokens"]],
            "F": p_MxV @ consts["onehot"], "ce": ce_M}


@functools.lru_cache(maxsize=64)
def _base_fn(fn):
    return jax.jit(functools.partial(_base_state, fn), static_argnames=("label_targets",))


def _count_trace():
    global TRACE_COUNT
    TRACE_COUNT += 1


@functools.lru_cache(maxsize=64)
def _chunk_fn(fn, order: int, label_targets: bool):
    """jit(vmap(point)) for one closure: values and `order` derivatives in alpha.

    The generic kernel (any closure): forward mode through the model for x', x'', then the
    softmax quantities differentiated in closed form (`_taylor_quantities`).
    """

    def point(alpha, params, base, consts):
        return _taylor_quantities(closure_jets(fn, params, alpha, order), base, consts, label_targets)

    def chunk(alphas_C, params, base, consts):
        _count_trace()
        return jax.vmap(point, in_axes=(0, None, None, None))(alphas_C, params, base, consts)

    return jax.jit(chunk)


@functools.lru_cache(maxsize=64)
def _jvp_chunk_fn(fn, order: int, label_targets: bool):
    """The reference kernel: nested jax.jvp through the whole of `_quantities` (method="jvp")."""

    def point(alpha, params, base, consts):
        def f(a):
            return _quantities(fn(params, a), base, consts, label_targets)

        one = jnp.ones_like(alpha)
        if order == 0:
            return (f(alpha),)
        if order == 1:
            return jax.jvp(f, (alpha,), (one,))

        def f_and_slope(a):
            return jax.jvp(f, (a,), (one,))

        # Nested forward mode: the tangent of (f, f') is (f', f'').
        (y, dy), (_, d2y) = jax.jvp(f_and_slope, (alpha,), (one,))
        return y, dy, d2y

    def chunk(alphas_C, params, base, consts):
        _count_trace()
        return jax.vmap(point, in_axes=(0, None, None, None))(alphas_C, params, base, consts)

    return jax.jit(chunk)


# ---------------------------------------------------------------- closures linear in alpha

# Closures whose logits are exactly l + alpha * u (the UFM, Lemma B.2). For them the kernel
# takes the "affine" path below; `register_affine` adds a closure of your own.
AFFINE_CLOSURES = {steering.ufm_logits, steering.linear_logits}
# The affine path carries 3 columns per concept in its moment matrix; beyond this many
# concepts the generic path is cheaper.
AFFINE_MAX_CONCEPTS = 64
# The affine kernel's block of e: [rows, alphas, VOCAB_BLOCK tokens] near AFFINE_BLOCK elements
# (8 MiB in float32), small enough to stay in cache between the exp and the product e @ B.
AFFINE_BLOCK = 1 << 21
VOCAB_BLOCK = 2048
# Smallest padded size of the upper envelope (vertices per row) the affine kernel compiles for.
ENVELOPE_PAD = 64


def register_affine(fn):
    """Declare `fn(params, alpha)` exactly affine in alpha, so sweeps take the affine path."""
    AFFINE_CLOSURES.add(fn)
    return fn


@functools.lru_cache(maxsize=64)
def _affine_parts_fn(fn, order: int, label_targets: bool):
    """(params, targets, onehot, tokens) -> l, u and the per-row constants of the affine path.

    l = logits at 0, u = d logits / d alpha (one jvp: exact for an affine closure). The moment
    matrix B [M, V, k] holds, per token, 1, w, w^2, w^3 (w = u - centre), lam, lam w, lam w^2
    (lam = l - centre) and the concept indicators times 1, w, w^2, so that ONE matrix product
    e @ B of the unnormalised probabilities e = exp(l + alpha u - max) gives every sum over
    the vocabulary the quantities and their derivatives need (columns used up to `order`).
    """

    def parts(params, targets, onehot_VxG, tokens_K):
        zero = jnp.zeros((), onehot_VxG.dtype)
        l_MxV, u_MxV = jax.jvp(lambda a: fn(params, a), (zero,), (jnp.ones_like(zero),))
        u_MxV = jnp.broadcast_to(u_MxV, l_MxV.shape)
        # Centred columns: moments about a per-row centre lose no digits to |u| or |l|.
        umax, umin = u_MxV.max(axis=1), u_MxV.min(axis=1)
        cu = 0.5 * (umax + umin)
        cl = 0.5 * (l_MxV.max(axis=1) + l_MxV.min(axis=1))
        w = u_MxV - cu[:, None]
        lam = l_MxV - cl[:, None]
        M, V = l_MxV.shape
        cols = [jnp.ones_like(w)[..., None], w[..., None], lam[..., None],
                jnp.broadcast_to(onehot_VxG, (M,) + onehot_VxG.shape)]
        if order >= 1:
            cols += [(w * w)[..., None], (lam * w)[..., None], w[..., None] * onehot_VxG]
        if order >= 2:
            cols += [(w * w * w)[..., None], (lam * w * w)[..., None], (w * w)[..., None] * onehot_VxG]
        if label_targets:
            T = jnp.ones((M,), l_MxV.dtype)
            tl = jnp.take_along_axis(l_MxV, targets[:, None], axis=1)[:, 0]
            tu = jnp.take_along_axis(u_MxV, targets[:, None], axis=1)[:, 0]
        else:
            T = targets.sum(axis=1)
            tl = jnp.sum(targets * l_MxV, axis=1)
            tu = jnp.sum(targets * u_MxV, axis=1)
        # The vocabulary in blocks of Vb (zero rows of B pad the last one): the kernel's
        # exp / product pass then stays in cache whatever V is.
        B_MxVxk = jnp.concatenate(cols, axis=-1)
        Vb = min(V, VOCAB_BLOCK)
        nb = -(-V // Vb)
        B_MxNxVbxk = jnp.pad(B_MxVxk, ((0, 0), (0, nb * Vb - V), (0, 0))).reshape(M, nb, Vb, -1)
        return {"l": l_MxV, "u": u_MxV, "B": B_MxNxVbxk,
                "cu": cu, "cl": cl, "umax": umax, "umin": umin,
                "l_tok": l_MxV[:, tokens_K], "u_tok": u_MxV[:, tokens_K], "T": T, "tl": tl, "tu": tu}

    return jax.jit(parts)


def upper_envelope(l_MxV, u_MxV):
    """The tokens that attain max_z (l_z + alpha u_z) as alpha runs over R, per row (exact).

    max_z (l_z + alpha u_z) is the upper envelope of V lines: its pieces are the vertices of
    the upper convex hull of the points (u_z, l_z), in increasing u, and it changes from
    vertex i to i + 1 at alpha = (l_i - l_{i+1}) / (u_{i+1} - u_i). Only Pareto-optimal points
    can be vertices, so a vectorised pass keeps those and a short monotone chain finishes.
    Returns (breaks [M, H - 1] increasing, +inf padded; vertices [M, H] token ids): the most
    likely token at alpha is vertices[sum(breaks <= alpha)]. Computed in float64 numpy.
    """
    l_MxV, u_MxV = np.asarray(l_MxV, np.float64), np.asarray(u_MxV, np.float64)
    hulls = []
    for l_V, u_V in zip(l_MxV, u_MxV):
        order = np.lexsort((-l_V, u_V))                 # u ascending, larger l first on ties
        us, ls = u_V[order], l_V[order]
        keep = np.ones(us.size, bool)
        keep[1:] = us[1:] != us[:-1]                    # one point per u: the largest l
        order, us, ls = order[keep], us[keep], ls[keep]
        after = np.append(np.maximum.accumulate(ls[::-1])[::-1][1:], -np.inf)
        before = np.insert(np.maximum.accumulate(ls)[:-1], 0, -np.inf)
        cand = np.flatnonzero((ls > after) | (ls > before))
        hull: list[int] = []
        for i in cand:                                  # Andrew's monotone chain, upper part
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (us[b] - us[a]) * (ls[i] - ls[a]) - (ls[b] - ls[a]) * (us[i] - us[a]) >= 0:
                    hull.pop()
                else:
                    break
            hull.append(i)
        h = np.asarray(hull)
        hulls.append((order[h], (ls[h[:-1]] - ls[h[1:]]) / (us[h[1:]] - us[h[:-1]])))
    H = max(len(v) for v, _ in hulls)
    # Pad to a few fixed sizes, so that another model of the same shapes reuses the kernel.
    V = l_MxV.shape[1]
    H = min(V, max(ENVELOPE_PAD, 1 << (H - 1).bit_length()))
    verts = np.stack([np.concatenate([v, np.full(H - v.size, v[-1])]) for v, _ in hulls])
    breaks = np.stack([np.concatenate([b, np.full(H - 1 - b.size, np.inf)]) for _, b in hulls])
    return breaks, verts


def _affine_stats(alphas_C, aff, row_block: int):
    """Per (alpha, row): the most likely token z* and the moment sums of all OTHER tokens.

    Returns idx [C, M] (z*, from the upper envelope: no pass over the vocabulary), and
    R [C, M, k] = e @ B with e_z = exp((l_z - l*) + alpha (u_z - u*)) for z != z* (e_z* = 1 is
    added back in closed form): one exponential per element. Leaving z* out keeps the moments
    exact where the distribution concentrates (|alpha| large): there the other tokens' sums
    are tiny and nothing cancels against z*'s unit mass. Rows are walked `row_block` at a time
    and the vocabulary one block of Vb tokens at a time (a scan accumulating e @ B), so the
    [rows, C, Vb] block of e stays near AFFINE_BLOCK elements, in cache, whatever M and V are.
    """
    l_MxV, u_MxV, B = aff["l"], aff["u"], aff["B"]
    M, V = l_MxV.shape
    nb, Vb = B.shape[1], B.shape[2]
    C = alphas_C.shape[0]
    piece_CxM = jnp.sum(aff["breaks"][None] <= alphas_C[:, None, None], axis=-1)
    idx_MxC = jnp.take_along_axis(aff["verts"], piece_CxM.T, axis=1)
    ls_MxC = jnp.take_along_axis(l_MxV, idx_MxC, axis=1)
    us_MxC = jnp.take_along_axis(u_MxV, idx_MxC, axis=1)
    pad = ((0, 0), (0, nb * Vb - V))
    l_MxNxVb = jnp.pad(l_MxV, pad).reshape(M, nb, Vb)
    u_MxNxVb = jnp.pad(u_MxV, pad).reshape(M, nb, Vb)

    def row(args):
        l_NxVb, u_NxVb, B_NxVbxk, idx_C, ls_C, us_C = args

        def block(acc_Cxk, blk):
            j, l_Vb, u_Vb, B_Vbxk = blk
            d_CxVb = (l_Vb[None, :] - ls_C[:, None]) + alphas_C[:, None] * (u_Vb[None, :] - us_C[:, None])
            tok_Vb = j * Vb + jnp.arange(Vb)
            skip_CxVb = (tok_Vb[None, :] == idx_C[:, None]) | (tok_Vb[None, :] >= V)
            e_CxVb = jnp.where(skip_CxVb, 0.0, jnp.exp(d_CxVb))
            return acc_Cxk + e_CxVb @ B_Vbxk, None

        acc = jnp.zeros((C, B_NxVbxk.shape[-1]), l_NxVb.dtype)
        return jax.lax.scan(block, acc, (jnp.arange(nb), l_NxVb, u_NxVb, B_NxVbxk))[0]

    R_MxCxk = jax.lax.map(row, (l_MxNxVb, u_MxNxVb, B, idx_MxC, ls_MxC, us_MxC), batch_size=row_block)
    return idx_MxC.T, jnp.swapaxes(R_MxCxk, 0, 1)


def _star_moments(alphas_C, idx_CxM, R_CxMxk, aff, consts, order: int):
    """Sums over the vocabulary about z*: w = u - u*, lam = l - l* (binomial re-centring of R)."""
    G = consts["onehot"].shape[1]
    rows = jnp.arange(idx_CxM.shape[1])[None, :]
    ls, us = aff["l"][rows, idx_CxM], aff["u"][rows, idx_CxM]
    du, dl = us - aff["cu"], ls - aff["cl"]     # z*'s offsets from the fixed centres of B
    R0, Rw, Rl = R_CxMxk[..., 0], R_CxMxk[..., 1], R_CxMxk[..., 2]
    RC = R_CxMxk[..., 3:3 + G]
    m = {"ls": ls, "us": us, "S0": 1.0 + R0, "A1": Rw - du * R0, "L1": Rl - dl * R0,
         "C0": RC + consts["onehot"][idx_CxM]}
    if order >= 1:
        k = 3 + G
        Rww, Rlw, RCw = R_CxMxk[..., k], R_CxMxk[..., k + 1], R_CxMxk[..., k + 2:k + 2 + G]
        m["A2"] = Rww - 2.0 * du * Rw + du * du * R0
        m["L11"] = Rlw - du * Rl - dl * Rw + dl * du * R0
        m["C1"] = RCw - du[..., None] * RC
    if order >= 2:
        k = 5 + 2 * G
        Rwww, Rlww, RCww = R_CxMxk[..., k], R_CxMxk[..., k + 1], R_CxMxk[..., k + 2:k + 2 + G]
        m["A3"] = Rwww - 3.0 * du * Rww + 3.0 * du * du * Rw - du ** 3 * R0
        m["L12"] = Rlww - 2.0 * du * Rlw + du * du * Rl - dl * m["A2"]
        m["C2"] = RCww - 2.0 * du[..., None] * RCw + (du * du)[..., None] * RC
    return m


def _affine_quantities(alphas_C, idx_CxM, R_CxMxk, aff, base, consts, order: int):
    """Every quantity and its derivatives from the moment sums (closed forms, THEORY.md).

    With mu = E[u] - u*, Var = Var(u), m3 = E[(u - E u)^3], log Z = l* + alpha u* + log S0:
    p_z = exp(l_z - l* + alpha (u_z - u*)) / S0, p_z' = p_z (u_z - E u),
    p_z'' = p_z ((u_z - E u)^2 - Var); CE' = T E[u] - sum t u, CE'' = T Var (Thm 3.8);
    H = log S0 - E[(l - l*) + alpha (u - u*)], H' = -Cov(l, u) - alpha Var,
    H'' = -E[(l - E l)(u - E u)^2] - Var - alpha m3; KL = -H - E[l] + log Z_0,
    KL' = alpha Var, KL'' = Var + alpha m3.
    """
    m = _star_moments(alphas_C, idx_CxM, R_CxMxk, aff, consts, order)
    a = alphas_C[:, None]
    S0, ls, us = m["S0"], m["ls"], m["us"]
    inv = 1.0 / S0
    logS0 = jnp.log(S0)
    mw, ml = m["A1"] * inv, m["L1"] * inv
    # E[u] lies in [min u, max u]: clipping keeps the sign of u_z - E[u] exact at the ends,
    # where Thm 3.3's monotone tokens are checked.
    Eu = jnp.clip(us + mw, aff["umin"], aff["umax"])
    d_tok = (aff["l_tok"][None] - ls[..., None]) + a[..., None] * (aff["u_tok"][None] - us[..., None])
    p_tok = jnp.exp(d_tok - logS0[..., None])
    F = m["C0"] * inv[..., None]
    ce = aff["T"] * logS0 - (aff["tl"] - aff["T"] * ls) - a * (aff["tu"] - aff["T"] * us)
    dce = ce - base["ce"]
    H = jnp.maximum(logS0 - (m["L1"] + a * m["A1"]) * inv, 0.0)
    w = consts["weights"]
    out = [{
        "delta_p": p_tok - base["p_tokens"],
        "concept_prob": F,
        "delta_p_concept": (F - base["F"]) * consts["inv_size"],
        "delta_ce": dce @ w,
        "delta_ce_ctx": dce,
        "kl": jnp.maximum(-H - (ls + ml) + base["logZ"], 0.0),
        "entropy": H,
    }]
    if order == 0:
        return tuple(out)
    A2, L11 = m["A2"] * inv, m["L11"] * inv
    var = jnp.maximum(A2 - mw * mw, 0.0)
    cov = L11 - ml * mw
    g_tok = aff["u_tok"][None] - Eu[..., None]
    dF = (m["C1"] - mw[..., None] * m["C0"]) * inv[..., None]
    dce = aff["T"] * mw - (aff["tu"] - aff["T"] * us)
    out.append({
        "delta_p": p_tok * g_tok,
        "concept_prob": dF,
        "delta_p_concept": dF * consts["inv_size"],
        "delta_ce": dce @ w,
        "delta_ce_ctx": dce,
        "kl": a * var,
        "entropy": -cov - a * var,
    })
    if order == 1:
        return tuple(out)
    A3, L12 = m["A3"] * inv, m["L12"] * inv
    m3 = A3 - 3.0 * mw * A2 + 2.0 * mw ** 3
    lww = L12 - 2.0 * mw * L11 - ml * A2 + 2.0 * ml * mw * mw
    d2F = ((m["C2"] - 2.0 * mw[..., None] * m["C1"] + (mw * mw)[..., None] * m["C0"]) * inv[..., None]
           - var[..., None] * F)
    d2ce = aff["T"] * var
    out.append({
        "delta_p": p_tok * (g_tok * g_tok - var[..., None]),
        "concept_prob": d2F,
        "delta_p_concept": d2F * consts["inv_size"],
        "delta_ce": d2ce @ w,
        "delta_ce_ctx": d2ce,
        "kl": var + a * m3,
        "entropy": -lww - var - a * m3,
    })
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _affine_base_fn(row_block: int):
    """The alpha = 0 reference of the affine path, by the same arithmetic as its sweep."""

    def base(aff, consts):
        zero = jnp.zeros((1,), aff["l"].dtype)
        idx, R = _affine_stats(zero, aff, row_block)
        m = _star_moments(zero, idx, R, aff, consts, 0)
        logS0 = jnp.log(m["S0"][0])
        ls = m["ls"][0]
        return {"logZ": ls + logS0, "p_tokens": jnp.exp(aff["l_tok"] - (ls + logS0)[:, None]),
                "ce": aff["T"] * logS0 - (aff["tl"] - aff["T"] * ls), "F": m["C0"][0] / m["S0"][0][:, None]}

    return jax.jit(base)


@functools.lru_cache(maxsize=64)
def _affine_chunk_fn(order: int, row_block: int):
    """The affine kernel for a chunk of alphas: stats by one matrix product, then closed forms."""

    def chunk(alphas_C, aff, base, consts):
        _count_trace()
        idx, R = _affine_stats(alphas_C, aff, row_block)
        return _affine_quantities(alphas_C, idx, R, aff, base, consts, order)

    return jax.jit(chunk)


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x),
        tree)


def default_affine_chunk_size(vocab: int, num_devices: int = 1) -> int:
    """Alphas per call of the affine kernel: a [C, Vb] block of e near AFFINE_BLOCK elements.

    The affine kernel walks rows and vocabulary blocks inside a call, so its chunk depends on
    neither M nor V beyond the block; a long chunk keeps its product e @ B efficient.
    """
    per_device = max(64, min(4096, AFFINE_BLOCK // max(1, min(vocab, VOCAB_BLOCK))))
    return per_device * num_devices


def default_chunk_size(num_rows: int, vocab: int, num_devices: int = 1, intermediate: int = 0,
                       order: int = 0) -> int:
    """Largest chunk keeping one [C, M, V] intermediate near CHUNK_ELEMENTS, per device.

    `intermediate`: elements of the closure's largest intermediate for one alpha (a GPT's
    [B, T, 4 D] activations can dwarf its [M, V] logits); the chunk is sized to the larger.
    `order`: derivatives asked for; forward mode carries order + 1 streams through the model.
    """
    per_alpha = max(1, num_rows * vocab, intermediate) * (order + 1)
    per_device = max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // per_alpha))
    return per_device * num_devices


def largest_intermediate(fn, params, dtype) -> tuple[int, tuple]:
    """(elements of the largest array `fn(params, alpha)` computes, shape of its output)."""
    closed = jax.make_jaxpr(fn)(params, jnp.zeros((), dtype))

    def walk(jaxpr) -> int:
        best = 0
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                best = max(best, math.prod(getattr(v.aval, "shape", ())))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        best = max(best, walk(sub.jaxpr))
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        best = max(best, walk(sub))
        return best

    return walk(closed.jaxpr), tuple(closed.out_avals[0].shape) if len(closed.out_avals) == 1 else None


def _place(tree, sharding):
    """Put host or device arrays on `sharding`. Several processes (jax.distributed) each hold
    the same values, so every process builds the global array from its own copy."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def _to_host(value) -> np.ndarray:
    """A kernel result as numpy, gathered from every process when it spans several hosts."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def top_tokens(steered: Steered, alphas, k: int) -> np.ndarray:
    """The k tokens of largest mean steered probability at the grid's largest |alpha| (Fig. 6)."""
    alphas = check_alphas(alphas)
    a = alphas[np.argmax(np.abs(alphas))]
    logits = steered.fn(steered.params, jnp.asarray(a, jnp.result_type(float)))
    mean_p = np.asarray(jax.nn.softmax(logits, axis=-1).mean(axis=0))
    if not 1 <= k <= mean_p.size:
        raise ValueError(f"top_k must be in [1, {mean_p.size}], got {k}")
    return np.sort(np.argsort(-mean_p, kind="stable")[:k])


def sweep(steered: Steered, alphas, *, concept_of, ce_target=None, weights=None, tokens=None,
          derivatives: int = 2, chunk_size: int | None = None, dtype=jnp.float32,
          devices=None, method: str = "auto") -> dict[str, np.ndarray]:
    """Sweep a steered model over an alpha grid.

    Args:
      steered: the model's `alpha -> logits [M, V]` closure.
      alphas: 1-D grid of steering strengths (any length; processed in chunks).
      concept_of: [V] concept index of each token (concepts 0..G-1).
      ce_target: what cross-entropy is measured against: None for the model's own unsteered
        distribution (Assumption 2), a float [M, V] table of next-token distributions, or an
        int [M] array of observed next tokens (held-out text).
      weights: [M] weights of the rows in delta_ce (context probabilities pi); uniform by default.
      tokens: [K] token ids to report delta_p for; all V tokens by default.
      derivatives: 0, 1 or 2: how many derivatives in alpha to return (forward-mode autodiff).
      chunk_size: alphas per compiled call; by default sized to the problem and a multiple of
        the device count. Results do not depend on it.
      dtype: float32 (default) or float64 (requires jax_enable_x64).
      devices: devices to shard the alpha axis over; all visible devices by default.
      method: "auto" (default): "affine" for closures in AFFINE_CLOSURES (the UFM: one
        exponential per element, derivatives in closed form), else "taylor" (forward mode
        through the model, the softmax part in closed form); "jvp" is the reference that
        pushes nested jvp through everything. All agree to rounding.
    Returns:
      dict of numpy arrays: `alphas` [A], `tokens` [K], `concept_of` [V], `weights` [M],
      `probs_base` [M, V], and for each name of QUANTITIES its values `[A, ...]`, with
      `d_<name>` and `d2_<name>` for the derivatives that were asked for.
    """
    alphas = check_alphas(alphas)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax_enable_x64 (ufmjax sweep --float64 sets it)")
    if derivatives not in (0, 1, 2):
        raise ValueError(f"derivatives must be 0, 1 or 2, got {derivatives!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    fn = steered.fn
    params = _cast_floats(steered.params, dtype)
    intermediate, out_shape = largest_intermediate(fn, params, dtype)
    if out_shape is None or len(out_shape) != 2:
        raise ValueError(f"the steered closure must return logits [M, V], got shape {out_shape}")
    M, V = out_shape

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
    if weights is None:
        weights = np.full(M, 1.0 / M)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (M,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be {M} finite non-negative numbers")

    if ce_target is None:
        targets = jax.nn.softmax(fn(params, jnp.zeros((), dtype)), axis=-1)
        label_targets = False
    else:
        targets = np.asarray(ce_target)
        label_targets = np.issubdtype(targets.dtype, np.integer)
        if label_targets:
            if targets.shape != (M,) or targets.min() < 0 or targets.max() >= V:
                raise ValueError(f"ce_target labels must be {M} token ids in [0, {V})")
            targets = jnp.asarray(targets, jnp.int32)
        else:
            if targets.shape != (M, V) or not np.all(np.isfinite(targets)):
                raise ValueError(f"ce_target must be a finite [{M}, {V}] table or {M} labels")
            targets = jnp.asarray(targets, dtype)

    consts = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "onehot": jnp.asarray(np.eye(G)[concept_of], dtype),
        "inv_size": jnp.asarray(1.0 / sizes, dtype),
        "targets": targets,
        "weights": jnp.asarray(weights, dtype),
    }
    base = _base_fn(fn)(params, consts, label_targets=label_targets)
    if method == "auto":
        method = "affine" if fn in AFFINE_CLOSURES and G <= AFFINE_MAX_CONCEPTS else "taylor"

    devices = list(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    if chunk_size is None:
        chunk_size = (default_affine_chunk_size(V, n_dev) if method == "affine"
                      else default_chunk_size(M, V, n_dev, intermediate, derivatives))
        # A short grid gets a chunk that just holds it (rounded up to an eighth of a power of
        # two: at most 8 compiled shapes per octave of grid lengths, and a grid of the same
        # length never recompiles), not a long padded one.
        per_device = -(-alphas.size // n_dev)
        granule = max(1, (1 << (per_device - 1).bit_length()) // 8)
        chunk_size = min(chunk_size, -(-per_device // granule) * granule * n_dev)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(-(-chunk_size // n_dev) * n_dev)  # a multiple of the device count
    mesh = Mesh(np.asarray(devices), ("alpha",))
    alpha_sharding = NamedSharding(mesh, PartitionSpec("alpha"))
    replicated = NamedSharding(mesh, PartitionSpec())
    if method == "affine":
        # Rows per step of the affine kernel: one [rows, C / devices, Vb] block near AFFINE_BLOCK.
        row_block = int(max(1, min(M, AFFINE_BLOCK // max(1, (chunk_size // n_dev) * min(V, VOCAB_BLOCK)))))
        aff = _affine_parts_fn(fn, derivatives, label_targets)(params, consts["targets"], consts["onehot"],
                                                               consts["tokens"])
        breaks, verts = upper_envelope(aff["l"], aff["u"])
        aff.update(breaks=jnp.asarray(breaks, dtype), verts=jnp.asarray(verts, jnp.int32))
        aff, consts = _place((aff, consts), replicated)
        kbase = _affine_base_fn(row_block)(aff, consts)
        kernel = functools.partial(_affine_chunk_fn(derivatives, row_block), aff=aff, base=kbase, consts=consts)
    else:
        chunk_fn = _jvp_chunk_fn if method == "jvp" else _chunk_fn
        params, base, consts = _place((params, base, consts), replicated)
        kernel = functools.partial(chunk_fn(fn, derivatives, label_targets), params=params, base=base,
                                   consts=consts)

    # Pad the grid to whole chunks by repeating its last alpha: one compiled shape for any grid.
    A = alphas.size
    n_chunks = -(-A // chunk_size)
    padded = np.concatenate([alphas, np.full(n_chunks * chunk_size - A, alphas[-1])])
    prefixes = ("", "d_", "d2_")[: derivatives + 1]
    out: dict[str, np.ndarray] = {}

    def collect(i, result):
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, A)
        for prefix, tree in zip(prefixes, result):
            for name, value in tree.items():
                value = _to_host(value)
                key = prefix + name
                if key not in out:
                    out[key] = np.empty((A,) + value.shape[1:], value.dtype)
                out[key][lo:hi] = value[: hi - lo]

    pending = None
    for i in range(n_chunks):
        chunk = _place(np.asarray(padded[i * chunk_size:(i + 1) * chunk_size], dtype), alpha_sharding)
        result = kernel(chunk)  # dispatched asynchronously
        if pending is not None:
            collect(*pending)  # copy the previous chunk back while this one runs
        pending = (i, result)
    collect(*pending)

    out.update(
        alphas=alphas,
        tokens=tokens.astype(np.int64),
        concept_of=concept_of.astype(np.int64),
        weights=weights,
        probs_base=np.asarray(jnp.exp(base["logp"])),
    )
    return out
