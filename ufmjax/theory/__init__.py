"""Closed forms of the steering-strength theory (docs/theory.md), in float64 numpy, by section.

Modules: `tokens` (Sec. 3.1), `concepts` (Sec. 3.2), `cross_entropy` (Sec. 3.3), with the
argument checks (`checks`) and shared numerics (`core`) written once.

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

from ufmjax.theory.checks import ROW_SUM_ATOL
from ufmjax.theory.concepts import concept_delta, concept_derivative, concept_probs, nu, r, tanh_representation
from ufmjax.theory.cross_entropy import ce_curvature, delta_ce, delta_ce_derivatives, entropy, kl_steered_base
from ufmjax.theory.tokens import (
    extremal_tokens,
    limits,
    log_odds,
    mean_log_odds,
    peak_strengths,
    steered_probs,
    token_derivative,
    token_second_derivative,
    var_log_odds,
)

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
