"""Argument checks shared by every closed form of `ufmjax.theory`, written once.

Each raises ValueError naming the offending parameter.
"""

from __future__ import annotations

import numpy as np

from ufmjax.theory.core import logsumexp

# float32 softmax outputs converted to float64 are accepted; logits or unnormalised
# counts are not.
ROW_SUM_ATOL = 1e-4


def as_float(x, name: str) -> np.ndarray:
    """np.asarray(x, float64), turning conversion failures into a ValueError naming x."""
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array: {err}") from None


def check_distribution_table(x, name: str) -> np.ndarray:
    arr = as_float(x, name)
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


def check_p(p_MxV) -> np.ndarray:
    """Validate p and return its row-normalised log-probabilities [M, V]."""
    p = check_distribution_table(p_MxV, "p_MxV")
    if np.any(p <= 0):
        # log-odds (Def. 3.2) and the steered distribution need log p finite everywhere.
        raise ValueError("p_MxV must be strictly positive")
    logp = np.log(p)
    return logp - logsumexp(logp, axis=-1)[:, None]


def check_log_odds(M_V, V: int) -> np.ndarray:
    M = as_float(M_V, "M_V")
    if M.shape != (V,):
        raise ValueError(f"M_V must be a vector of length V={V}, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("M_V must be finite")
    return M


def check_alphas(alphas_A) -> np.ndarray:
    a = np.atleast_1d(as_float(alphas_A, "alphas_A"))
    if a.ndim != 1:
        raise ValueError(f"alphas_A must be a scalar or 1-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("alphas_A must be finite")
    return a


def check_index(x, m: int, name: str) -> np.ndarray:
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


def check_pi(pi_M, m: int) -> np.ndarray:
    if pi_M is None:
        return np.full(m, 1.0 / m)
    pi = as_float(pi_M, "pi_M")
    if pi.shape != (m,):
        raise ValueError(f"pi_M must be a vector of length m={m}, got shape {pi.shape}")
    if not np.all(np.isfinite(pi)) or np.any(pi < 0):
        raise ValueError("pi_M must be finite and non-negative")
    if abs(pi.sum() - 1.0) > ROW_SUM_ATOL:
        raise ValueError(f"pi_M must sum to 1, got {pi.sum()}")
    return pi / pi.sum()


def check_q(q_MxV, logp_MxV: np.ndarray) -> np.ndarray:
    if q_MxV is None:
        return np.exp(logp_MxV)  # Assumption 2: the model's own probabilities
    q = check_distribution_table(q_MxV, "q_MxV")
    if q.shape != logp_MxV.shape:
        raise ValueError(f"q_MxV must have the shape of p_MxV {logp_MxV.shape}, got {q.shape}")
    return q / q.sum(axis=1, keepdims=True)


def check_n_quad(n_quad) -> int:
    if isinstance(n_quad, bool) or not isinstance(n_quad, (int, np.integer)) or n_quad < 2:
        raise ValueError(f"n_quad must be an integer >= 2, got {n_quad!r}")
    return int(n_quad)
