"""The affine kernel path: closures whose logits are exactly l + alpha u (the UFM, Lemma B.2).

Shape legend: C = alphas of one chunk, M = rows, V = vocabulary, Vb = tokens of one vocabulary
block, G = concepts, K = tracked tokens, k = columns of the moment matrix, H = vertices of the
upper envelope.

Every quantity and both derivatives are closed forms in a few sums over the vocabulary
(docs/theory.md, "How the kernel computes derivatives"), read off ONE matrix product e @ B of
the unnormalised probabilities e = exp(logits - max) with a fixed matrix B of centred moments:
one exponential per element, no autodiff. The most likely token comes from the exact upper
envelope of the lines l_z + alpha u_z (no max pass) and is left out of the sums, so nothing
cancels where the distribution concentrates (tested from alpha = -1e6 to 1e6). The vocabulary
is walked in cache-sized blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ufmjax.kernel.measure import Measure
from ufmjax.kernel.taylor import count_trace, select

# The affine path carries 3 columns per concept in its moment matrix; beyond this many
# concepts the generic path is cheaper.
AFFINE_MAX_CONCEPTS = 64
# The affine kernel's block of e: [rows, alphas, VOCAB_BLOCK tokens] near AFFINE_BLOCK elements
# (8 MiB in float32), small enough to stay in cache between the exp and the product e @ B.
AFFINE_BLOCK = 1 << 21
VOCAB_BLOCK = 2048
# At most this many alphas per call, the affine path forms its moment columns on the fly
# (`point_stats`) instead of building and reading the moment matrix B.
POINT_ALPHAS = 4
# Smallest padded size of the upper envelope (vertices per row) the affine kernel compiles for.
ENVELOPE_PAD = 64


@struct.dataclass
class AffineParts:
    """l, u and the per-row constants of the affine path, computed once per closure."""

    l: jax.Array        # [M, V] logits at alpha = 0
    u: jax.Array        # [M, V] d logits / d alpha
    B: jax.Array        # [M, nb, Vb, k] centred moment columns, the vocabulary in blocks
    cu: jax.Array       # [M] centre of u (the moments are taken about it)
    cl: jax.Array       # [M] centre of l
    umax: jax.Array     # [M]
    umin: jax.Array     # [M]
    l_tok: jax.Array    # [M, K] l of the tracked tokens
    u_tok: jax.Array    # [M, K]
    T: jax.Array        # [M] total mass of the CE targets
    tl: jax.Array       # [M] sum_z t(z) l_z
    tu: jax.Array       # [M] sum_z t(z) u_z
    breaks: jax.Array   # [M, H - 1] where the most likely token changes (+inf padded)
    verts: jax.Array    # [M, H] int32 the most likely token on each piece


@struct.dataclass
class AffineReference:
    """The alpha = 0 values of the affine path, by the same arithmetic as its sweep."""

    logZ: jax.Array      # [M]
    p_tokens: jax.Array  # [M, K]
    ce: jax.Array        # [M]
    F: jax.Array         # [M, G]


@functools.lru_cache(maxsize=64)
def affine_parts_fn(fn, order: int, moments: bool = True):
    """jit((params, measure) -> l, u, B and the per-row constants; breaks/verts left empty).

    l = logits at 0, u = d logits / d alpha (one jvp: exact for an affine closure). The moment
    matrix B [M, V, k] holds, per token, 1, w, lam (w = u - centre, lam = l - centre) and the
    concept indicators, then for each derivative order w^(n+1), lam w^n and the indicators
    times w^n, so that ONE product e @ B gives every sum over the vocabulary the quantities
    and their derivatives need (columns used up to `order`). `moments=False` leaves B empty:
    point evaluations (`point_stats`) form the columns on the fly instead.
    """

    def parts(params, ms: Measure):
        onehot_VxG = ms.onehot_VxG
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
        if ms.label_targets:
            T = jnp.ones((M,), l_MxV.dtype)
            tl = jnp.take_along_axis(l_MxV, ms.targets[:, None], axis=1)[:, 0]
            tu = jnp.take_along_axis(u_MxV, ms.targets[:, None], axis=1)[:, 0]
        else:
            T = ms.targets.sum(axis=1)
            tl = jnp.sum(ms.targets * l_MxV, axis=1)
            tu = jnp.sum(ms.targets * u_MxV, axis=1)
        # The vocabulary in blocks of Vb (zero rows of B pad the last one): the kernel's
        # exp / product pass then stays in cache whatever V is.
        Vb = min(V, VOCAB_BLOCK)
        nb = -(-V // Vb)
        if moments:
            B_MxVxk = jnp.concatenate(cols, axis=-1)
            B_MxNxVbxk = jnp.pad(B_MxVxk, ((0, 0), (0, nb * Vb - V), (0, 0))).reshape(M, nb, Vb, -1)
        else:
            B_MxNxVbxk = jnp.zeros((M, 0, 0, 0), l_MxV.dtype)
        empty = jnp.zeros((M, 0), l_MxV.dtype)
        return AffineParts(l=l_MxV, u=u_MxV, B=B_MxNxVbxk, cu=cu, cl=cl, umax=umax, umin=umin,
                           l_tok=l_MxV[:, ms.tokens_K], u_tok=u_MxV[:, ms.tokens_K], T=T, tl=tl, tu=tu,
                           breaks=empty, verts=empty.astype(jnp.int32))

    return jax.jit(parts)


def affine_parts(fn, params, ms: Measure, order: int, moments: bool = True) -> AffineParts:
    """The affine parts of a closure with its exact upper envelope (computed in float64 numpy)."""
    aff = affine_parts_fn(fn, order, moments)(params, ms)
    breaks, verts = upper_envelope(aff.l, aff.u)
    return aff.replace(breaks=jnp.asarray(breaks, aff.l.dtype), verts=jnp.asarray(verts, jnp.int32))


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


def affine_stats(alphas_C, aff, row_block: int):
    """Per (alpha, row): the most likely token z* and the moment sums of all OTHER tokens.

    Returns idx [C, M] (z*, from the upper envelope: no pass over the vocabulary), and
    R [C, M, k] = e @ B with e_z = exp((l_z - l*) + alpha (u_z - u*)) for z != z* (e_z* = 1 is
    added back in closed form): one exponential per element. Leaving z* out keeps the moments
    exact where the distribution concentrates (|alpha| large): there the other tokens' sums
    are tiny and nothing cancels against z*'s unit mass. Rows are walked `row_block` at a time
    and the vocabulary one block of Vb tokens at a time (a scan accumulating e @ B), so the
    [rows, C, Vb] block of e stays near AFFINE_BLOCK elements, in cache, whatever M and V are.
    """
    l_MxV, u_MxV, B = aff.l, aff.u, aff.B
    M, V = l_MxV.shape
    nb, Vb = B.shape[1], B.shape[2]
    C = alphas_C.shape[0]
    piece_CxM = jnp.sum(aff.breaks[None] <= alphas_C[:, None, None], axis=-1)
    idx_MxC = jnp.take_along_axis(aff.verts, piece_CxM.T, axis=1)
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
        if nb == 1:  # one block: no loop (a small vocabulary, e.g. every point the optimiser asks for)
            return block(acc, (0, l_NxVb[0], u_NxVb[0], B_NxVbxk[0]))[0]
        return jax.lax.scan(block, acc, (jnp.arange(nb), l_NxVb, u_NxVb, B_NxVbxk))[0]

    args = (l_MxNxVb, u_MxNxVb, B, idx_MxC, ls_MxC, us_MxC)
    # All rows in one block: a plain vmap (lax.map would wrap it in a loop of one step).
    R_MxCxk = jax.vmap(row)(args) if row_block >= M else jax.lax.map(row, args, batch_size=row_block)
    return idx_MxC.T, jnp.swapaxes(R_MxCxk, 0, 1)


def point_stats(alphas_C, aff: AffineParts, ms: Measure, order: int):
    """`affine_stats` for a few alphas: the same sums R, with the moment columns formed on the
    fly from l and u instead of read from B.

    At one alpha per call (the optimiser's pattern) e @ B is a matrix-vector product that
    reads all of B, k columns per token and row; forming w, lam and their powers from l and u
    reads two numbers per token instead (measured: 3x faster per evaluation at V = 50,257,
    and no B to build).
    """
    l_MxV, u_MxV = aff.l, aff.u
    M, V = l_MxV.shape
    piece_CxM = jnp.sum(aff.breaks[None] <= alphas_C[:, None, None], axis=-1)
    idx_CxM = jnp.take_along_axis(aff.verts, piece_CxM.T, axis=1).T
    rows = jnp.arange(M)[None, :]
    ls_CxM, us_CxM = l_MxV[rows, idx_CxM], u_MxV[rows, idx_CxM]
    d_CxMxV = (l_MxV[None] - ls_CxM[..., None]) + alphas_C[:, None, None] * (u_MxV[None] - us_CxM[..., None])
    skip = jnp.arange(V)[None, None, :] == idx_CxM[..., None]
    e = jnp.where(skip, 0.0, jnp.exp(d_CxMxV))
    w = u_MxV - aff.cu[:, None]
    lam = l_MxV - aff.cl[:, None]
    cols = [e.sum(-1)[..., None], (e * w).sum(-1)[..., None], (e * lam).sum(-1)[..., None], e @ ms.onehot_VxG]
    if order >= 1:
        ew = e * w
        cols += [(ew * w).sum(-1)[..., None], (ew * lam).sum(-1)[..., None], ew @ ms.onehot_VxG]
    if order >= 2:
        eww = e * w * w
        cols += [(eww * w).sum(-1)[..., None], (eww * lam).sum(-1)[..., None], eww @ ms.onehot_VxG]
    return idx_CxM, jnp.concatenate(cols, axis=-1)


def star_moments(alphas_C, idx_CxM, R_CxMxk, aff, ms, order: int):
    """Sums over the vocabulary about z*: w = u - u*, lam = l - l* (binomial re-centring of R)."""
    G = ms.onehot_VxG.shape[1]
    rows = jnp.arange(idx_CxM.shape[1])[None, :]
    ls, us = aff.l[rows, idx_CxM], aff.u[rows, idx_CxM]
    du, dl = us - aff.cu, ls - aff.cl     # z*'s offsets from the fixed centres of B
    R0, Rw, Rl = R_CxMxk[..., 0], R_CxMxk[..., 1], R_CxMxk[..., 2]
    RC = R_CxMxk[..., 3:3 + G]
    m = {"ls": ls, "us": us, "S0": 1.0 + R0, "A1": Rw - du * R0, "L1": Rl - dl * R0,
         "C0": RC + ms.onehot_VxG[idx_CxM]}
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


def affine_quantities(alphas_C, idx_CxM, R_CxMxk, aff, ref, ms, order: int):
    """Every quantity and its derivatives from the moment sums (closed forms, docs/theory.md).

    With mu = E[u] - u*, Var = Var(u), m3 = E[(u - E u)^3], log Z = l* + alpha u* + log S0:
    p_z = exp(l_z - l* + alpha (u_z - u*)) / S0, p_z' = p_z (u_z - E u),
    p_z'' = p_z ((u_z - E u)^2 - Var); CE' = T E[u] - sum t u, CE'' = T Var (Thm 3.8);
    H = log S0 - E[(l - l*) + alpha (u - u*)], H' = -Cov(l, u) - alpha Var,
    H'' = -E[(l - E l)(u - E u)^2] - Var - alpha m3; KL = -H - E[l] + log Z_0,
    KL' = alpha Var, KL'' = Var + alpha m3.
    """
    m = star_moments(alphas_C, idx_CxM, R_CxMxk, aff, ms, order)
    a = alphas_C[:, None]
    S0, ls, us = m["S0"], m["ls"], m["us"]
    inv = 1.0 / S0
    logS0 = jnp.log(S0)
    mw, ml = m["A1"] * inv, m["L1"] * inv
    # E[u] lies in [min u, max u]: clipping keeps the sign of u_z - E[u] exact at the ends,
    # where Thm 3.3's monotone tokens are checked.
    Eu = jnp.clip(us + mw, aff.umin, aff.umax)
    d_tok = (aff.l_tok[None] - ls[..., None]) + a[..., None] * (aff.u_tok[None] - us[..., None])
    p_tok = jnp.exp(d_tok - logS0[..., None])
    F = m["C0"] * inv[..., None]
    ce = aff.T * logS0 - (aff.tl - aff.T * ls) - a * (aff.tu - aff.T * us)
    dce = ce - ref.ce
    H = jnp.maximum(logS0 - (m["L1"] + a * m["A1"]) * inv, 0.0)
    w = ms.weights_M
    out = [{
        "delta_p": p_tok - ref.p_tokens,
        "concept_prob": F,
        "delta_p_concept": (F - ref.F) * ms.inv_size_G,
        "delta_ce": dce @ w,
        "delta_ce_ctx": dce,
        "kl": jnp.maximum(-H - (ls + ml) + ref.logZ, 0.0),
        "entropy": H,
    }]
    if order == 0:
        return tuple(out)
    A2, L11 = m["A2"] * inv, m["L11"] * inv
    var = jnp.maximum(A2 - mw * mw, 0.0)
    cov = L11 - ml * mw
    g_tok = aff.u_tok[None] - Eu[..., None]
    dF = (m["C1"] - mw[..., None] * m["C0"]) * inv[..., None]
    dce = aff.T * mw - (aff.tu - aff.T * us)
    out.append({
        "delta_p": p_tok * g_tok,
        "concept_prob": dF,
        "delta_p_concept": dF * ms.inv_size_G,
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
    d2ce = aff.T * var
    out.append({
        "delta_p": p_tok * (g_tok * g_tok - var[..., None]),
        "concept_prob": d2F,
        "delta_p_concept": d2F * ms.inv_size_G,
        "delta_ce": d2ce @ w,
        "delta_ce_ctx": d2ce,
        "kl": var + a * m3,
        "entropy": -lww - var - a * m3,
    })
    return tuple(out)


@functools.lru_cache(maxsize=64)
def affine_reference_fn(row_block: int, point: bool = False):
    """jit((parts, measure) -> AffineReference), by the same arithmetic as the sweep."""

    def reference(aff: AffineParts, ms: Measure):
        zero = jnp.zeros((1,), aff.l.dtype)
        idx, R = point_stats(zero, aff, ms, 0) if point else affine_stats(zero, aff, row_block)
        m = star_moments(zero, idx, R, aff, ms, 0)
        logS0 = jnp.log(m["S0"][0])
        ls = m["ls"][0]
        return AffineReference(logZ=ls + logS0, p_tokens=jnp.exp(aff.l_tok - (ls + logS0)[:, None]),
                               ce=aff.T * logS0 - (aff.tl - aff.T * ls), F=m["C0"][0] / m["S0"][0][:, None])

    return jax.jit(reference)


@functools.lru_cache(maxsize=64)
def affine_chunk_fn(order: int, row_block: int, names: tuple | None = None, point: bool = False):
    """The affine kernel for a chunk of alphas: the moment sums (one matrix product, or formed
    on the fly for `point` evaluations), then closed forms."""

    def chunk(alphas_C, aff: AffineParts, ref: AffineReference, ms: Measure):
        count_trace()
        idx, R = point_stats(alphas_C, aff, ms, order) if point else affine_stats(alphas_C, aff, row_block)
        return select(affine_quantities(alphas_C, idx, R, aff, ref, ms, order), names)

    return jax.jit(chunk)


def affine_row_block(num_rows: int, vocab: int, alphas_per_device: int) -> int:
    """Rows per step of the affine kernel: one [rows, C / devices, Vb] block near AFFINE_BLOCK."""
    return int(max(1, min(num_rows, AFFINE_BLOCK // max(1, alphas_per_device * min(vocab, VOCAB_BLOCK)))))


def default_affine_chunk_size(vocab: int, num_devices: int = 1) -> int:
    """Alphas per call of the affine kernel: a [C, Vb] block of e near AFFINE_BLOCK elements.

    The affine kernel walks rows and vocabulary blocks inside a call, so its chunk depends on
    neither M nor V beyond the block; a long chunk keeps its product e @ B efficient.
    """
    per_device = max(64, min(4096, AFFINE_BLOCK // max(1, min(vocab, VOCAB_BLOCK))))
    return per_device * num_devices
