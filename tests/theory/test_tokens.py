"""ufmjax.theory.tokens (Sec. 3.1): log-odds, Lemma B.3, Lemma B.5, Thm 3.3, Prop. B.1.

Every test asserts an identity of the paper on numbers: a failure means a closed form
(or its numerically stable evaluation) is wrong, not merely a shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from ufmjax import theory as th

from .cases import *  # noqa: F403 (the shared cases of every theory test)


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


