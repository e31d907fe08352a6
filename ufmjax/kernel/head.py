"""The head path: closures that end in an unembedding, the vocabulary walked in blocks.

Shape legend: C = alphas of one chunk, S = series streams (x, x', x''), M = rows, D = width,
V = vocabulary, Vb = tokens of one vocabulary block, G = concepts, K = tracked tokens,
n = base variables, N = moments.

A closure declared with `steering.register_head` is fn(params, alpha) = cap(h(alpha) W^T). The
taylor path forms the logits' series [S, M, V] and then reads it several times (log-softmax,
exp, concept sums, KL, entropy, CE): at a 50,257-token vocabulary that was half of a
last-position sweep, memory traffic more than arithmetic. Here the series goes through the
model only up to h [S, M, D]; then the vocabulary is walked Vb tokens at a time: one stacked
product [S M, D] @ [D, Vb] gives the block's logit series, and every sum the quantities need
is taken while that block is in cache. The logits are never held, whatever V is (262,144 for
Gemma 3).

The sums are taken about a centre per row: m = max x for x, m for d = x - r (r: the
unsteered log-probabilities), and the values at the maximising token z* for x' and x''. With
b = y - centre for the base variables y = (x, d, x', x'') and e = exp(x - m) <= 1, a block
contributes sum_z e prod_i b_i^k_i for a few monomials k (and the concept indicators times
some of them, and the CE targets times b). Two blocks merge by moving both sets of sums to the
centre with the larger maximum (a binomial shift; e is rescaled by exp(-dm) <= 1). Centred at
the most likely token, nothing cancels where the distribution concentrates (the affine path's
device, `kernel.affine`). The quantities then follow in closed form from the moments: the
identities of `taylor.taylor_quantities` (docs/theory.md, "How the kernel computes
derivatives", head path).
"""

from __future__ import annotations

import functools
from math import comb

import jax
import jax.numpy as jnp
from flax import struct

from ufmjax import steering
from ufmjax.kernel.measure import Measure, Reference
from ufmjax.kernel.taylor import closure_jets, count_trace, select

# Tokens of one vocabulary block: [C, S, M, Vb] of logit series per step.
VOCAB_BLOCK = 2048

