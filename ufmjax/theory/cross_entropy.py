"""Sec. 3.3 of the paper: cross-entropy. ΔCE (Def. 3.7), its derivatives and the local
quadratic law (Thm 3.8), KL to the unsteered model, entropy. Definitions in docs/theory.md, Sec. 5."""

from __future__ import annotations

import numpy as np

from ufmjax.theory.checks import check_alphas, check_log_odds, check_p, check_pi, check_q
from ufmjax.theory.core import centered_cgf, moments, steered_logp


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
    logp = check_p(p_MxV)
    m, V = logp.shape
    M = check_log_odds(M_V, V)
    alphas = check_alphas(alphas_A)
    pi = check_pi(pi_M, m)
    q = check_q(q_MxV, logp)
    s, mean0 = centered_cgf(logp, M, alphas)
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
    logp = check_p(p_MxV)
    m, V = logp.shape
    M = check_log_odds(M_V, V)
    alphas = check_alphas(alphas_A)
    pi = check_pi(pi_M, m)
    q = check_q(q_MxV, logp)
    p = np.exp(logp)
    mean0 = p @ M
    pa = np.exp(steered_logp(logp, M, alphas))
    # E_alpha - E_0 as one sum of p_alpha (M - E_0): exact 0 at alpha = 0 up to rounding.
    shift = np.sum(pa * (M - mean0[:, None]), axis=-1)
    d1 = (shift + (mean0 - q @ M)) @ pi
    d2 = moments(pa, M)[1] @ pi
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
    logp = check_p(p_MxV)
    M = check_log_odds(M_V, logp.shape[1])
    pi = check_pi(pi_M, logp.shape[0])
    return float(moments(np.exp(logp), M)[1] @ pi)


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
    logp = check_p(p_MxV)
    M = check_log_odds(M_V, logp.shape[1])
    alphas = check_alphas(alphas_A)
    s, mean0 = centered_cgf(logp, M, alphas)
    pa = np.exp(steered_logp(logp, M, alphas))
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
    logp = check_p(p_MxV)
    pi = check_pi(pi_M, logp.shape[0])
    return float(-np.sum(np.exp(logp) * logp, axis=1) @ pi)
