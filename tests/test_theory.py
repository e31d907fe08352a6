"""Numerical checks of ufmjax.theory, the float64 closed forms of THEORY.md.

Every test asserts an identity of the paper on numbers: a failure means a closed form
(or its numerically stable evaluation) is wrong, not merely a shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from ufmjax import theory as th

CASES = [(9, 3, 0.05), (12, 4, 0.2), (20, 5, 0.1), (30, 3, 0.5)]  # (V, G, eps)
N_PER_CONCEPT = 2  # contexts per concept
TARGET = 0  # target concept T


# ----------------------------------------------------------------------------- data


def assumption1_table(V, G, eps, rng=None, n_per=N_PER_CONCEPT):
    """Assumption 1 table (App. B.1, B.3): a_z = (1-eps) gamma_z, b_z = eps/(G-1) omega_z.

    Profiles are uniform when rng is None, else Dirichlet inside each concept, redrawn
    until 1 > a_z > b_z > 0 holds.
    """
    s = V // G
    concept_of = np.repeat(np.arange(G), s)
    for _ in range(1000):
        if rng is None:
            gamma = omega = np.full(V, 1.0 / s)
        else:
            gamma = np.concatenate([rng.dirichlet(np.full(s, 5.0)) for _ in range(G)])
            omega = np.concatenate([rng.dirichlet(np.full(s, 5.0)) for _ in range(G)])
        a = (1 - eps) * gamma
        b = eps / (G - 1) * omega
        if np.all(a > b):
            break
    else:  # pragma: no cover
        raise RuntimeError("could not draw profiles satisfying Assumption 1")
    ctx_concept = np.repeat(np.arange(G), n_per)
    p = np.where(concept_of[None, :] == ctx_concept[:, None], a[None, :], b[None, :])
    return p, ctx_concept, concept_of


def softmax(x):
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def random_ufm(seed, V=15, m=6, d=4):
    """A generic UFM (no Assumption 1): W [V, d], H [d, m], p = softmax(W h_j)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(V, d))
    H = rng.normal(size=(d, m))
    p = softmax((W @ H).T)
    concept_of = rng.permutation(np.arange(V) % 4)  # concept sizes 4, 4, 4, 3
    return W, H, p, concept_of


def make_setups():
    setups = []
    for i, (V, G, eps) in enumerate(CASES):
        rng = np.random.default_rng(100 + i)
        p, ctx, concept_of = assumption1_table(V, G, eps, rng)
        P = np.flatnonzero(ctx == TARGET)
        S = 1  # opposite concept of the contrastive setting
        N_con = np.flatnonzero(ctx == S)
        N_rand = rng.choice(np.flatnonzero(ctx != TARGET), size=P.size, replace=False)
        setups.append(dict(name=f"A1-V{V}G{G}e{eps}-contrastive", p=p, P=P, N=N_con,
                           concept_of=concept_of, a1=True, S=S))
        setups.append(dict(name=f"A1-V{V}G{G}e{eps}-random", p=p, P=P, N=N_rand,
                           concept_of=concept_of, a1=True, S=None))
    for seed in (1, 2):
        _, _, p, concept_of = random_ufm(seed)
        setups.append(dict(name=f"generic-{seed}", p=p, P=np.array([0, 1]), N=np.array([2, 3]),
                           concept_of=concept_of, a1=False, S=None))
    for s in setups:
        s["M"] = th.log_odds(s["p"], s["P"], s["N"])
    return setups


SETUPS = make_setups()
IDS = [s["name"] for s in SETUPS]
A1_SETUPS = [s for s in SETUPS if s["a1"]]
A1_IDS = [s["name"] for s in A1_SETUPS]
ALPHAS = np.array([-3.0, -0.7, 0.0, 0.4, 2.5])


def central_difference(fn, alphas, h):
    return (fn(alphas + h) - fn(alphas - h)) / (2 * h)


def assert_close(actual, expected, rel, what):
    """max |actual - expected| <= rel * max |expected| (plus a tiny floor)."""
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rel * scale + 1e-15, f"{what}: max error {err:.3e} > {rel:g} * scale {scale:.3e}"


