"""The baselines the optimiser is measured against: the landscape on a grid, the best grid
point, and bisection on a distortion budget (how steering tools calibrate alpha today)."""

from __future__ import annotations

import time

import numpy as np

from ufmjax.kernel import check_alphas
from ufmjax.optimize.problem import METRICS, Objective, Problem, is_finite_number


# ----------------------------------------------------------------------------- baselines

def objective_values(problem: Problem, objective: Objective, alphas) -> dict[str, np.ndarray]:
    """The landscape on a grid of shared alphas (the sweep kernel, values only).

    Returns dict of [A] arrays: `alphas`, `dp`, `ce`, `kl`, `F`, `objective` (the maximised value;
    for level, -|alpha|) and `feasible` (the constraint holds).
    """
    alphas = check_alphas(alphas)
    rows = problem.shared(alphas, order=0)
    w = problem.w_E
    out = {k: rows[k][0] @ w for k in ("dp", "ce", "kl", "F")}
    out["alphas"] = alphas
    o = objective
    if o.kind == "level":
        out["objective"] = -np.abs(alphas)
        out["feasible"] = out["F"] >= o.level
    else:
        out["objective"] = out["dp"] - o.lam * out[o.metric]
        out["feasible"] = out[o.metric] <= o.budget if o.kind == "budget" else np.ones(alphas.size, bool)
    return out


def grid_search(problem: Problem, objective: Objective, alphas) -> dict:
    """The baseline: the best feasible alpha of a dense grid (one model evaluation per alpha)."""
    t0 = time.perf_counter()
    ev0 = problem.evaluations
    land = objective_values(problem, objective, alphas)
    score = np.where(land["feasible"], land["objective"], -np.inf)
    if not np.isfinite(score).any():
        raise ValueError("no alpha of the grid satisfies the constraint")
    i = int(np.argmax(score))
    value = float(land["objective"][i])
    return {"alpha": float(land["alphas"][i]), "objective": -value if objective.kind == "level" else value,
            "delta_p_target": float(land["dp"][i]), "delta_ce": float(land["ce"][i]), "kl": float(land["kl"][i]),
            "evaluations": problem.evaluations - ev0, "seconds": time.perf_counter() - t0,
            "spacing": float(np.max(np.diff(land["alphas"]))) if land["alphas"].size > 1 else 0.0}


def bisect_budget(problem: Problem, budget: float, metric: str = "ce", *, sign: float = 1.0,
                  xtol: float = 1e-10, max_evals: int = 200) -> dict:
    """Calibration as steering tools do it: bisection on alpha until D(alpha) = budget.

    Walks out from 0 in the direction `sign`, doubling alpha until D exceeds the budget, then
    bisects (one model evaluation per step, values only) until the bracket is below xtol.
    """
    if not (is_finite_number(budget) and budget > 0):
        raise ValueError(f"budget must be positive, got {budget!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    t0 = time.perf_counter()
    ev0 = problem.evaluations

    def D(a):
        return float(problem.shared([sign * a], order=0)[metric][0][0] @ problem.w_E)

    lo, hi = 0.0, 1.0
    while D(hi) <= budget:
        lo, hi = hi, 2.0 * hi
        if problem.evaluations - ev0 >= max_evals:
            raise ValueError(f"the budget {budget:g} is not reached for |alpha| <= {hi:g}")
    while hi - lo > xtol and problem.evaluations - ev0 < max_evals:
        mid = 0.5 * (lo + hi)
        if D(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return {"alpha": sign * lo, "evaluations": problem.evaluations - ev0, "seconds": time.perf_counter() - t0,
            "bracket": hi - lo}
