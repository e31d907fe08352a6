"""Sec. 3.2 of the paper: concepts. F_C, Δp(C) (Def. 3.5), its derivative (Eq. 12) and the
tanh representation (Thm 3.6) with nu and r. Definitions in docs/theory.md, Sec. 4."""

from __future__ import annotations

import numpy as np

from ufmjax.theory.checks import check_alphas, check_log_odds, check_n_quad, check_p
from ufmjax.theory.core import Concepts, concept_stats

# Quadrature for nu (Thm 3.6): uniform panels up to this |alpha|, geometric beyond.
_NU_UNIFORM_UNTIL = 64.0
_NU_GEOMETRIC_RATIO = 1.05


def _concept_prep(p_MxV, M_V, concept_of_V, alphas_A):
    logp = check_p(p_MxV)
    M = check_log_odds(M_V, logp.shape[1])
    cpt = Concepts(concept_of_V, logp.shape[1])
    alphas = check_alphas(alphas_A)
    return logp, M, cpt, alphas


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
    lF = concept_stats(*_concept_prep(p_MxV, M_V, concept_of_V, alphas_A))[0]
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
    F = np.exp(concept_stats(logp, M, cpt, alphas)[0])
    F0 = np.exp(concept_stats(logp, M, cpt, np.zeros(1))[0])
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
    lF, mu, lF_not, mu_not = concept_stats(logp, M, cpt, alphas)
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
        _, mu, lF_not, mu_not = concept_stats(logp, M, cpt, sign * nodes.ravel())
        g = np.where(np.isneginf(lF_not), 0.0, mu - mu_not).reshape(nodes.shape + (m, G))
        panel = np.einsum("pq,pqmg->pmg", weights, g)
        cum = np.concatenate([np.zeros((1, m, G)), np.cumsum(panel, axis=0)])
        out[sel] = sign * cum[np.searchsorted(edges, targets)]
    return out


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
    n_quad = check_n_quad(n_quad)
    return _nu(*_concept_prep(p_MxV, M_V, concept_of_V, alphas_A), n_quad)


def r(p_MxV, concept_of_V) -> np.ndarray:
    """r_j = logit F_C(0) = log F_C(0) - log(1 - F_C(0))  (Thm 3.6).

    Args:
        p_MxV: unsteered table p(z|c_j).
        concept_of_V: integer concept id of every token.

    Returns:
        [M, G] array (+inf when C is the whole vocabulary).
    """
    logp = check_p(p_MxV)
    cpt = Concepts(concept_of_V, logp.shape[1])
    lF, _, lF_not, _ = concept_stats(logp, np.zeros(logp.shape[1]), cpt, np.zeros(1))
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
    n_quad = check_n_quad(n_quad)
    logp, M, cpt, alphas = _concept_prep(p_MxV, M_V, concept_of_V, alphas_A)
    nu_AxMxG = _nu(logp, M, cpt, alphas, n_quad)
    lF, _, lF_not, _ = concept_stats(logp, M, cpt, np.zeros(1))
    r_MxG = (lF - lF_not)[0]
    return (np.tanh(0.5 * (nu_AxMxG + r_MxG)) - np.tanh(0.5 * r_MxG)) / (2.0 * cpt.counts_G)
