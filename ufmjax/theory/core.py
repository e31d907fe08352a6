"""Numerical pieces shared by the sections of `ufmjax.theory`: log-space tilts, moments of the
log-odds under a tilted distribution, concept bookkeeping, chunked loops (float64 numpy)."""

from __future__ import annotations

import numpy as np

# Largest temporary (in float64 elements, 32 MiB) built at once by chunked loops.
CHUNK_ELEMS = 1 << 22


class Concepts:
    """Validated concept assignment with the sort order used for segment reductions."""

    def __init__(self, concept_of_V, V: int):
        c = np.asarray(concept_of_V)
        if c.shape != (V,):
            raise ValueError(f"concept_of_V must be a vector of length V={V}, got shape {c.shape}")
        if c.dtype.kind not in "iu":
            raise ValueError(f"concept_of_V must hold integers, got dtype {c.dtype}")
        if np.any(c < 0):
            raise ValueError("concept_of_V must be non-negative")
        self.G = int(c.max()) + 1
        self.counts_G = np.bincount(c, minlength=self.G)
        if np.any(self.counts_G == 0):
            empty = np.flatnonzero(self.counts_G == 0).tolist()
            raise ValueError(f"concept_of_V must use every concept id 0..G-1, missing {empty}")
        self.of_V = c.astype(np.intp)
        # Sorting tokens by concept turns per-concept reductions into np.*.reduceat.
        self.order_V = np.argsort(self.of_V, kind="stable")
        self.starts_G = np.concatenate([[0], np.cumsum(self.counts_G)[:-1]])


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        out = mx + np.log(np.sum(np.exp(x - mx), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def centered_logits(logp_XxV: np.ndarray, M_V: np.ndarray, alpha_X: np.ndarray) -> np.ndarray:
    """log p + alpha M minus its row maximum, broadcasting alpha over the leading axes.

    The shift is computed as (log p - log p_k) + alpha (M - M_k) with k the row argmax,
    so tokens tied with the maximum get exactly 0 even at |alpha| = 1e6 instead of a
    rounding error of order 1e-16 * |alpha M|.
    """
    a = alpha_X[..., None]
    logits = logp_XxV + a * M_V
    k = np.argmax(logits, axis=-1)[..., None]
    logp_k = np.take_along_axis(np.broadcast_to(logp_XxV, logits.shape), k, axis=-1)
    return (logp_XxV - logp_k) + a * (M_V - M_V[k[..., 0]][..., None])


def steered_logp(logp_MxV: np.ndarray, M_V: np.ndarray, alphas_A: np.ndarray) -> np.ndarray:
    """log p_alpha(z|c_j) [A, M, V] (Lemma B.3)."""
    logits = centered_logits(logp_MxV[None], M_V, alphas_A[:, None])
    return logits - logsumexp(logits, axis=-1)[..., None]


def moments(p_XxV: np.ndarray, M_V: np.ndarray):
    """Mean, variance and deviations M - E of M under each row of p.

    Centred at M of the row's most likely token k: M(z) - E = (M(z) - M_k) - E[M - M_k],
    so when p concentrates on k (large |alpha|) the tiny M_k - E keeps its sign and
    relative precision instead of rounding to 0 (Lemma B.5 derivatives stay > 0 on M_max).
    """
    k = np.argmax(p_XxV, axis=-1)
    rel = M_V - M_V[k][..., None]
    shift = np.sum(p_XxV * rel, axis=-1)
    dev = rel - shift[..., None]
    var = np.sum(p_XxV * dev * dev, axis=-1)
    return M_V[k] + shift, np.maximum(var, 0.0), dev


def chunks(n_rows: int, row_elems: int):
    step = max(1, CHUNK_ELEMS // max(1, row_elems))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def leave_one_out(lF: np.ndarray, mu: np.ndarray):
    """Log-mass and mean of M outside each concept, from per-concept (log F_C, mu_C).

    Returns (log F_notC, mu_notC). The leave-one-out sum is taken relative to the largest
    remaining concept, so F_notC stays accurate when F_C is within rounding of 1 (computing
    1 - F_C would lose it). With a single concept the complement is empty: (-inf, 0).
    """
    G = lF.shape[-1]
    if G == 1:
        return np.full_like(lF, -np.inf), np.zeros_like(mu)
    k = np.argmax(lF, axis=-1)[..., None]
    is_k = np.arange(G) == k
    first = np.take_along_axis(lF, k, axis=-1)
    lF_others = np.where(is_k, -np.inf, lF)
    second = np.max(lF_others, axis=-1, keepdims=True)
    # Concepts other than the largest: the largest stays in the complement, so the
    # remaining weight is >= 1 and the subtraction below is well conditioned.
    w1 = np.exp(lF - first)
    loo_w1 = np.sum(w1, axis=-1, keepdims=True) - w1
    loo_wm1 = np.sum(w1 * mu, axis=-1, keepdims=True) - w1 * mu
    # The largest concept: sum the others directly, relative to the second largest.
    w2 = np.exp(lF_others - second)
    loo_w2 = np.sum(w2, axis=-1, keepdims=True)
    loo_wm2 = np.sum(w2 * mu, axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lF_not = np.where(is_k, second + np.log(loo_w2), first + np.log(loo_w1))
        mu_not = np.where(is_k, loo_wm2 / loo_w2, loo_wm1 / loo_w1)
    return lF_not, mu_not


def concept_stats(logp_MxV: np.ndarray, M_V: np.ndarray, cpt: Concepts, alphas_A: np.ndarray):
    """Per-concept log F_C, mu_C, log F_notC, mu_notC under p_alpha, each [A, M, G].

    mu_C = E_{p_alpha}[M | Z in C] is computed with weights normalised inside C, so it is
    exact even when F_C itself underflows to 0 (needed by the integrand of nu, Thm 3.6).
    """
    m, V = logp_MxV.shape
    A, G = alphas_A.shape[0], cpt.G
    out = [np.empty((A, m, G)) for _ in range(4)]
    M_sorted = M_V[cpt.order_V]
    for sl in chunks(A, m * V):
        logits = centered_logits(logp_MxV[None], M_V, alphas_A[sl, None])[..., cpt.order_V]
        mx = np.maximum.reduceat(logits, cpt.starts_G, axis=-1)
        w = np.exp(logits - np.repeat(mx, cpt.counts_G, axis=-1))
        sw = np.add.reduceat(w, cpt.starts_G, axis=-1)
        swm = np.add.reduceat(w * M_sorted, cpt.starts_G, axis=-1)
        lse = mx + np.log(sw)
        lF = lse - logsumexp(lse, axis=-1)[..., None]
        mu = swm / sw
        lF_not, mu_not = leave_one_out(lF, mu)
        for o, v in zip(out, (lF, mu, lF_not, mu_not)):
            o[sl] = v
    return tuple(out)


def centered_cgf(logp_MxV, M_V, alphas_A):
    """s_j(alpha) = log E_{p_j}[exp(alpha (M - E_{p_j}[M]))] [A, M], and E_{p_j}[M] [M].

    log Z_j(alpha) = alpha E_{p_j}[M] + s_j(alpha); s_j ~ alpha^2 Var/2 near 0 is computed
    with log1p/expm1 there, so Δ CE and KL keep full relative precision for tiny alpha.
    """
    p = np.exp(logp_MxV)
    mean0 = p @ M_V
    dev = M_V - mean0[:, None]
    x = alphas_A[:, None, None] * dev
    small = np.abs(alphas_A)[:, None] * np.max(np.abs(dev), axis=1) <= 1.0
    x_small = np.where(small[..., None], x, 0.0)
    s_small = np.log1p(np.sum(p * np.expm1(x_small), axis=-1))
    s_big = logsumexp(logp_MxV + x, axis=-1)
    return np.where(small, s_small, s_big), mean0
