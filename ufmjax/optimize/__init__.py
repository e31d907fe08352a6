"""Optimal steering strength by gradient-based optimisation of alpha (docs/theory.md, Sec. 7).

Instead of reading the best alpha off a grid, ufmjax solves for it with derivatives in alpha,
through any steered model (`Steered`: the UFM, a GPT).

Shape legend: A = alphas evaluated together, M = rows (contexts / prompts) of the steered model,
V = vocabulary, G = concepts, E = evaluation rows, n = free coordinates of alpha (1 when alpha is
shared, E when it is one per context), K = constraints.

What is optimised. Given a target concept T, evaluation rows E (all rows unless chosen) and row
weights w_j (the context probabilities pi restricted to E, renormalised to sum to 1):

    dp(alpha) = sum_{j in E} w_j Δp(T | c_j, alpha)    Def. 3.5: (F_T(c_j, alpha) - F_T(c_j, 0)) / |T|
    D(alpha)  = sum_{j in E} w_j ΔCE_j(alpha)           Def. 3.7, metric "ce"
              = sum_{j in E} w_j KL(p_alpha(.|c_j) || p_0(.|c_j))    metric "kl"
    F(alpha)  = sum_{j in E} w_j F_T(c_j, alpha)         target-concept probability (no 1/|T|)

  penalised   maximise  dp - lam * D                                  (lam > 0, default 0.1)
  budget      maximise  dp - lam * D  subject to  D <= budget          (lam >= 0, default 0)
  level       minimise  |alpha|       subject to  F >= level           (level in (0, 1))

With lam = 0 the budgeted problem is "the largest steering effect a distortion budget buys"; with
lam > 0 and a budget that does not bind it returns the penalised optimum. Per context
(`per_context=True`) alpha is a vector, one entry per evaluation row, row j is steered by its
own alpha_j, and the SAME objective is maximised: sum_j w_j [Δp_j(alpha_j) - lam D_j(alpha_j)]
under ONE budget on the weighted total sum_j w_j D_j(alpha_j) (so shared and per-context alphas
are compared on the same objective and the same budget); for `level`, every row must reach the
level, each with its own smallest |alpha_j|.

How. Every quantity comes from the kernel's public point evaluator (`ufmjax.kernel.Evaluator`,
forward mode through the model; the affine path on request, `Problem(method="affine")`), so
the optimiser measures exactly what `ufmjax sweep` reports; per context, row j's derivative in its
own alpha_j comes from the same kernel applied to `alpha_M + t` at t = 0 (rows are independent).
Constraints are handled by an augmented Lagrangian (method of multipliers); the level
constraint is written in logits, logit(F) >= logit(level), which is well scaled where F
saturates (d logit F / d alpha = mu_T - mu_notT, Thm 3.6). Inner problems are solved by
  - "newton": Newton's method on the kernel's second derivatives (exact: for a shared alpha a
    scalar; per context the Hessian is diagonal plus one rank-one budget term), with the set of
    active penalty terms predicted at the step's end, an eigenvalue-floored Hessian, a step cap
    and an Armijo line search;
  - "lbfgs" (zoom line search), "adam" (fixed lr) and "gd" (fixed step 1 / the largest
    curvature met on the start bracket): optax on reverse-mode gradients through the model.
A closed-form start (the quadratic law near 0: D ≈ D'(0) alpha + c alpha^2 / 2, with c the
Fisher curvature along the steering direction, KL''(0) from the kernel at alpha = 0, equal to
sum_j pi_j Var_j(M) for the UFM, Thm 3.8) and a coarse geometric bracket around it (both signs) choose where to start, so a
multi-modal or plateauing landscape (GPTs: ΔCE flattens at large |alpha|, Prop. 4.1) is met
honestly: iterates that run to |alpha| = alpha_max, or a stationary point without curvature
(a plateau), are reported as `converged=False` with a message, never as an optimum.

Evaluations count forward passes of the steered model over all its rows (with their
forward-mode tangents for newton, a reverse pass for the optax solvers); a vector of per-row
alphas costs one pass when the closure has a registered one-pass `rowwise` form
(`ufmjax.steering.register_rowwise`: the UFM, linear and GPT closures), else one pass per row.

Several steering vectors (`vector`): alpha in R^k for a k-term closure (k vectors at one layer,
one vector at k layers with a strength per layer), measured by the k-term kernel
(`ufmjax.kernel.MultiEvaluator`: gradient [k] and Hessian [k, k] by forward mode).
`MultiProblem` takes one target concept or a weighted sum of several, [(T, omega), ...], and
`optimize_vector` solves every objective above (level: one target) by Newton on the kernel's
Hessian or the optax solvers; for k = 1 it is the shared-alpha answer of `optimize`, and
`sign="auto"` starts on the side where the target's slope at 0 (`slope_sign`) is positive.
`grid_optimum` is its baseline: a dense product grid, zoomed around its best point.

Modules: `problem` (Objective, Problem, Result), `solvers` (Lagrangian, Newton, optax,
`optimize`), `baselines` (grid search, bisection), `vector` (alpha in R^k).
"""

import sys

from ufmjax.optimize.baselines import bisect_budget, grid_search, objective_values
from ufmjax.optimize.problem import DEFAULT_LAM, METRICS, OBJECTIVES, Objective, Problem, Result, shifted_rowwise
from ufmjax.optimize.solvers import FLAT, LADDER, METHODS, closed_form_start, optimize
from ufmjax.optimize.vector import (MultiProblem, VectorResult, check_targets, grid_optimum, optimize_vector,
                                    slope_sign, vector_landscape, vector_start)

__all__ = [
    "DEFAULT_LAM", "FLAT", "LADDER", "METHODS", "METRICS", "OBJECTIVES", "Objective", "Problem", "Result",
    "bisect_budget", "closed_form_start", "grid_search", "objective_values", "optimize", "shifted_rowwise",
    "MultiProblem", "VectorResult", "check_targets", "grid_optimum", "optimize_vector", "slope_sign",
    "vector_landscape", "vector_start",
]


class _CallableModule(type(sys.modules[__name__])):
    """`ufmjax.optimize` is a subpackage and, at the top level (`uj.optimize(problem, objective)`),
    the solver: Python binds an imported subpackage over a parent's attribute of the same name,
    so the module itself forwards calls to `solvers.optimize`."""

    def __call__(self, *args, **kwargs):
        """optimize(problem, objective, ...): see `ufmjax.optimize.solvers.optimize`."""
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
