"""ufmjax.theory.concepts (Sec. 3.2): Def. 3.5, Eq. 12, Thm 3.6.

Every test asserts an identity of the paper on numbers: a failure means a closed form
(or its numerically stable evaluation) is wrong, not merely a shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from ufmjax import theory as th

from .cases import *  # noqa: F403 (the shared cases of every theory test)


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