# ----------------------------------------------------------------------------- data checks


def test_reference_point_entropy():
    # V=9, G=3, eps=0.05, uniform profiles: every p(.|c) has entropy 1.33178 nats (Sec. 2.1).
    p, _, _ = assumption1_table(9, 3, 0.05)
    row_entropy = -np.sum(p * np.log(p), axis=1)
    np.testing.assert_allclose(row_entropy, 1.33178, atol=5e-6)
    assert abs(th.entropy(p) - 1.33178) < 5e-6
    assert abs(th.entropy(p, pi_M=np.arange(1, 7) / 21.0) - 1.33178) < 5e-6


@pytest.mark.parametrize("setup", A1_SETUPS, ids=A1_IDS)
def test_sign_separation(setup):
    # Lemma B.4: under Assumption 1, M(z) > 0 iff z is in the target concept.
    M, in_T = setup["M"], setup["concept_of"] == TARGET
    assert np.all(M[in_T] > 0) and np.all(M[~in_T] <= 0)
    if setup["S"] is not None:
        # Contrastive: log(b/a) < 0 on the opposite concept, log(b/b) = 0 elsewhere.
        in_S = setup["concept_of"] == setup["S"]
        assert np.all(M[in_S] < 0)
        assert np.all(M[~in_T & ~in_S] == 0)


