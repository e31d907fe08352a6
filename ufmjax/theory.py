"""Closed forms of the steering-strength theory (THEORY.md), in float64 numpy.

Source: Taimeskhanov, Vaiter, Garreau, "Towards Understanding Steering Strength"
(arXiv 2602.02712). Everything here is plain numpy on purpose: it is an independent
reference for the JAX alpha-sweep kernel, sharing no code with it.

Shape legend for suffixes:
    M = contexts c_1..c_m          V = vocabulary tokens z
    A = steering strengths alpha   G = concepts C_1..C_G
    K = flattened (context, token) pairs being solved for
    Q = quadrature nodes
e.g. ``p_MxV`` is the (m, V) table p(z|c_j), ``M_V`` the log-odds vector, and a result
``..._AxMxG`` holds one value per (alpha, context, concept).

Conventions:
    * ``p_MxV`` must be strictly positive, finite, with rows summing to 1 within 1e-4;
      rows are renormalised in log space before use (so float32 softmax outputs are fine).
    * The steered distribution of context j is p_alpha(z|c_j) ∝ p(z|c_j) exp(alpha M(z))
      (Lemma B.3); it is invariant to adding a constant to M.
    * All computations go through log space with the row maximum subtracted, so
      |alpha| up to 1e6 (and beyond) gives finite results.
    * Bad input raises ValueError naming the offending parameter.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "log_odds",
    "steered_probs",
    "mean_log_odds",
    "var_log_odds",
    "token_derivative",
    "token_second_derivative",
    "extremal_tokens",
    "peak_strengths",
    "concept_probs",
    "concept_delta",
    "concept_derivative",
    "nu",
    "r",
    "tanh_representation",
    "delta_ce",
    "delta_ce_derivatives",
    "ce_curvature",
    "kl_steered_base",
    "limits",
    "entropy",
]

# float32 softmax outputs converted to float64 are accepted; logits or unnormalised
# counts are not.
ROW_SUM_ATOL = 1e-4
# Largest temporary (in float64 elements, 32 MiB) built at once by chunked loops.
_CHUNK_ELEMS = 1 << 22
# Quadrature for nu (Thm 3.6): uniform panels up to this |alpha|, geometric beyond.
_NU_UNIFORM_UNTIL = 64.0
_NU_GEOMETRIC_RATIO = 1.05


# ----------------------------------------------------------------------------- validation


def _as_float(x, name: str) -> np.ndarray:
    """np.asarray(x, float64), turning conversion failures into a ValueError naming x."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array: {err}") from None


