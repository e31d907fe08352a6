"""Sec. 3.1 of the paper: tokens. Log-odds (Lemmas B.2-B.4), the steered distribution
(Lemma B.3), Δp and its derivatives (Def. 3.1, Lemma B.5), peak strengths (Thm 3.3), limits
(Prop. B.1). Definitions in docs/theory.md, Sec. 3."""

from __future__ import annotations

import numpy as np

from ufmjax.theory.checks import as_float, check_alphas, check_index, check_log_odds, check_p
from ufmjax.theory.core import centered_logits, chunks, moments, steered_logp


def log_odds(p_MxV, P, N) -> np.ndarray:
    """Log-odds M(z) of the difference-of-means steering vector (Def. 3.2).

    M(z) = (1/q) sum_{i in P} log p(z|c_i) - (1/q) sum_{i in N} log p(z|c_i).

    Args:
        p_MxV: next-token table p(z|c_j), strictly positive, rows summing to 1.
        P: integer indices of the positive contexts (no repeats).
        N: integer indices of the negative contexts, same size q as P, disjoint from P.

    Returns:
        M_V: float64 vector of length V.
    """
    logp = check_p(p_MxV)
    m = logp.shape[0]
    P_ = check_index(P, m, "P")
    N_ = check_index(N, m, "N")
    if P_.size != N_.size:
        # Eq. 3 uses one q for both means; unequal sizes are a different estimator.
        raise ValueError(f"P and N must have the same size q, got |P|={P_.size}, |N|={N_.size}")
    common = np.intersect1d(P_, N_)
    if common.size:
        raise ValueError(f"P and N must be disjoint, both contain {common.tolist()}")
    return logp[P_].mean(axis=0) - logp[N_].mean(axis=0)


def steered_probs(p_MxV, M_V, alphas_A) -> np.ndarray:
    """Steered next-token distribution p_alpha(z|c_j) (Lemma B.3).

    p_alpha(z|c_j) = p(z|c_j) e^{alpha M(z)} / sum_z' p(z'|c_j) e^{alpha M(z')}, exact for
    any UFM steered by a difference-of-means vector whose M is its log-odds.

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector (any real vector; see log_odds).
        alphas_A: steering strengths (scalar or 1-D).

    Returns:
        [A, M, V] array; every row sums to 1 and alpha = 0 gives p.
    """
    logp = check_p(p_MxV)
    M = check_log_odds(M_V, logp.shape[1])
    return np.exp(steered_logp(logp, M, check_alphas(alphas_A)))


def _token_moments(p_MxV, M_V, alphas_A):
    logp = check_p(p_MxV)
    M = check_log_odds(M_V, logp.shape[1])
    pa = np.exp(steered_logp(logp, M, check_alphas(alphas_A)))
    mean, var, dev = moments(pa, M)
    return pa, dev, mean, var


def mean_log_odds(p_MxV, M_V, alphas_A) -> np.ndarray:
    """E_{p_alpha(.|c_j)}[M], strictly increasing in alpha with derivative Var (Thm 3.3 proof).

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        alphas_A: steering strengths.

    Returns:
        [A, M] array.
    """
    return _token_moments(p_MxV, M_V, alphas_A)[2]


def var_log_odds(p_MxV, M_V, alphas_A) -> np.ndarray:
    """Var_{p_alpha(.|c_j)}(M), the derivative of mean_log_odds in alpha.

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        alphas_A: steering strengths.

    Returns:
        [A, M] array, >= 0.
    """
    return _token_moments(p_MxV, M_V, alphas_A)[3]


def token_derivative(p_MxV, M_V, alphas_A) -> np.ndarray:
    """d Δp(z|c_j, alpha) / d alpha = p_alpha(z) (M(z) - E_{p_alpha}[M])  (Lemma B.5).

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        alphas_A: steering strengths.

    Returns:
        [A, M, V] array; each row sums to 0.
    """
    pa, dev, _, _ = _token_moments(p_MxV, M_V, alphas_A)
    return pa * dev


def token_second_derivative(p_MxV, M_V, alphas_A) -> np.ndarray:
    """d^2 Δp(z|c_j, alpha) / d alpha^2 = p_alpha(z) [(M(z) - E)^2 - Var].

    Differentiating Lemma B.5 once more: d p_alpha/d alpha = p_alpha (M - E) and
    dE/d alpha = Var, so d/d alpha [p_alpha (M - E)] = p_alpha (M - E)^2 - p_alpha Var.

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        alphas_A: steering strengths.

    Returns:
        [A, M, V] array; each row sums to 0.
    """
    pa, dev, _, var = _token_moments(p_MxV, M_V, alphas_A)
    return pa * (dev * dev - var[..., None])