# Moments as exponents over the base variables (x, d = x - r, x', x''), the first order + 2 used.
_ONE, _X, _D, _1, _1X, _1D, _11, _2, _11X, _11D, _2X, _2D = (
    (0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (1, 0, 1, 0), (0, 1, 1, 0), (0, 0, 2, 0),
    (0, 0, 0, 1), (1, 0, 2, 0), (0, 1, 2, 0), (1, 0, 0, 1), (0, 1, 0, 1))
_MOMENTS = ((_ONE, _X, _D), (_1, _1X, _1D), (_11, _2, _11X, _11D, _2X, _2D))
_CONCEPT_MOMENTS = ((_ONE,), (_1,), (_11, _2))
_TARGET_MOMENTS = ((_ONE, _X), (_1,), (_2,))


def moments(order: int, table=_MOMENTS) -> tuple:
    """The monomials (exponent tuples over order + 2 base variables) summed at `order`."""
    return tuple(m[: order + 2] for level in table[: order + 1] for m in level)


@struct.dataclass
class Sums:
    """The running sums of one row set about its anchor (the most likely token seen so far)."""

    anchor: jax.Array   # [M, n] the centres of the base variables (x's is its maximum)
    A: jax.Array        # [M, N] sum_z e b^k over `moments(order)`
    Ac: jax.Array       # [M, Nc, G] sum_z e b^k 1[z in concept] over `moments(order, _CONCEPT_MOMENTS)`
    At: jax.Array       # [M, Nt] sum_z t(z) b^k over `moments(order, _TARGET_MOMENTS)` (dense targets)


def _monomial(b, k, cache):
    """prod_i b_i^k_i (products kept in `cache`, shared between moments)."""
    if k not in cache:
        i = max(j for j, kj in enumerate(k) if kj)
        lower = tuple(kj - (j == i) for j, kj in enumerate(k))
        cache[k] = _monomial(b, lower, cache) * b[i]
    return cache[k]


def _shift(sums_MxN, monos, delta_Mxn):
    """The sums of b^k after every base variable moved by -delta (b -> b - delta), per row.

    (b - delta)^k = sum_{j <= k} prod_i C(k_i, j_i) (-delta_i)^(k_i - j_i) b^j; every j <= k is
    itself one of the monomials (the tables are closed downwards). sums_MxN may carry trailing
    axes (the concept sums [M, N, G]).
    """
    index = {m: i for i, m in enumerate(monos)}
    extra = (1,) * (sums_MxN.ndim - 2)
    out = []
    for k in monos:
        total = None
        for j in monos:
            if not all(ji <= ki for ji, ki in zip(j, k)):
                continue
            coef = None
            for i, (ki, ji) in enumerate(zip(k, j)):
                if ki > ji:
                    term = comb(ki, ji) * (-delta_Mxn[:, i]) ** (ki - ji)
                    coef = term if coef is None else coef * term
            part = sums_MxN[:, index[j]]
            part = part if coef is None else coef.reshape(coef.shape + extra) * part
            total = part if total is None else total + part
        out.append(total)
    return jnp.stack(out, axis=1)


def _move(s: Sums, anchor_Mxn, order: int) -> Sums:
    delta = anchor_Mxn - s.anchor
    scale = jnp.exp(-delta[:, 0])   # the new anchor's logit is the larger: scale <= 1
    A = scale[:, None] * _shift(s.A, moments(order), delta)
    Ac = scale[:, None, None] * _shift(s.Ac, moments(order, _CONCEPT_MOMENTS), delta)
    At = _shift(s.At, moments(order, _TARGET_MOMENTS), delta) if s.At.shape[1] else s.At
    return Sums(anchor=anchor_Mxn, A=A, Ac=Ac, At=At)


def merge(a: Sums, b: Sums, order: int) -> Sums:
    """The sums of two disjoint token sets, about the anchor with the larger logit."""
    take_b = b.anchor[:, 0] > a.anchor[:, 0]
    anchor = jnp.where(take_b[:, None], b.anchor, a.anchor)
    a, b = _move(a, anchor, order), _move(b, anchor, order)
    return Sums(anchor=anchor, A=a.A + b.A, Ac=a.Ac + b.Ac, At=a.At + b.At)


def softcap_series(y, cap):
    """The series of cap * tanh(y / cap) from that of y (a list of [..] streams); no cap: y."""
    if cap is None:
        return list(y)
    t = jnp.tanh(y[0] / cap)
    s = 1.0 - t * t
    out = [cap * t]
    if len(y) > 1:
        out.append(s * y[1])
    if len(y) > 2:
        out.append(s * y[2] - (2.0 / cap) * t * s * y[1] * y[1])
    return out


def block_sums(x_SxMxVb, r_MxVb, onehot_VbxG, targets_MxVb, valid_Vb, order: int) -> Sums:
    """The sums of one block of tokens (those `valid_Vb`), about the block's most likely token.

    The anchor is (m, m, x'(z*), x''(z*)) with m = max x: d = x - r is taken about m too (it
    needs no token), the derivatives about their values at the maximum, read by a masked sum
    (an argmax and a gather cost as much again as the whole block, measured).
    """
    x = x_SxMxVb[0]
    m = jnp.max(jnp.where(valid_Vb, x, -jnp.inf), axis=-1)
    anchor = [m, m]
    if order >= 1:
        top = (x == m[:, None]) & valid_Vb
        n_top = jnp.sum(top, axis=-1)  # ties: their mean
        anchor += [jnp.sum(jnp.where(top, x_SxMxVb[s], 0.0), axis=-1) / n_top for s in range(1, order + 1)]
    b_x = jnp.where(valid_Vb, x - m[:, None], 0.0)
    # d - m as (x - m) - r: x - r first would round at the scale of |x| (hundreds at large alpha).
    b = [b_x, jnp.where(valid_Vb, b_x - r_MxVb, 0.0)]
    b += [jnp.where(valid_Vb, x_SxMxVb[s] - a[:, None], 0.0) for s, a in zip(range(1, order + 1), anchor[2:])]
    e = jnp.where(valid_Vb, jnp.exp(b[0]), 0.0)
    cache = {(0,) * len(b): e}
    A = jnp.stack([jnp.sum(_monomial(b, k, cache), axis=-1) for k in moments(order)], axis=1)
    Ac = jnp.stack([_monomial(b, k, cache) @ onehot_VbxG for k in moments(order, _CONCEPT_MOMENTS)], axis=1)
    if targets_MxVb is None:
        At = jnp.zeros((x.shape[0], 0), x.dtype)
    else:
        tcache = {(0,) * len(b): jnp.where(valid_Vb, targets_MxVb, 0.0)}
        At = jnp.stack([jnp.sum(_monomial(b, k, tcache), axis=-1) for k in moments(order, _TARGET_MOMENTS)], axis=1)
    return Sums(anchor=jnp.stack(anchor, axis=1), A=A, Ac=Ac, At=At)


def _logit_series(unemb: steering.Unembedding, h_SxMxD, start, size):
    """The series of the logits of tokens start..start + size ([S, M, size])."""
    W = jax.lax.dynamic_slice_in_dim(unemb.W, start, size, axis=unemb.vocab_axis).astype(h_SxMxD.dtype)
    y = h_SxMxD @ (W.T if unemb.vocab_axis == 0 else W)
    return jnp.stack(softcap_series(list(y), unemb.softcap))


def _logits_at(unemb: steering.Unembedding, h_SxMxD, ids_K):
    """The series of the logits of the tokens ids_K for every row ([S, M, K])."""
    W = jnp.take(unemb.W, ids_K, axis=unemb.vocab_axis).astype(h_SxMxD.dtype)
    y = h_SxMxD @ (W.T if unemb.vocab_axis == 0 else W)
    return jnp.stack(softcap_series(list(y), unemb.softcap))


def _label_logits(unemb: steering.Unembedding, h_SxMxD, labels_M):
    """The series of each row's label logit ([S, M])."""
    W = jnp.take(unemb.W, labels_M, axis=unemb.vocab_axis).astype(h_SxMxD.dtype)
    W_MxD = W if unemb.vocab_axis == 0 else W.T
    y = jnp.sum(h_SxMxD * W_MxD, axis=-1)
    return jnp.stack(softcap_series(list(y), unemb.softcap))


def vocab_sums(unemb: steering.Unembedding, h_SxMxD, ref: Reference, ms: Measure, order: int,
               block: int = VOCAB_BLOCK) -> Sums:
    """The sums over the whole vocabulary, walked `block` tokens at a time (a scan).

    Block j covers tokens [j Vb, (j + 1) Vb); the last one is slid back to end at V (no
    padded copy of W) and skips the tokens the one before it covered.
    """
    V = int(unemb.W.shape[unemb.vocab_axis])
    Vb = min(V, int(block))
    nb = -(-V // Vb)
    dense = not ms.label_targets

    def one(j):
        start = jnp.minimum(j * Vb, V - Vb)
        valid = start + jnp.arange(Vb) >= j * Vb
        x = _logit_series(unemb, h_SxMxD, start, Vb)
        r = jax.lax.dynamic_slice_in_dim(ref.logp_MxV, start, Vb, axis=1)
        oh = jax.lax.dynamic_slice_in_dim(ms.onehot_VxG, start, Vb, axis=0)
        t = jax.lax.dynamic_slice_in_dim(ms.targets, start, Vb, axis=1) if dense else None
        return block_sums(x, r, oh, t, valid, order)

    first = one(0)
    if nb == 1:
        return first
    return jax.lax.fori_loop(1, nb, lambda j, s: merge(s, one(j), order), first)


def head_quantities(sums: Sums, tok_SxMxK, label_SxM, ref: Reference, ms: Measure, order: int):
    """Every quantity and its derivatives from the vocabulary sums (closed forms).

    With mu(k) = sum_z e b^k / S0 (moments about the anchor), log Z = x* + log S0,
    g = x' - E[x'] and g2 = x'' - E[x''] - Var(x'): p' = p g, p'' = p (g^2 + g2), so for any f
    sum_z p' f = E[g f] and sum_z p'' f = E[g^2 f] + E[g2 f]; KL = E[x - r] - log Z,
    H = log Z - E[x], CE = T log Z - sum t x (labels: log Z - x_t), and their derivatives as in
    `taylor.taylor_quantities`.
    """
    ix = {k: i for i, k in enumerate(moments(order))}
    ic = {k: i for i, k in enumerate(moments(order, _CONCEPT_MOMENTS))}
    it = {k: i for i, k in enumerate(moments(order, _TARGET_MOMENTS))}
    n = order + 2
    key = lambda k: k[:n]  # noqa: E731
    S0 = sums.A[:, ix[key(_ONE)]]
    inv = 1.0 / S0
    logS0 = jnp.log(S0)
    mu = lambda k: sums.A[:, ix[key(k)]] * inv  # noqa: E731
    conc = lambda k: sums.Ac[:, ic[key(k)]] * inv[:, None]  # noqa: E731
    tsum = lambda k: sums.At[:, it[key(k)]]  # noqa: E731
    col = (0, 2, 3)  # the base variable of stream s: x, x', x''
    b_tok = [tok_SxMxK[s] - sums.anchor[:, col[s], None] for s in range(order + 1)]
    b_lab = None if label_SxM is None else [label_SxM[s] - sums.anchor[:, col[s]] for s in range(order + 1)]
    T = None if b_lab is not None else tsum(_ONE)
    mx, md = mu(_X), mu(_D)
    p_tok = jnp.exp(b_tok[0] - logS0[:, None])
    F = conc(_ONE)
    ce = (logS0 - b_lab[0]) if b_lab is not None else T * logS0 - tsum(_X)
    dce = ce - ref.ce_M
    w = ms.weights_M
    out = [{
        "delta_p": p_tok - ref.p_tokens_MxK,
        "concept_prob": F,
        "delta_p_concept": (F - ref.F_MxG) * ms.inv_size_G,
        "delta_ce": jnp.dot(w, dce),
        "delta_ce_ctx": dce,
        "kl": md - logS0,  # E[x - r] - log Z, d taken about m
        "entropy": logS0 - mx,
    }]
    if order == 0:
        return tuple(out)
    m1 = mu(_1)
    var = jnp.maximum(mu(_11) - m1 * m1, 0.0) if order >= 2 else None
    g_tok = b_tok[1] - m1[:, None]
    dF = conc(_1) - m1[:, None] * F
    dce = (m1 - b_lab[1]) if b_lab is not None else T * m1 - tsum(_1)
    out.append({
        "delta_p": p_tok * g_tok,
        "concept_prob": dF,
        "delta_p_concept": dF * ms.inv_size_G,
        "delta_ce": jnp.dot(w, dce),
        "delta_ce_ctx": dce,
        "kl": mu(_1D) - m1 * md,
        "entropy": -(mu(_1X) - m1 * mx),
    })
    if order == 1:
        return tuple(out)
    m2 = mu(_2)
    c2 = m2 + var
    g2_tok = b_tok[2] - c2[:, None]

    def second(f_moment, f1, f11, f2):
        """sum_z p'' f = E[g^2 f] + E[g2 f] from the moments of f, b1 f, b1^2 f and b2 f."""
        m1_ = m1.reshape(m1.shape + (1,) * (f_moment.ndim - 1))
        c2_ = c2.reshape(m1_.shape)
        return f11 - 2.0 * m1_ * f1 + m1_ * m1_ * f_moment + f2 - c2_ * f_moment

    d2F = second(F, conc(_1), conc(_11), conc(_2))
    d2ce = (c2 - b_lab[2]) if b_lab is not None else T * c2 - tsum(_2)
    out.append({
        "delta_p": p_tok * (g_tok * g_tok + g2_tok),
        "concept_prob": d2F,
        "delta_p_concept": d2F * ms.inv_size_G,
        "delta_ce": jnp.dot(w, d2ce),
        "delta_ce_ctx": d2ce,
        "kl": second(md, mu(_1D), mu(_11D), mu(_2D)) + var,
        "entropy": -second(mx, mu(_1X), mu(_11X), mu(_2X)) - var,
    })
    return tuple(out)


def hidden_series(head: steering.Head, params, alpha, order: int):
    """The series of the final hidden state at one alpha ([S, M, D])."""
    return jnp.stack(closure_jets(head.hidden, params, alpha, order))


def head_from_hidden(head: steering.Head, params, h_SxMxD, ref: Reference, ms: Measure, order: int,
                     block: int = VOCAB_BLOCK):
    """Every quantity from the series of the final hidden state (one alpha)."""
    unemb = head.unembedding(params)
    sums = vocab_sums(unemb, h_SxMxD, ref, ms, order, block)
    tok = _logits_at(unemb, h_SxMxD, ms.tokens_K)
    label = _label_logits(unemb, h_SxMxD, ms.targets) if ms.label_targets else None
    return head_quantities(sums, tok, label, ref, ms, order)


@functools.lru_cache(maxsize=64)
def head_chunk_fn(fn, order: int, names: tuple | None = None, block: int = VOCAB_BLOCK,
                  model_batch: int | None = None, groups: int = 1):
    """The jitted chunk of a head-declared closure: values and `order` derivatives (of `names`).

    `model_batch`: alphas the model part takes at a time (`jax.lax.map` over the chunk) while
    the vocabulary walk takes the whole chunk. The two want different sizes: the model's
    series intermediates ([S, B, T, 4 D] per alpha with every position steered) fall out of
    cache past a few alphas, while each step of the vocabulary walk over a handful of rows
    is too small to pay for itself below a few dozen. None: the whole chunk at once.
    `groups`: the devices the chunk's alphas are split over; each takes its own share in
    batches (the chunk is viewed as [groups, C / groups], so no batch straddles two devices).
    """
    head = steering.head_of(fn)
    if head is None:
        raise ValueError("method 'head' needs a closure declared with steering.register_head")

    def chunk(alphas_C, params, ref, ms):
        count_trace()
        one = functools.partial(hidden_series, head, params, order=order)
        per_group = alphas_C.reshape(groups, -1)
        if model_batch is not None and per_group.shape[1] > model_batch:
            h = jax.vmap(lambda a: jax.lax.map(one, a, batch_size=model_batch))(per_group)
        else:
            h = jax.vmap(jax.vmap(one))(per_group)
        h = h.reshape((alphas_C.shape[0],) + h.shape[2:])
        out = jax.vmap(lambda h_SxMxD: head_from_hidden(head, params, h_SxMxD, ref, ms, order, block))(h)
        return select(out, names)

    return jax.jit(chunk)