def _check_distribution_table(x, name: str) -> np.ndarray:
    arr = _as_float(x, name)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ValueError(f"{name} must be a 2-D (m, V) table with m >= 1, V >= 2, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    sums = arr.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > ROW_SUM_ATOL):
        worst = float(sums[np.argmax(np.abs(sums - 1.0))])
        raise ValueError(f"{name} rows must sum to 1 (within {ROW_SUM_ATOL}), found a row summing to {worst}")
    return arr


def _check_p(p_MxV) -> np.ndarray:
    """Validate p and return its row-normalised log-probabilities [M, V]."""
    p = _check_distribution_table(p_MxV, "p_MxV")
    if np.any(p <= 0):
        # log-odds (Def. 3.2) and the steered distribution need log p finite everywhere.
        raise ValueError("p_MxV must be strictly positive")
    logp = np.log(p)
    return logp - _logsumexp(logp, axis=-1)[:, None]


def _check_M(M_V, V: int) -> np.ndarray:
    M = _as_float(M_V, "M_V")
    if M.shape != (V,):
        raise ValueError(f"M_V must be a vector of length V={V}, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("M_V must be finite")
    return M


def _check_alphas(alphas_A) -> np.ndarray:
    a = np.atleast_1d(_as_float(alphas_A, "alphas_A"))
    if a.ndim != 1:
        raise ValueError(f"alphas_A must be a scalar or 1-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("alphas_A must be finite")
    return a


def _check_index(x, m: int, name: str) -> np.ndarray:
    idx = np.asarray(x)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of context indices, got shape {idx.shape}")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {idx.dtype}")
    if np.any(idx < 0) or np.any(idx >= m):
        raise ValueError(f"{name} indices must lie in [0, m={m}), got {idx.tolist()}")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{name} must not repeat a context index, got {idx.tolist()}")
    return idx.astype(np.intp)


def _check_pi(pi_M, m: int) -> np.ndarray:
    if pi_M is None:
        return np.full(m, 1.0 / m)
    pi = _as_float(pi_M, "pi_M")
    if pi.shape != (m,):
        raise ValueError(f"pi_M must be a vector of length m={m}, got shape {pi.shape}")
    if not np.all(np.isfinite(pi)) or np.any(pi < 0):
        raise ValueError("pi_M must be finite and non-negative")
    if abs(pi.sum() - 1.0) > ROW_SUM_ATOL:
        raise ValueError(f"pi_M must sum to 1, got {pi.sum()}")
    return pi / pi.sum()


def _check_q(q_MxV, logp_MxV: np.ndarray) -> np.ndarray:
    if q_MxV is None:
        return np.exp(logp_MxV)  # Assumption 2: the model's own probabilities
    q = _check_distribution_table(q_MxV, "q_MxV")
    if q.shape != logp_MxV.shape:
        raise ValueError(f"q_MxV must have the shape of p_MxV {logp_MxV.shape}, got {q.shape}")
    return q / q.sum(axis=1, keepdims=True)


class _Concepts:
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


# ----------------------------------------------------------------------------- kernels


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        out = mx + np.log(np.sum(np.exp(x - mx), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def _centered_logits(logp_XxV: np.ndarray, M_V: np.ndarray, alpha_X: np.ndarray) -> np.ndarray:
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


def _steered_logp(logp_MxV: np.ndarray, M_V: np.ndarray, alphas_A: np.ndarray) -> np.ndarray:
    """log p_alpha(z|c_j) [A, M, V] (Lemma B.3)."""
    logits = _centered_logits(logp_MxV[None], M_V, alphas_A[:, None])
    return logits - _logsumexp(logits, axis=-1)[..., None]


def _moments(p_XxV: np.ndarray, M_V: np.ndarray):
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


def _chunks(n_rows: int, row_elems: int):
    step = max(1, _CHUNK_ELEMS // max(1, row_elems))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _leave_one_out(lF: np.ndarray, mu: np.ndarray):
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


def _concept_stats(logp_MxV: np.ndarray, M_V: np.ndarray, cpt: _Concepts, alphas_A: np.ndarray):
    """Per-concept log F_C, mu_C, log F_notC, mu_notC under p_alpha, each [A, M, G].

    mu_C = E_{p_alpha}[M | Z in C] is computed with weights normalised inside C, so it is
    exact even when F_C itself underflows to 0 (needed by the integrand of nu, Thm 3.6).
    """
    m, V = logp_MxV.shape
    A, G = alphas_A.shape[0], cpt.G
    out = [np.empty((A, m, G)) for _ in range(4)]
    M_sorted = M_V[cpt.order_V]
    for sl in _chunks(A, m * V):
        logits = _centered_logits(logp_MxV[None], M_V, alphas_A[sl, None])[..., cpt.order_V]
        mx = np.maximum.reduceat(logits, cpt.starts_G, axis=-1)
        w = np.exp(logits - np.repeat(mx, cpt.counts_G, axis=-1))
        sw = np.add.reduceat(w, cpt.starts_G, axis=-1)
        swm = np.add.reduceat(w * M_sorted, cpt.starts_G, axis=-1)
        lse = mx + np.log(sw)
        lF = lse - _logsumexp(lse, axis=-1)[..., None]
        mu = swm / sw
        lF_not, mu_not = _leave_one_out(lF, mu)
        for o, v in zip(out, (lF, mu, lF_not, mu_not)):
            o[sl] = v
    return tuple(out)


def _concept_prep(p_MxV, M_V, concept_of_V, alphas_A):
    logp = _check_p(p_MxV)
    M = _check_M(M_V, logp.shape[1])
    cpt = _Concepts(concept_of_V, logp.shape[1])
    alphas = _check_alphas(alphas_A)
    return logp, M, cpt, alphas


# ----------------------------------------------------------------------------- token level


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
    logp = _check_p(p_MxV)
    m = logp.shape[0]
    P_ = _check_index(P, m, "P")
    N_ = _check_index(N, m, "N")
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
    logp = _check_p(p_MxV)
    M = _check_M(M_V, logp.shape[1])
    return np.exp(_steered_logp(logp, M, _check_alphas(alphas_A)))


def _token_moments(p_MxV, M_V, alphas_A):
    logp = _check_p(p_MxV)
    M = _check_M(M_V, logp.shape[1])
    pa = np.exp(_steered_logp(logp, M, _check_alphas(alphas_A)))
    mean, var, dev = _moments(pa, M)
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
    M = _as_float(M_V, "M_V")
    if M.ndim != 1 or M.size == 0 or not np.all(np.isfinite(M)):
        raise ValueError(f"M_V must be a non-empty finite 1-D vector, got shape {M.shape}")
    rtol = float(rtol)
    if not (np.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be finite and >= 0, got {rtol}")
    tol = rtol * float(np.max(np.abs(M)))
    return M >= M.max() - tol, M <= M.min() + tol


def _peak_f(logp_KxV, M_V, target_K, alpha_K):
    """E_{p_alpha}[M] - target and its alpha-derivative Var, one alpha per row."""
    logits = _centered_logits(logp_KxV, M_V, alpha_K)
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
    logp = _check_p(p_MxV)
    m, V = logp.shape
    M = _check_M(M_V, V)
    is_max, is_min = extremal_tokens(M)
    out = np.empty((m, V))
    out[:, is_max] = np.inf
    out[:, is_min] = -np.inf
    out[:, is_max & is_min] = np.nan
    free = ~(is_max | is_min)
    if not free.any():
        return out
    jj, zz = np.nonzero(np.broadcast_to(free, (m, V)))
    for sl in _chunks(jj.size, 4 * V):
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
    logp = _check_p(p_MxV)
    M = _check_M(M_V, logp.shape[1])
    p = np.exp(logp)
    is_max, is_min = extremal_tokens(M)
    out = []
    for mask in (is_max, is_min):
        q = np.where(mask, p, 0.0)
        out.append(q / q.sum(axis=1, keepdims=True))
    return tuple(out)


# ----------------------------------------------------------------------------- concept level


def concept_probs(p_MxV, M_V, concept_of_V, alphas_A) -> np.ndarray:
    """Steered concept mass F_C(alpha) = sum_{z in C} p_alpha(z|c_j).

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        concept_of_V: integer concept id of every token; G = max + 1, all ids used.
        alphas_A: steering strengths.

    Returns:
        [A, M, G] array; sums to 1 over G.
    """
    lF = _concept_stats(*_concept_prep(p_MxV, M_V, concept_of_V, alphas_A))[0]
    return np.exp(lF)


def concept_delta(p_MxV, M_V, concept_of_V, alphas_A) -> np.ndarray:
    """Concept-level effect Δp(C|c_j, alpha) = (F_C(alpha) - F_C(0)) / |C|  (Def. 3.5).

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        concept_of_V: integer concept id of every token (sizes may differ).
        alphas_A: steering strengths.

    Returns:
        [A, M, G] array.
    """
    logp, M, cpt, alphas = _concept_prep(p_MxV, M_V, concept_of_V, alphas_A)
    F = np.exp(_concept_stats(logp, M, cpt, alphas)[0])
    F0 = np.exp(_concept_stats(logp, M, cpt, np.zeros(1))[0])
    return (F - F0) / cpt.counts_G


def concept_derivative(p_MxV, M_V, concept_of_V, alphas_A) -> np.ndarray:
    """d Δp(C|c_j, alpha)/d alpha = F (1 - F) (mu_C - mu_notC) / |C|  (Eq. 12, Thm 3.6).

    F (1 - F) is formed as exp(log F_C + log F_notC), so it is 0 (not nan) when F_C
    underflows to 0 or 1 - F_C to 0, and a single-concept vocabulary gives 0.

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        concept_of_V: integer concept id of every token.
        alphas_A: steering strengths.

    Returns:
        [A, M, G] array, the alpha-derivative of concept_delta.
    """
    logp, M, cpt, alphas = _concept_prep(p_MxV, M_V, concept_of_V, alphas_A)
    lF, mu, lF_not, mu_not = _concept_stats(logp, M, cpt, alphas)
    gap = np.where(np.isneginf(lF_not), 0.0, mu - mu_not)
    return np.exp(lF + lF_not) * gap / cpt.counts_G


def _nu(logp, M, cpt, alphas, n_quad):
    """nu_j(alpha) = ∫_0^alpha (mu_C(t) - mu_notC(t)) dt by composite Gauss-Legendre.

    The integrand is analytic in the strip |Im t| < pi / ptp(M) (the tilted partition
    functions sum_z p e^{tM} have no zeros there), so on panels of width h = 4/ptp(M)
    Gauss-Legendre with n_quad = 16 nodes errs by ~3.4^-32 (1e-16 observed); panels are
    uniform up to |t| = 64 and grow by 5% beyond, where the integrand has flattened. All alphas of one sign share one panel grid
    (each alpha is a panel edge) and the cumulative sum gives every nu at once.
    """
    m, G = logp.shape[0], cpt.G
    out = np.zeros((alphas.shape[0], m, G))
    ptp = float(M.max() - M.min())
    h = min(1.0, 4.0 / ptp) if ptp > 0 else 1.0
    x_Q, w_Q = np.polynomial.legendre.leggauss(n_quad)
    for sign in (1.0, -1.0):
        sel = sign * alphas > 0
        if not sel.any():
            continue
        targets = sign * alphas[sel]
        amax = float(targets.max())
        n_uni = int(np.ceil(min(amax, _NU_UNIFORM_UNTIL) / h))
        base = h * np.arange(n_uni + 1)
        if base[-1] < amax:
            n_geo = int(np.ceil(np.log(amax / base[-1]) / np.log(_NU_GEOMETRIC_RATIO)))
            base = np.concatenate([base, base[-1] * _NU_GEOMETRIC_RATIO ** np.arange(1, n_geo + 1)])
        edges = np.unique(np.concatenate([base[base < amax], targets]))
        a, b = edges[:-1], edges[1:]
        nodes = a[:, None] + (b - a)[:, None] * (0.5 * (x_Q + 1.0))
        weights = (b - a)[:, None] * (0.5 * w_Q)
        _, mu, lF_not, mu_not = _concept_stats(logp, M, cpt, sign * nodes.ravel())
        g = np.where(np.isneginf(lF_not), 0.0, mu - mu_not).reshape(nodes.shape + (m, G))
        panel = np.einsum("pq,pqmg->pmg", weights, g)
        cum = np.concatenate([np.zeros((1, m, G)), np.cumsum(panel, axis=0)])
        out[sel] = sign * cum[np.searchsorted(edges, targets)]
    return out


def _check_n_quad(n_quad) -> int:
    if isinstance(n_quad, bool) or not isinstance(n_quad, (int, np.integer)) or n_quad < 2:
        raise ValueError(f"n_quad must be an integer >= 2, got {n_quad!r}")
    return int(n_quad)


def nu(p_MxV, M_V, concept_of_V, alphas_A, n_quad: int = 16) -> np.ndarray:
    """nu_j(alpha) = ∫_0^alpha (mu_C(t) - mu_notC(t)) dt  (Thm 3.6), by quadrature.

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        concept_of_V: integer concept id of every token.
        alphas_A: steering strengths.
        n_quad: Gauss-Legendre nodes per panel.

    Returns:
        [A, M, G] array; logit F_C(alpha) = r + nu.
    """
    n_quad = _check_n_quad(n_quad)
    return _nu(*_concept_prep(p_MxV, M_V, concept_of_V, alphas_A), n_quad)


def r(p_MxV, concept_of_V) -> np.ndarray:
    """r_j = logit F_C(0) = log F_C(0) - log(1 - F_C(0))  (Thm 3.6).

    Args:
        p_MxV: unsteered table p(z|c_j).
        concept_of_V: integer concept id of every token.

    Returns:
        [M, G] array (+inf when C is the whole vocabulary).
    """
    logp = _check_p(p_MxV)
    cpt = _Concepts(concept_of_V, logp.shape[1])
    lF, _, lF_not, _ = _concept_stats(logp, np.zeros(logp.shape[1]), cpt, np.zeros(1))
    return (lF - lF_not)[0]


def tanh_representation(p_MxV, M_V, concept_of_V, alphas_A, n_quad: int = 16) -> np.ndarray:
    """Δp(C|c_j, alpha) = (tanh((nu_j(alpha) + r_j)/2) - tanh(r_j/2)) / (2|C|)  (Thm 3.6).

    Follows from Eq. 12: d logit F_C / d alpha = mu_C - mu_notC, and
    sigmoid(x) = (1 + tanh(x/2)) / 2. nu is integrated numerically, so agreement with
    concept_delta (~1e-15 observed for |alpha| <= 60) checks Eq. 12 independently.

    Args:
        p_MxV: unsteered table p(z|c_j).
        M_V: log-odds vector.
        concept_of_V: integer concept id of every token.
        alphas_A: steering strengths.
        n_quad: Gauss-Legendre nodes per quadrature panel.

    Returns:
        [A, M, G] array.
    """
    n_quad = _check_n_quad(n_quad)
    logp, M, cpt, alphas = _concept_prep(p_MxV, M_V, concept_of_V, alphas_A)
    nu_AxMxG = _nu(logp, M, cpt, alphas, n_quad)
    lF, _, lF_not, _ = _concept_stats(logp, M, cpt, np.zeros(1))
    r_MxG = (lF - lF_not)[0]
    return (np.tanh(0.5 * (nu_AxMxG + r_MxG)) - np.tanh(0.5 * r_MxG)) / (2.0 * cpt.counts_G)


# ----------------------------------------------------------------------------- cross-entropy


def _centered_cgf(logp_MxV, M_V, alphas_A):
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
    s_big = _logsumexp(logp_MxV + x, axis=-1)
    return np.where(small, s_small, s_big), mean0


def delta_ce(p_MxV, M_V, alphas_A, pi_M=None, q_MxV=None) -> np.ndarray:
    """ΔCE(alpha) = CE(f_alpha) - CE(f)  (Def. 3.7).

    CE(f) = -sum_j pi_j sum_z q(z|c_j) log p_alpha(z|c_j); here
    ΔCE = sum_j pi_j (log Z_j(alpha) - alpha E_{q_j}[M]) with Z_j = sum_z p_j e^{alpha M},
    which avoids subtracting two cross-entropies.

    Args:
        p_MxV: unsteered (model) table p(z|c_j).
        M_V: log-odds vector.
        alphas_A: steering strengths.
        pi_M: context probabilities, uniform if None.
        q_MxV: data table the CE is measured against; p if None (Assumption 2), in which
            case ΔCE = sum_j pi_j KL(p_j || p_alpha,j) >= 0.

    Returns:
        [A] array.
    """
    logp = _check_p(p_MxV)
    m, V = logp.shape
    M = _check_M(M_V, V)
    alphas = _check_alphas(alphas_A)
    pi = _check_pi(pi_M, m)
    q = _check_q(q_MxV, logp)
    s, mean0 = _centered_cgf(logp, M, alphas)
    per_ctx = s + alphas[:, None] * (mean0 - q @ M)
    return per_ctx @ pi


def delta_ce_derivatives(p_MxV, M_V, alphas_A, pi_M=None, q_MxV=None):
    """First and second alpha-derivatives of ΔCE (Thm 3.8).

    ΔCE'(alpha) = sum_j pi_j (E_{p_alpha}[M] - E_{q_j}[M]) (= E_alpha - E_0 when q = p,
    so ΔCE'(0) = 0); ΔCE''(alpha) = sum_j pi_j Var_{p_alpha}(M) > 0.

    Args:
        p_MxV: unsteered (model) table.
        M_V: log-odds vector.
        alphas_A: steering strengths.
        pi_M: context probabilities, uniform if None.
        q_MxV: data table, p if None.

    Returns:
        (d1_A, d2_A).
    """
    logp = _check_p(p_MxV)
    m, V = logp.shape
    M = _check_M(M_V, V)
    alphas = _check_alphas(alphas_A)
    pi = _check_pi(pi_M, m)
    q = _check_q(q_MxV, logp)
    p = np.exp(logp)
    mean0 = p @ M
    pa = np.exp(_steered_logp(logp, M, alphas))
    # E_alpha - E_0 as one sum of p_alpha (M - E_0): exact 0 at alpha = 0 up to rounding.
    shift = np.sum(pa * (M - mean0[:, None]), axis=-1)
    d1 = (shift + (mean0 - q @ M)) @ pi
    d2 = _moments(pa, M)[1] @ pi
    return d1, d2


def ce_curvature(p_MxV, M_V, pi_M=None) -> float:
    """ΔCE''(0) = sum_j pi_j Var_{p_j}(M): ΔCE(alpha) = curvature alpha^2 / 2 + o(alpha^2).

    Args:
        p_MxV: unsteered table.
        M_V: log-odds vector.
        pi_M: context probabilities, uniform if None.

    Returns:
        float.
    """
    logp = _check_p(p_MxV)
    M = _check_M(M_V, logp.shape[1])
    pi = _check_pi(pi_M, logp.shape[0])
    return float(_moments(np.exp(logp), M)[1] @ pi)


def kl_steered_base(p_MxV, M_V, alphas_A) -> np.ndarray:
    """KL(p_alpha(.|c_j) || p(.|c_j)) = alpha E_alpha[M] - log Z_j(alpha).

    Its second derivative at alpha = 0 is Var_{p_j}(M), like ΔCE's per context.

    Args:
        p_MxV: unsteered table.
        M_V: log-odds vector.
        alphas_A: steering strengths.

    Returns:
        [A, M] array, >= 0.
    """
    logp = _check_p(p_MxV)
    M = _check_M(M_V, logp.shape[1])
    alphas = _check_alphas(alphas_A)
    s, mean0 = _centered_cgf(logp, M, alphas)
    pa = np.exp(_steered_logp(logp, M, alphas))
    shift = np.sum(pa * (M - mean0[:, None]), axis=-1)
    return np.maximum(alphas[:, None] * shift - s, 0.0)


def entropy(p_MxV, pi_M=None) -> float:
    """Data entropy -sum_j pi_j sum_z p(z|c_j) log p(z|c_j), the minimum of CE (Def. 2.2).

    Args:
        p_MxV: table p(z|c_j).
        pi_M: context probabilities, uniform if None.

    Returns:
        float (nats).
    """
    logp = _check_p(p_MxV)
    pi = _check_pi(pi_M, logp.shape[0])
    return float(-np.sum(np.exp(logp) * logp, axis=1) @ pi)