def extremal_tokens(M_V, rtol: float = 1e-9):
    """Tokens attaining the maximum (M_max) and minimum (M_min) of M (Thm 3.3).

    Ties count within rtol * max|M|, so tokens equal in exact arithmetic but not after
    rounding (e.g. uniform profiles) are all extremal.

    Args:
        M_V: log-odds vector.
        rtol: relative tie tolerance, >= 0.

    Returns:
        (is_max_V, is_min_V) boolean vectors. If M is constant every token is in both.
    """
    M = as_float(M_V, "M_V")
    if M.ndim != 1 or M.size == 0 or not np.all(np.isfinite(M)):
        raise ValueError(f"M_V must be a non-empty finite 1-D vector, got shape {M.shape}")
    rtol = float(rtol)
    if not (np.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be finite and >= 0, got {rtol}")
    tol = rtol * float(np.max(np.abs(M)))
    return M >= M.max() - tol, M <= M.min() + tol


def _peak_f(logp_KxV, M_V, target_K, alpha_K):
    """E_{p_alpha}[M] - target and its alpha-derivative Var, one alpha per row."""
    logits = centered_logits(logp_KxV, M_V, alpha_K)
    w = np.exp(logits)
    sw = w.sum(axis=-1)
    k = np.argmax(logits, axis=-1)
    # E - target = (M_k - target) + E[M - M_k]: exact near convergence when p_alpha
    # concentrates on the argmax token k.
    dev_k = M_V - M_V[k][:, None]
    f = (M_V[k] - target_K) + (w * dev_k).sum(axis=-1) / sw
    e = M_V[k] + (w * dev_k).sum(axis=-1) / sw
    dev = M_V - e[:, None]
    fp = (w * dev * dev).sum(axis=-1) / sw
    return f, fp


def _solve_peaks(logp_KxV, M_V, target_K):
    """Root alpha of E_{p_alpha}[M] = target per row: bracket, then safeguarded Newton."""
    K = target_K.shape[0]
    f = lambda idx, a: _peak_f(logp_KxV[idx], M_V, target_K[idx], a)
    lo, hi = np.full(K, -1.0), np.full(K, 1.0)
    all_idx = np.arange(K)
    f_lo, _ = f(all_idx, lo)
    f_hi, _ = f(all_idx, hi)
    # E is strictly increasing with limits min M, max M, and target is strictly inside,
    # so doubling the bracket terminates (for non-extremal tokens).
    up = np.flatnonzero(f_hi < 0)
    for _ in range(1100):
        if up.size == 0 or hi[up[0]] > 1e300:
            break
        lo[up] = hi[up]
        hi[up] *= 2.0
        fu, _ = f(up, hi[up])
        up = up[fu < 0]
    down = np.flatnonzero(f_lo > 0)
    for _ in range(1100):
        if down.size == 0 or lo[down[0]] < -1e300:
            break
        hi[down] = lo[down]
        lo[down] *= 2.0
        fd, _ = f(down, lo[down])
        down = down[fd > 0]
    x = 0.5 * (lo + hi)
    # Unbracketed (target within rounding of an extreme): numerically at +-inf.
    x[up] = np.inf
    x[down] = -np.inf
    dx_old = hi - lo
    dx = dx_old.copy()
    active = np.setdiff1d(all_idx, np.concatenate([up, down]))
    for _ in range(400):  # each bisection halves the bracket: 400 > 1100-bit range + 52 bits
        if active.size == 0:
            break
        xa = x[active]
        fa, fpa = f(active, xa)
        hit = fa == 0
        hi[active] = np.where(fa > 0, xa, hi[active])
        lo[active] = np.where(fa < 0, xa, lo[active])
        la, ha = lo[active], hi[active]
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = xa - fa / fpa
        # rtsafe: bisect when Newton leaves the bracket or does not halve the last step.
        bisect = ~(fpa > 0) | ~(newton > la) | ~(newton < ha) | (np.abs(2 * fa) > np.abs(dx_old[active] * fpa))
        x_new = np.where(bisect, 0.5 * (la + ha), newton)
        x_new = np.where(hit, xa, x_new)
        dx_old[active] = dx[active]
        dx[active] = x_new - xa
        x[active] = x_new
        scale = np.maximum(1.0, np.abs(x_new))
        done = hit | (np.abs(x_new - xa) <= 1e-14 * scale) | (ha - la <= 4e-16 * scale)
        active = active[~done]
    return x


def peak_strengths(p_MxV, M_V) -> np.ndarray:
    """Peak strength alpha_(j,z) of every token's bump (Thm 3.3).

    alpha_(j,z) solves E_{p_alpha(.|c_j)}[M] = M(z); since E is strictly increasing with
    derivative Var (Lemma B.5), Δp(z|c_j, .) increases before it and decreases after.
    Solved per (j, z) by bracket doubling then safeguarded Newton to ~1e-14 relative.

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.

    Returns:
        [M, V] array: +inf for tokens in M_max (increasing on all of R), -inf for tokens
        in M_min (decreasing on all of R), as decided by extremal_tokens(M_V). If M is
        constant (every token in both sets, Δp identically 0) the entries are nan.
    """
    logp = check_p(p_MxV)
    m, V = logp.shape
    M = check_log_odds(M_V, V)
    is_max, is_min = extremal_tokens(M)
    out = np.empty((m, V))
    out[:, is_max] = np.inf
    out[:, is_min] = -np.inf
    out[:, is_max & is_min] = np.nan
    free = ~(is_max | is_min)
    if not free.any():
        return out
    jj, zz = np.nonzero(np.broadcast_to(free, (m, V)))
    for sl in chunks(jj.size, 4 * V):
        out[jj[sl], zz[sl]] = _solve_peaks(logp[jj[sl]], M, M[zz[sl]])
    return out


def limits(p_MxV, M_V):
    """Limits of the steered distribution as alpha -> +-inf (Prop. B.1).

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.

    Returns:
        (plus_MxV, minus_MxV): p(.|c_j) restricted to M_max (resp. M_min, as decided by
        extremal_tokens) and renormalised.
    """
    logp = check_p(p_MxV)
    M = check_log_odds(M_V, logp.shape[1])
    p = np.exp(logp)
    is_max, is_min = extremal_tokens(M)
    out = []
    for mask in (is_max, is_min):
        q = np.where(mask, p, 0.0)
        out.append(q / q.sum(axis=1, keepdims=True))
    return tuple(out)
