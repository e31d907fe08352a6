"""ufmjax.theory.checks: bad input raises ValueError naming the parameter.

A failure means a bad argument got through, or its message no longer names the parameter.
"""

from __future__ import annotations

import numpy as np
import pytest

from ufmjax import theory as th

from .cases import *  # noqa: F403 (the shared cases of every theory test)


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
