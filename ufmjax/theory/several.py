"""Several steering vectors at once: the UFM's exponential tilt with a log-odds VECTOR
(docs/theory.md, "Several vectors"), in float64 numpy.

With k vectors v_1..v_k and alpha in R^k, the UFM's steered logits are affine in alpha,
W (h_j + sum_i alpha_i v_i) = l_j + alpha . M with M_i = W v_i (Lemma B.2 for each term), so

    p_alpha(z | c_j) ∝ p(z | c_j) exp(alpha . M(z))           (Lemma B.3 with alpha . M)

is an exponential family in alpha with sufficient statistic M(z) in R^k. Its log-partition's
gradient is E_alpha[M] and its Hessian Cov_alpha(M), which gives every gradient and Hessian
below in closed form (E and Cov per context, under p_alpha(. | c_j)):

    d p(z)      = p(z) (M(z) - E[M])
    d2 p(z)     = p(z) ((M(z) - E M)(M(z) - E M)^T - Cov(M))
    d ΔCE_j     = T_j E_alpha[M] - sum_z t_j(z) M(z)          (= E_alpha[M] - E_0[M] with t = p_0)
    d2 ΔCE_j    = T_j Cov_alpha(M)                            (T_j = total target mass, 1 usually)
    d KL_j      = Cov_alpha(M) alpha
    d2 KL_j     = Cov_alpha(M) + kappa3_alpha(M) . alpha      (third cumulant contracted once)
    d H_j       = -Cov_alpha(M) alpha - Cov_alpha(M, log p)
    d2 H_j      = -Cov_alpha(M) - kappa3_alpha(M) . alpha - kappa3_alpha(M, M, log p)

k = 1 is the scalar theory of Sec. 3 (`tokens`, `concepts`, `cross_entropy`). Shapes: M = the
k x V log-odds ``M_kxV`` (one row per vector), ``p_MxV`` the unsteered table, ``alpha_k``.
"""

from __future__ import annotations

import numpy as np

from ufmjax.theory.core import logsumexp


def _check(p_MxV, M_kxV, alpha_k):
    p = np.asarray(p_MxV, np.float64)
    M = np.asarray(M_kxV, np.float64)
    a = np.asarray(alpha_k, np.float64).reshape(-1)
    if p.ndim != 2 or np.any(p <= 0) or not np.all(np.isfinite(p)):
        raise ValueError("p_MxV must be a strictly positive, finite [M, V] table")
    if M.ndim != 2 or M.shape[1] != p.shape[1] or not np.all(np.isfinite(M)):
        raise ValueError(f"M_kxV must be a finite [k, {p.shape[1]}] array, got shape {M.shape}")
    if a.shape != (M.shape[0],) or not np.all(np.isfinite(a)):
        raise ValueError(f"alpha_k must hold {M.shape[0]} finite numbers, got shape {a.shape}")
    return p, M, a


def tilted(p_MxV, M_kxV, alpha_k) -> np.ndarray:
    """p_alpha(z | c_j) ∝ p(z | c_j) exp(alpha . M(z)), [M, V]."""
    p, M, a = _check(p_MxV, M_kxV, alpha_k)
    logits = np.log(p) + (a @ M)[None, :]
    return np.exp(logits - logsumexp(logits)[:, None])


def moments(p_MxV, M_kxV, alpha_k):
    """(E_alpha[M] [M, k], Cov_alpha(M) [M, k, k], kappa3_alpha(M) [M, k, k, k]) per context."""
    pa = tilted(p_MxV, M_kxV, alpha_k)
    M = np.asarray(M_kxV, np.float64)
    E = pa @ M.T
    c = M[None, :, :] - E[:, :, None]                               # [M, k, V] centred
    cov = np.einsum("mv,miv,mjv->mij", pa, c, c)
    k3 = np.einsum("mv,miv,mjv,mlv->mijl", pa, c, c, c)
    return E, cov, k3


def token_grad_hess(p_MxV, M_kxV, alpha_k):
    """(p_alpha [M, V], grad [M, V, k], Hessian [M, V, k, k]) of every token's probability."""
    pa = tilted(p_MxV, M_kxV, alpha_k)
    E, cov, _ = moments(p_MxV, M_kxV, alpha_k)
    c = np.asarray(M_kxV, np.float64).T[None] - E[:, None, :]       # [M, V, k]
    grad = pa[..., None] * c
    hess = pa[..., None, None] * (c[..., :, None] * c[..., None, :] - cov[:, None])
    return pa, grad, hess


def concept_grad_hess(p_MxV, M_kxV, alpha_k, concept_of_V):
    """(F [M, G], grad [M, G, k], Hessian [M, G, k, k]) of every concept's probability."""
    pa, grad, hess = token_grad_hess(p_MxV, M_kxV, alpha_k)
    c = np.asarray(concept_of_V)
    onehot_VxG = np.eye(int(c.max()) + 1)[c]
    return (pa @ onehot_VxG, np.einsum("mvk,vg->mgk", grad, onehot_VxG),
            np.einsum("mvkl,vg->mgkl", hess, onehot_VxG))


def delta_ce_grad_hess(p_MxV, M_kxV, alpha_k, targets_MxV=None):
    """(ΔCE_j [M], grad [M, k], Hessian [M, k, k]) against targets (the unsteered p by default,
    Assumption 2): CE_j(alpha) - CE_j(0) = -sum_z t_j(z) (log p_alpha - log p)."""
    p, M, a = _check(p_MxV, M_kxV, alpha_k)
    t = p if targets_MxV is None else np.asarray(targets_MxV, np.float64)
    pa = tilted(p, M, a)
    E, cov, _ = moments(p, M, a)
    T = t.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dce = -np.sum(np.where(t > 0, t * (np.log(pa) - np.log(p)), 0.0), axis=1)
    return dce, T[:, None] * E - t @ M.T, T[:, None, None] * cov


def kl_grad_hess(p_MxV, M_kxV, alpha_k):
    """(KL(p_alpha || p) [M], grad [M, k], Hessian [M, k, k])."""
    p, M, a = _check(p_MxV, M_kxV, alpha_k)
    pa = tilted(p, M, a)
    E, cov, k3 = moments(p, M, a)
    kl = np.sum(pa * (np.log(pa) - np.log(p)), axis=1)
    return kl, cov @ a, cov + k3 @ a


def entropy_grad_hess(p_MxV, M_kxV, alpha_k):
    """(H(p_alpha) [M], grad [M, k], Hessian [M, k, k])."""
    p, M, a = _check(p_MxV, M_kxV, alpha_k)
    pa = tilted(p, M, a)
    E, cov, k3 = moments(p, M, a)
    logp = np.log(p)
    cl = logp - np.sum(pa * logp, axis=1, keepdims=True)             # [M, V] centred log p
    c = M[None] - E[:, :, None]                                      # [M, k, V]
    cov_l = np.einsum("mv,miv,mv->mi", pa, c, cl)
    k3_l = np.einsum("mv,miv,mjv,mv->mij", pa, c, c, cl)
    H = -np.sum(pa * np.log(pa), axis=1)
    return H, -(cov @ a) - cov_l, -cov - k3 @ a - k3_l
