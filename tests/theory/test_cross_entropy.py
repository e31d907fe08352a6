"""ufmjax.theory.cross_entropy (Sec. 3.3): Def. 3.7, Thm 3.8, KL and entropy.

Every test asserts an identity of the paper on numbers: a failure means a closed form
(or its numerically stable evaluation) is wrong, not merely a shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from ufmjax import theory as th

from .cases import *  # noqa: F403 (the shared cases of every theory test)


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