def test_log_odds_formula():
    # Def. 3.2 written out by hand on a generic table.
    p = SETUPS[-1]["p"]
    P, N = np.array([4, 1]), np.array([0, 5])
    expected = 0.5 * (np.log(p[4] * p[1]) - np.log(p[0] * p[5]))
    np.testing.assert_allclose(th.log_odds(p, P, N), expected, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- token level


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_steered_probs_normalised_and_identity_at_zero(setup):
    p, M = setup["p"], setup["M"]
    pa = th.steered_probs(p, M, np.linspace(-40, 40, 17))
    np.testing.assert_allclose(pa.sum(axis=-1), 1.0, atol=1e-13)
    assert np.all(pa >= 0)
    np.testing.assert_allclose(th.steered_probs(p, M, 0.0)[0], p, rtol=1e-13)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lemma_B3_matches_steered_ufm(seed):
    # Lemma B.3: softmax(W (h_j + alpha v)) with v the difference of means equals
    # p e^{alpha M} / Z for ANY UFM, M computed from its own probabilities.
    W, H, p, _ = random_ufm(seed)
    P, N = np.array([0, 3]), np.array([1, 5])
    v = H[:, P].mean(axis=1) - H[:, N].mean(axis=1)
    M = th.log_odds(p, P, N)
    alphas = np.array([-20.0, -2.0, -0.1, 0.0, 0.5, 3.0, 20.0])
    direct = np.stack([softmax(((H + a * v[:, None]).T) @ W.T) for a in alphas])
    np.testing.assert_allclose(th.steered_probs(p, M, alphas), direct, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_token_derivatives_match_finite_differences(setup):
    p, M = setup["p"], setup["M"]
    d1 = th.token_derivative(p, M, ALPHAS)
    d2 = th.token_second_derivative(p, M, ALPHAS)
    fd1 = central_difference(lambda a: th.steered_probs(p, M, a), ALPHAS, 1e-4)
    fd2 = central_difference(lambda a: th.token_derivative(p, M, a), ALPHAS, 1e-4)
    assert_close(d1, fd1, 1e-6, "Lemma B.5 token derivative")
    assert_close(d2, fd2, 1e-6, "token second derivative")
    # Probabilities stay normalised, so both derivatives sum to 0 over tokens.
    np.testing.assert_allclose(d1.sum(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(d2.sum(axis=-1), 0.0, atol=1e-13)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_mean_log_odds_derivative_is_variance(setup):
    p, M = setup["p"], setup["M"]
    var = th.var_log_odds(p, M, ALPHAS)
    fd = central_difference(lambda a: th.mean_log_odds(p, M, a), ALPHAS, 1e-4)
    assert_close(var, fd, 1e-6, "dE/dalpha = Var")
    assert np.all(var > 0)  # E strictly increasing
    # Direct definitions from steered_probs.
    pa = th.steered_probs(p, M, ALPHAS)
    mean = pa @ M
    np.testing.assert_allclose(th.mean_log_odds(p, M, ALPHAS), mean, atol=1e-13)
    np.testing.assert_allclose(var, (pa * M**2).sum(-1) - mean**2, atol=1e-11)


def test_extremal_tokens_ties_and_rtol():
    M = np.array([1.0, 3.0, 3.0 * (1 - 1e-12), -2.0, -2.0, 0.5])
    is_max, is_min = th.extremal_tokens(M)
    np.testing.assert_array_equal(is_max, [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(is_min, [0, 0, 0, 1, 1, 0])
    is_max0, _ = th.extremal_tokens(M, rtol=0.0)
    np.testing.assert_array_equal(is_max0, [0, 1, 0, 0, 0, 0])


def _bisect_peaks(p, M, j_K, z_K, lo=-200.0, hi=200.0, iters=80):
    """Independent root of E_alpha[M] = M(z) by plain bisection (test reference)."""
    lo, hi = np.full(j_K.size, lo), np.full(j_K.size, hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        e = th.mean_log_odds(p, M, mid)[np.arange(j_K.size), j_K]
        above = e > M[z_K]
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_peak_strengths(setup):
    p, M = setup["p"], setup["M"]
    peaks = th.peak_strengths(p, M)
    is_max, is_min = th.extremal_tokens(M)
    # Thm 3.3: +inf exactly on M_max, -inf exactly on M_min, finite elsewhere.
    assert np.all(np.isposinf(peaks[:, is_max])) and np.all(np.isneginf(peaks[:, is_min]))
    free = ~(is_max | is_min)
    assert np.all(np.isfinite(peaks[:, free]))
    j_K, z_K = np.nonzero(np.isfinite(peaks))
    a_K = peaks[j_K, z_K]
    K = np.arange(a_K.size)
    # The peak solves E_alpha[M] = M(z), so the Lemma B.5 derivative vanishes there ...
    e = th.mean_log_odds(p, M, a_K)[K, j_K]
    assert np.max(np.abs(e - M[z_K])) <= 1e-12 * (1 + np.abs(M).max())
    # ... and changes sign from + to - (a bump, not a dip).
    delta = 1e-3 * np.maximum(1.0, np.abs(a_K))
    before = th.token_derivative(p, M, a_K - delta)[K, j_K, z_K]
    after = th.token_derivative(p, M, a_K + delta)[K, j_K, z_K]
    assert np.all(before > 0) and np.all(after < 0)
    # Independent bisection agrees far below 1e-6.
    assert np.all(np.abs(a_K) < 150)
    ref = _bisect_peaks(p, M, j_K, z_K)
    np.testing.assert_allclose(a_K, ref, rtol=1e-10, atol=1e-10)
    # Increasing before the peak, decreasing after, on a grid (Thm 3.3).
    grid = np.linspace(-30, 30, 61)
    sign = np.sign(th.token_derivative(p, M, grid))  # [A, M, V]
    expected = np.sign(peaks[None] - grid[:, None, None])
    nonzero = th.steered_probs(p, M, grid) > 1e-250
    assert np.all((sign == expected)[nonzero])


@pytest.mark.parametrize("setup", A1_SETUPS, ids=A1_IDS)
def test_off_target_peaks_precede_target_peaks(setup):
    # Thm 3.3 peak order under Assumption 1, for every context.
    peaks = th.peak_strengths(setup["p"], setup["M"])
    in_T = setup["concept_of"] == TARGET
    assert np.all(peaks[:, ~in_T].max(axis=1) < peaks[:, in_T].min(axis=1))


def test_peak_strengths_scaling_and_root_at_zero():
    # A token with M(z) = E_0[M] peaks at alpha = 0; scaling M by 1/s scales every peak
    # by s (Lemma B.3 depends on alpha M only), which exercises roots near 1e5 and 1e-3.
    p = np.array([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    M = np.array([1.0, 0.999, 0.0, -1.0])
    w = p[0, [0, 1, 3]]
    M[2] = w @ M[[0, 1, 3]] / w.sum()  # E_{p_0}[M] = M(z_2) for context 0
    peaks = th.peak_strengths(p, M)
    assert np.all(np.isposinf(peaks[:, 0])) and np.all(np.isneginf(peaks[:, 3]))
    assert abs(peaks[0, 2]) < 1e-14
    for scale in (1e-4, 1e-2, 1e3):
        scaled = th.peak_strengths(p, M * scale)
        np.testing.assert_allclose(scaled[:, 1:3], peaks[:, 1:3] / scale, rtol=1e-11, atol=1e-12 / scale)
    big = th.peak_strengths(p, M * 1e-4)[:, 1]
    assert np.all(big > 5e4)
    e = th.mean_log_odds(p, M * 1e-4, big)[[0, 1], [0, 1]]
    np.testing.assert_allclose(e, M[1] * 1e-4, rtol=1e-13)


def test_limits_with_ties_reference_point():
    # Prop. B.1 with exact ties: contrastive, uniform profiles -> every target token is
    # in M_max, so the +inf limit is uniform on T; the -inf limit is uniform on S.
    p, ctx, concept_of = assumption1_table(9, 3, 0.05)
    M = th.log_odds(p, np.flatnonzero(ctx == 0), np.flatnonzero(ctx == 1))
    plus, minus = th.limits(p, M)
    np.testing.assert_allclose(plus, np.where(concept_of == 0, 1 / 3, 0.0)[None].repeat(6, 0), atol=1e-15)
    np.testing.assert_allclose(minus, np.where(concept_of == 1, 1 / 3, 0.0)[None].repeat(6, 0), atol=1e-15)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_limits_match_large_alpha(setup):
    p, M = setup["p"], setup["M"]
    is_max, is_min = th.extremal_tokens(M)
    # Precondition: the gap to the runner-up makes e^{-alpha gap} negligible for the
    # alphas used below (>= 1e4, and large enough that alpha * gap >= 80).
    gap_plus, gap_minus = M.max() - M[~is_max].max(), M[~is_min].min() - M.min()
    assert min(gap_plus, gap_minus) > 1e-4
    big_plus, big_minus = max(1e4, 80 / gap_plus), max(1e4, 80 / gap_minus)
    plus, minus = th.limits(p, M)
    np.testing.assert_allclose(plus.sum(1), 1.0, atol=1e-14)
    # In proportion to p on the extremal set.
    np.testing.assert_allclose(plus[:, is_max] / plus[:, is_max].sum(1, keepdims=True),
                               p[:, is_max] / p[:, is_max].sum(1, keepdims=True), atol=1e-14)
    for alpha, lim in ((big_plus, plus), (-big_minus, minus), (1e6, plus), (-1e6, minus)):
        np.testing.assert_allclose(th.steered_probs(p, M, alpha)[0], lim, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------- concept level


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_concept_probs_and_delta(setup):
    p, M, c = setup["p"], setup["M"], setup["concept_of"]
    G = c.max() + 1
    onehot = np.eye(G)[c]  # [V, G]
    counts = onehot.sum(0)
    F = th.concept_probs(p, M, c, ALPHAS)
    np.testing.assert_allclose(F, th.steered_probs(p, M, ALPHAS) @ onehot, atol=1e-14)
    np.testing.assert_allclose(F.sum(-1), 1.0, atol=1e-14)
    delta = th.concept_delta(p, M, c, ALPHAS)
    # Def. 3.5: the concept average of the token-level Δp.
    dp = th.steered_probs(p, M, ALPHAS) - p[None]
    np.testing.assert_allclose(delta, (dp @ onehot) / counts, atol=1e-14)
    np.testing.assert_array_equal(th.concept_delta(p, M, c, 0.0), 0.0)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_concept_derivative(setup):
    p, M, c = setup["p"], setup["M"], setup["concept_of"]
    onehot = np.eye(c.max() + 1)[c]
    dd = th.concept_derivative(p, M, c, ALPHAS)
    fd = central_difference(lambda a: th.concept_delta(p, M, c, a), ALPHAS, 1e-4)
    assert_close(dd, fd, 1e-6, "Eq. 12 concept derivative")
    # Eq. 12 equals the concept average of Lemma B.5.
    tok = th.token_derivative(p, M, ALPHAS) @ onehot / onehot.sum(0)
    np.testing.assert_allclose(dd, tok, atol=1e-14)
    # Saturated alphas give exact zeros/finite values, never nan.
    assert np.all(np.isfinite(th.concept_derivative(p, M, c, [-1e6, 1e6])))


@pytest.mark.parametrize("setup", A1_SETUPS, ids=A1_IDS)
def test_concept_shapes_under_assumption1(setup):
    # Thm 3.6: the target concept increases on all of R (sigmoid).
    p, M, c = setup["p"], setup["M"], setup["concept_of"]
    grid = np.linspace(-30, 30, 61)
    dd = th.concept_derivative(p, M, c, grid)
    assert np.all(dd[..., TARGET] > 0)
    if setup["S"] is not None:
        S = setup["S"]
        # The opposite concept's largest log-odds is below every other token's: decreases.
        assert np.all(dd[..., S] < 0)
        # A concept with no token in M_max or M_min returns to -F_C(0)/|C| at both ends.
        G = c.max() + 1
        others = [g for g in range(G) if g not in (TARGET, S)]
        F0 = th.concept_probs(p, M, c, 0.0)[0]
        ends = th.concept_delta(p, M, c, [-1e4, 1e4])
        for g in others:
            expected = np.broadcast_to(-F0[:, g] / np.sum(c == g), ends[..., g].shape)
            np.testing.assert_allclose(ends[..., g], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_tanh_representation(setup):
    # Thm 3.6 with nu integrated numerically: an independent check of Eq. 12.
    p, M, c = setup["p"], setup["M"], setup["concept_of"]
    alphas = np.linspace(-60, 60, 41)
    np.testing.assert_allclose(th.tanh_representation(p, M, c, alphas),
                               th.concept_delta(p, M, c, alphas), rtol=0, atol=1e-11)
    # r = logit F_C(0), and logit F_C(alpha) = r + nu where F is not saturated.
    F0 = th.concept_probs(p, M, c, 0.0)[0]
    np.testing.assert_allclose(th.r(p, c), np.log(F0 / (1 - F0)), rtol=1e-12, atol=1e-13)
    small = np.array([-2.0, 0.5, 3.0])
    F = th.concept_probs(p, M, c, small)
    np.testing.assert_allclose(th.r(p, c) + th.nu(p, M, c, small), np.log(F / (1 - F)),
                               rtol=1e-9, atol=1e-9)
    assert np.all(np.isfinite(th.tanh_representation(p, M, c, [-1e6, 1e6])))


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_delta_ce_is_kl_and_derivatives(setup):
    p, M = setup["p"], setup["M"]
    m = p.shape[0]
    alphas = np.array([-4.0, -1.0, 0.0, 0.3, 2.0])
    pa = th.steered_probs(p, M, alphas)
    # With q = p, ΔCE = sum_j pi_j KL(p_j || p_alpha,j) >= 0: computed from the definition.
    direct = np.mean(np.sum(p[None] * (np.log(p[None]) - np.log(pa)), axis=-1), axis=-1)
    dce = th.delta_ce(p, M, alphas)
    np.testing.assert_allclose(dce, direct, rtol=1e-10, atol=1e-14)
    assert dce[2] == 0.0 and np.all(dce >= 0)
    d1, d2 = th.delta_ce_derivatives(p, M, alphas)
    assert abs(d1[2]) < 1e-14  # Thm 3.8: ΔCE'(0) = 0
    assert_close(d1, central_difference(lambda a: th.delta_ce(p, M, a), alphas, 1e-4), 1e-6, "ΔCE'")
    assert_close(d2, central_difference(lambda a: th.delta_ce_derivatives(p, M, a)[0], alphas, 1e-4),
                 1e-6, "ΔCE''")
    assert np.all(d2 > 0)
    # Non-uniform pi and a data table q != p (CE against the data, not the model).
    rng = np.random.default_rng(7)
    pi = rng.dirichlet(np.ones(m))
    q = rng.dirichlet(np.ones(p.shape[1]), size=m)
    ce = lambda a: -np.sum(pi[:, None] * q * np.log(th.steered_probs(p, M, a)), axis=(-2, -1))
    np.testing.assert_allclose(th.delta_ce(p, M, alphas, pi, q), ce(alphas) - ce(0.0), rtol=1e-10, atol=1e-13)
    d1q, d2q = th.delta_ce_derivatives(p, M, alphas, pi, q)
    assert_close(d1q, central_difference(lambda a: th.delta_ce(p, M, a, pi, q), alphas, 1e-4), 1e-6, "ΔCE' (q)")
    assert_close(d2q, central_difference(lambda a: th.delta_ce_derivatives(p, M, a, pi, q)[0], alphas, 1e-4),
                 1e-6, "ΔCE'' (q)")
    np.testing.assert_allclose(d1q, (th.mean_log_odds(p, M, alphas) - q @ M) @ pi, atol=1e-13)
    np.testing.assert_allclose(d2q, th.var_log_odds(p, M, alphas) @ pi, atol=1e-14)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_local_quadratic_law(setup):
    # Thm 3.8: ΔCE(alpha) = (1/2) curvature alpha^2 + o(alpha^2), curvature = ΔCE''(0).
    p, M = setup["p"], setup["M"]
    curv = th.ce_curvature(p, M)
    assert curv > 0
    assert abs(curv - th.delta_ce_derivatives(p, M, 0.0)[1][0]) < 1e-14
    alphas = np.array([1e-2, 1e-3, 1e-4, -1e-4, -1e-3, -1e-2])
    dce = th.delta_ce(p, M, alphas)
    rel = np.abs(dce / (0.5 * curv * alphas**2) - 1)
    # o(alpha^2): the relative error is O(alpha), shrinking at least fivefold per decade
    # down to 1e-4 (ΔCE is evaluated without cancellation).
    assert np.all(rel[1:3] <= 0.2 * rel[0:2] + 1e-9) and np.all(rel[3:5] <= 0.2 * rel[4:6] + 1e-9)
    assert rel[2] < 1e-3 and rel[3] < 1e-3
    # Sharper: ΔCE is the cumulant generating function of M (per context, minus its linear
    # term), so ΔCE - c a^2/2 - k3 a^3/6 = k4 a^4/24 + O(a^5) with k3, k4 cumulants of M.
    pi = np.full(p.shape[0], 1.0 / p.shape[0])
    dev = M - (p @ M)[:, None]
    mu2, mu3, mu4 = (np.sum(p * dev**k, axis=1) @ pi for k in (2, 3, 4))
    resid = dce - 0.5 * curv * alphas**2 - mu3 * alphas**3 / 6
    bound = 2 * (mu4 + 3 * mu2**2) / 24 * alphas**4 + 1e-18
    assert np.all(np.abs(resid) <= bound)
    # Weighted by pi.
    pi = np.linspace(1, 2, p.shape[0])
    pi /= pi.sum()
    np.testing.assert_allclose(th.ce_curvature(p, M, pi), th.var_log_odds(p, M, 0.0)[0] @ pi, rtol=1e-14)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_kl_curvature(setup):
    p, M = setup["p"], setup["M"]
    h = 1e-3
    kl = th.kl_steered_base(p, M, [-h, 0.0, h])
    assert np.all(kl[1] == 0)
    second = (kl[0] - 2 * kl[1] + kl[2]) / h**2
    np.testing.assert_allclose(second, th.var_log_odds(p, M, 0.0)[0], rtol=1e-5)
    alphas = np.array([-5.0, -0.5, 0.2, 3.0])
    pa = th.steered_probs(p, M, alphas)
    direct = np.sum(pa * (np.log(pa) - np.log(p[None])), axis=-1)
    np.testing.assert_allclose(th.kl_steered_base(p, M, alphas), direct, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_extreme_alphas_are_finite(setup):
    p, M, c = setup["p"], setup["M"], setup["concept_of"]
    alphas = np.array([-1e6, -1e4, 1e4, 1e6])
    outputs = [
        th.steered_probs(p, M, alphas), th.mean_log_odds(p, M, alphas), th.var_log_odds(p, M, alphas),
        th.token_derivative(p, M, alphas), th.token_second_derivative(p, M, alphas),
        th.concept_probs(p, M, c, alphas), th.concept_delta(p, M, c, alphas),
        th.concept_derivative(p, M, c, alphas), th.nu(p, M, c, alphas),
        th.delta_ce(p, M, alphas), *th.delta_ce_derivatives(p, M, alphas),
        th.kl_steered_base(p, M, alphas),
    ]
    for out in outputs:
        assert np.all(np.isfinite(out))
    # Saturation: E -> max/min M, Var -> 0, ΔCE grows linearly with slope E_max - E_0.
    mean = th.mean_log_odds(p, M, alphas)
    np.testing.assert_allclose(mean[0], M.min(), atol=1e-12)
    np.testing.assert_allclose(mean[-1], M.max(), atol=1e-12)
    d1 = th.delta_ce_derivatives(p, M, alphas)[0]
    np.testing.assert_allclose(d1[-1], M.max() - np.mean(p @ M), rtol=1e-12)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_naming_parameter():
    s = SETUPS[-1]
    p, M, c = s["p"], s["M"], s["concept_of"]
    with pytest.raises(ValueError, match="disjoint"):
        th.log_odds(p, [0, 1], [1, 2])
    with pytest.raises(ValueError, match="P and N"):
        th.log_odds(p, [0, 1], [2])
    with pytest.raises(ValueError, match="P"):
        th.log_odds(p, [0, 99], [2, 3])
    with pytest.raises(ValueError, match="N"):
        th.log_odds(p, [0, 1], [2, 2])
    with pytest.raises(ValueError, match="N"):
        th.log_odds(p, [0, 1], np.array([2.0, 3.0]))
    with pytest.raises(ValueError, match="P"):
        th.log_odds(p, [], [])
    with pytest.raises(ValueError, match="p_MxV"):
        th.steered_probs(p[0], M, ALPHAS)
    with pytest.raises(ValueError, match="p_MxV"):
        th.steered_probs(np.log(p), M, ALPHAS)
    with pytest.raises(ValueError, match="p_MxV"):
        th.steered_probs(2 * p, M, ALPHAS)
    bad = p.copy()
    bad[0, :2] = [bad[0, 0] + bad[0, 1], 0.0]
    with pytest.raises(ValueError, match="p_MxV"):
        th.log_odds(bad, [0, 1], [2, 3])
    with pytest.raises(ValueError, match="M_V"):
        th.steered_probs(p, M[:-1], ALPHAS)
    with pytest.raises(ValueError, match="M_V"):
        th.peak_strengths(p, np.where(np.arange(M.size) == 0, np.nan, M))
    with pytest.raises(ValueError, match="alphas_A"):
        th.mean_log_odds(p, M, [0.0, np.inf])
    with pytest.raises(ValueError, match="alphas_A"):
        th.mean_log_odds(p, M, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="concept_of_V"):
        th.concept_delta(p, M, c[:-1], ALPHAS)
    with pytest.raises(ValueError, match="concept_of_V"):
        th.concept_delta(p, M, np.where(c == 1, 5, c), ALPHAS)  # ids 1 and 4 unused
    with pytest.raises(ValueError, match="concept_of_V"):
        th.concept_derivative(p, M, c - 1, ALPHAS)
    with pytest.raises(ValueError, match="pi_M"):
        th.delta_ce(p, M, ALPHAS, pi_M=np.ones(p.shape[0]))
    with pytest.raises(ValueError, match="q_MxV"):
        th.delta_ce(p, M, ALPHAS, q_MxV=p[:, :-1])
    with pytest.raises(ValueError, match="rtol"):
        th.extremal_tokens(M, rtol=-1.0)
    with pytest.raises(ValueError, match="n_quad"):
        th.tanh_representation(p, M, c, ALPHAS, n_quad=1)
