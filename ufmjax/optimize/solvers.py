"""How alpha is solved for: the augmented Lagrangian, Newton on the kernel's second
derivatives, optax solvers on reverse-mode gradients, and the `optimize` driver.

Shape legend: E = evaluation rows, n = free coordinates of alpha (1 shared, E per context),
K = constraints. See the package docstring for what each objective maximises.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ufmjax.kernel import quantities
from ufmjax.optimize.problem import Objective, Problem, Result, is_finite_number

METHODS = ("newton", "lbfgs", "adam", "gd")
# Multiples of the closed-form start tried before descending (both signs): a coarse bracket.
LADDER = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Default learning rates of the first-order optax solvers (lbfgs finds its own by line search).
DEFAULT_LR = {"adam": 0.05}  # gd: 1 / the largest curvature met on the start bracket
# A stationary point is called flat (not a strict optimum) when the smallest eigenvalue of the
# Lagrangian's Hessian is below FLAT times its largest (or FLAT in absolute terms).
FLAT = 1e-9


@dataclass
class SolveStats:
    """What one solve went through (updated in place by the inner solvers)."""

    iterations: int = 0                 # accepted steps, over every inner solve
    grad_norm: float = float("nan")     # max |gradient| of the (augmented) Lagrangian, last seen
    rho: float = 10.0                   # penalty weight of the augmented Lagrangian
    outer: int = 0                      # multiplier updates
    lr: float | None = None             # gd: the step size used
    curvature: float | None = None      # smallest Lagrangian eigenvalue at the answer


# ----------------------------------------------------------------------------- the Lagrangian

def _logit_level(level: float) -> float:
    return math.log(level) - math.log1p(-level)


def _logit(F, Fnot):
    """logit F = log F - log(1 - F) and its first two derivatives, from (value, d1, d2) of F and
    of 1 - F (computed apart, so a saturated F keeps its precision); 0 slopes where it is infinite."""
    (F0, F1, F2), (N0, N1, N2) = F, Fnot
    with np.errstate(divide="ignore", invalid="ignore"):
        F0, F1, F2, N0, N1, N2 = (np.asarray(a, np.float64) for a in (F0, F1, F2, N0, N1, N2))
        val = np.log(F0) - np.log(N0)
        a, b = F1 / F0, N1 / N0
        d1 = a - b
        d2 = F2 / F0 - a * a - N2 / N0 + b * b
    finite = np.isfinite(val)
    return val, np.where(finite, d1, 0.0), np.where(finite, d2, 0.0)


@dataclass
class _Point:
    """The objective and constraints at x, with gradients and diagonal Hessian terms."""

    x: np.ndarray          # [n]
    rows: dict             # per-row values and derivatives [E]
    f: float               # objective to MAXIMISE
    gf: np.ndarray         # [n]
    hf: np.ndarray         # [n] (the Hessian of f is diagonal)
    g: np.ndarray          # [K] constraints, feasible when <= 0
    gg: np.ndarray         # [K, n]
    hg: np.ndarray         # [K, n] (each constraint's Hessian is diagonal)


class _Solver:
    """Shared machinery of one optimisation: evaluation, the augmented Lagrangian, inner solvers."""

    def __init__(self, problem: Problem, objective: Objective, per_context: bool, alpha_max: float):
        self.pb, self.obj, self.per_context, self.alpha_max = problem, objective, per_context, alpha_max
        self.E = problem.contexts.size
        self.n = self.E if per_context else 1
        self.path: list = []
        self.eps = float(jnp.finfo(problem.dtype).eps)

    # -- values of f and g from per-row quantities ---------------------------------------------

    def total(self, rows, name):
        """Weighted total over rows, its gradient and its (diagonal) Hessian in x."""
        w = self.pb.w_E
        v, d1, d2 = rows[name]
        if self.per_context:
            return float(w @ v), w * d1, w * d2
        return float(w @ v), np.array([w @ d1]), np.array([w @ d2])

    def point(self, x) -> _Point:
        x = np.asarray(x, np.float64).reshape(self.n)
        if self.per_context:
            rows = self.pb.per_row(x)
        else:
            rows = {k: [a[0] for a in v] for k, v in self.pb.shared(x).items()}
        return self.make_point(x, rows)

    def make_point(self, x, rows) -> _Point:
        o, n = self.obj, self.n
        if o.kind == "level":
            f, gf, hf = -0.5 * float(x @ x), -x, -np.ones(n)
            # The constraint in logits, logit(level) - logit(F) <= 0: F >= level exactly, but
            # well scaled where F saturates (d logit F / d alpha = mu_T - mu_notT, Thm 3.6),
            # where level - F would have a vanishing slope and a huge multiplier.
            if self.per_context:
                lg, lg1, lg2 = _logit(rows["F"], rows["Fnot"])
                g, gg, hg = _logit_level(o.level) - lg, np.diag(-lg1), np.diag(-lg2)
            else:
                lg, lg1, lg2 = _logit(self.total(rows, "F"), self.total(rows, "Fnot"))
                g, gg, hg = np.array([_logit_level(o.level) - lg]), -lg1[None], -lg2[None]
        else:
            dp, dp1, dp2 = self.total(rows, "dp")
            D, D1, D2 = self.total(rows, o.metric)
            f, gf, hf = dp - o.lam * D, dp1 - o.lam * D1, dp2 - o.lam * D2
            if o.kind == "budget":
                g, gg, hg = np.array([D - o.budget]), D1[None], D2[None]
            else:
                g, gg, hg = np.zeros(0), np.zeros((0, n)), np.zeros((0, n))
        return _Point(x, rows, f, gf, hf, g, gg, hg)

    # -- augmented Lagrangian ------------------------------------------------------------------

    @staticmethod
    def lagrangian(pt: _Point, mu, rho):
        """L = -f + sum_k (max(0, mu_k + rho g_k)^2 - mu_k^2) / (2 rho), its gradient and Hessian."""
        nu = np.maximum(0.0, mu + rho * pt.g)
        L = -pt.f + float(np.sum(nu ** 2 - mu ** 2)) / (2.0 * rho) if pt.g.size else -pt.f
        grad = -pt.gf + nu @ pt.gg
        active = (mu + rho * pt.g) > 0
        H = np.diag(-pt.hf + nu @ pt.hg) + rho * (pt.gg[active].T @ pt.gg[active])
        return L, grad, H


# ----------------------------------------------------------------------------- inner solvers

def _newton_direction(H, grad):
    """-H^{-1} grad with H's eigenvalues floored to be positive (a descent direction always)."""
    lam, U = np.linalg.eigh(0.5 * (H + H.T))
    scale = max(1.0, float(np.max(np.abs(lam))))
    lam = np.maximum(np.abs(lam), 1e-8 * scale)
    return -U @ ((U.T @ grad) / lam)


def _model_direction(pt: _Point, mu, rho):
    """Newton step on the piecewise-quadratic model of the augmented Lagrangian.

    Which penalty terms are active is predicted at the END of the step (a semismooth Newton
    step), so a start on the slack side of a constraint steps onto the constraint instead of
    overshooting along the unpenalised objective and backtracking.
    """
    lin = mu + rho * pt.g
    H0 = np.diag(-pt.hf + np.maximum(0.0, lin) @ pt.hg)
    active = lin > 0
    d = None
    for _ in range(6):
        grad_m = -pt.gf + (lin * active) @ pt.gg
        d = _newton_direction(H0 + rho * (pt.gg[active].T @ pt.gg[active]), grad_m)
        new = (lin + rho * (pt.gg @ d)) > 0
        if np.array_equal(new, active):
            break
        active = new
    return d


def newton_inner(s: _Solver, pt: _Point, mu, rho, tol, max_iter, info, direction=None, record=None):
    """Damped Newton on the augmented Lagrangian from pt; returns (point, converged, message).

    Shared with the k-term optimiser (`optimize.vector`): `direction(pt, mu, rho)` is the model
    step (default `_model_direction`, diagonal curvature of independent alphas) and
    `record(x)` the path entry (default: alpha as the scalar optimiser reports it)."""
    direction = direction or _model_direction
    record = record or (lambda x: _as_alpha(x, s.per_context))
    for _ in range(max_iter):
        L, grad, H = s.lagrangian(pt, mu, rho)
        gnorm = float(np.max(np.abs(grad)))
        info.grad_norm = gnorm
        # Relative to the size of the balanced terms (grad f = nu grad g at a constrained optimum).
        if gnorm <= tol * max(1.0, float(np.max(np.abs(pt.gf)))):
            return pt, True, ""
        d = direction(pt, mu, rho)
        if not float(grad @ d) < 0:
            d = _newton_direction(H, grad)
        # Cap the step: where the landscape flattens (GPT plateaus) Newton would leap to infinity.
        cap = max(1.0, 0.5 * float(np.max(np.abs(pt.x))))
        big = float(np.max(np.abs(d)))
        if big > cap:
            d *= cap / big
        slope = float(grad @ d)
        t, accepted = 1.0, None
        for _ in range(30):
            trial = s.point(pt.x + t * d)
            L_t, grad_t, _ = s.lagrangian(trial, mu, rho)
            if L_t <= L + 1e-4 * t * slope:
                accepted = trial
                break
            # Near the optimum L changes below rounding: accept a step that shrinks the gradient.
            if abs(L_t - L) <= 1e3 * s.eps * (1.0 + abs(L)) and np.max(np.abs(grad_t)) < gnorm:
                accepted = trial
                break
            t *= 0.5
        info.iterations += 1
        if accepted is None:
            return pt, False, f"line search failed at |grad| = {gnorm:.3g}"
        pt = accepted
        s.path.append(record(pt.x))
        if np.max(np.abs(pt.x)) >= s.alpha_max:
            return pt, False, (f"the objective still improves at |alpha| = {np.max(np.abs(pt.x)):.4g} >= alpha_max"
                               f" = {s.alpha_max:g}: the optimum is not attained (a plateau or an unbounded"
                               " objective); raise alpha_max or add a penalty")
    return pt, False, f"no convergence in {max_iter} iterations (|grad| = {info.grad_norm:.3g} > tol = {tol:g})"


@functools.lru_cache(maxsize=64)
def _merit_fn(fn, rowwise, kind: str, metric: str, per_context: bool):
    """The augmented Lagrangian as a jax function of x, for reverse-mode autodiff and optax."""

    def merit(x, params, ref, ms, target_G, rows_E, hyper):
        if per_context:
            alpha_M = jnp.zeros(ms.num_rows, x.dtype).at[rows_E].set(x)
            logits = rowwise(params, alpha_M)
        else:
            logits = fn(params, x[0])
        q = quantities(logits, ref, ms)
        w = ms.weights_M
        F_M = q["concept_prob"] @ target_G
        if kind == "level":
            f = -0.5 * jnp.sum(x * x)
            Fnot_M = q["concept_prob"] @ (1.0 - target_G)
            if per_context:
                logit = jnp.log(F_M[rows_E]) - jnp.log(Fnot_M[rows_E])
            else:
                logit = (jnp.log(jnp.dot(w, F_M)) - jnp.log(jnp.dot(w, Fnot_M)))[None]
            g = hyper["level"] - logit
        else:
            dp = jnp.dot(w, q["delta_p_concept"] @ target_G)
            D = jnp.dot(w, q["delta_ce_ctx"] if metric == "ce" else q["kl"])
            f = dp - hyper["lam"] * D
            g = (D - hyper["budget"])[None] if kind == "budget" else jnp.zeros((0,), x.dtype)
        mu, rho = hyper["mu"], hyper["rho"]
        nu = jnp.maximum(0.0, mu + rho * g)
        return -f + jnp.sum(nu ** 2 - mu ** 2) / (2.0 * rho)

    return merit


@functools.lru_cache(maxsize=64)
def _optax_step(fn, rowwise, kind, metric, per_context, method, lr):
    merit = _merit_fn(fn, rowwise, kind, metric, per_context)
    if method == "lbfgs":
        tx = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
    elif method == "adam":
        tx = optax.adam(lr)
    else:
        # Plain gradient descent with a fixed step (a state hyperparameter, set per inner solve).
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)

    @jax.jit
    def step(x, state, params, ref, ms, target_G, rows_E, hyper):
        def value_fn(y):
            return merit(y, params, ref, ms, target_G, rows_E, hyper)

        if method == "lbfgs":
            value, grad = optax.value_and_grad_from_state(value_fn)(x, state=state)
            updates, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=value_fn)
        else:
            value, grad = jax.value_and_grad(value_fn)(x)
            updates, state = tx.update(grad, state, x)
        return optax.apply_updates(x, updates), state, value, grad

    return tx, step


def _optax_inner(s: _Solver, pt: _Point, mu, rho, tol, max_iter, info, method, lr):
    """An optax solver on the augmented Lagrangian (reverse-mode gradients through the model)."""
    pb = s.pb
    tx, step = _optax_step(pb.steered.fn, pb.rowwise, s.obj.kind, s.obj.metric,
                           s.per_context, method, lr)
    o = s.obj
    hyper = {"lam": jnp.asarray(o.lam or 0.0, pb.dtype), "budget": jnp.asarray(o.budget or 0.0, pb.dtype),
             "level": jnp.asarray(_logit_level(o.level) if o.level else 0.0, pb.dtype), "mu": jnp.asarray(mu, pb.dtype),
             "rho": jnp.asarray(rho, pb.dtype)}
    params = pb.params
    x = jnp.asarray(pt.x, pb.dtype)
    state = tx.init(x)
    if method == "gd":
        # A fixed step is stable below 2 / curvature. Default: 1 / the largest curvature of the
        # objective met so far (the start bracket, the start point; kernel second derivatives)
        # plus what the penalty adds, nu |g''| + rho |grad g|^2. A given lr gets the penalty part only.
        nu = np.maximum(0.0, mu + rho * pt.g)
        stiff = float(np.max(nu @ np.abs(pt.hg))) + rho * float(np.max(np.sum(pt.gg ** 2, axis=1))) \
            if pt.g.size else 0.0
        s.curv_seen = max(getattr(s, "curv_seen", 0.0), float(np.max(np.abs(pt.hf))))
        base_lr = 1.0 / max(s.curv_seen, 1e-12) if lr is None else lr
        step_size = base_lr / (1.0 + base_lr * stiff)
        info.lr = step_size
        state.hyperparams["learning_rate"] = jnp.asarray(step_size, pb.dtype)
    cost = 1 if (pb.one_pass or not s.per_context) else pb.num_rows
    searched = method == "lbfgs"
    if searched:
        pb.evaluations += cost  # the first value and gradient; later ones come from the line search
    converged, message = False, f"no convergence in {max_iter} iterations"
    value0, still, best, since_best = None, 0, np.inf, 0
    for _ in range(max_iter):
        x_new, state_new, value, grad = step(x, state, params, pb.reference, pb.measure, pb.target_G, pb.rows_E, hyper)
        value0 = float(value) if value0 is None else value0
        gnorm = float(jnp.max(jnp.abs(grad)))
        info.grad_norm = gnorm
        if searched:
            pb.evaluations += cost * int(optax.tree_utils.tree_get(state_new, "num_linesearch_steps"))
        else:
            pb.evaluations += cost
        if not np.isfinite(gnorm) or not np.isfinite(float(value)):
            message = "the objective or its gradient is not finite"
            break
        if gnorm <= tol:
            converged, message = True, ""
            break
        still = still + 1 if bool(jnp.all(x_new == x)) else 0
        best, since_best = (gnorm, 0) if gnorm < 0.5 * best else (best, since_best + 1)
        if still >= 3 or (searched and since_best >= 25):
            message = (f"{method} stalled at |grad| = {gnorm:.3g} > tol = {tol:g}: its line search finds no "
                       "decrease (rounding level); loosen tol or use newton")
            break
        x, state = x_new, state_new
        info.iterations += 1
        s.path.append(_as_alpha(np.asarray(x, np.float64), s.per_context))
        if float(jnp.max(jnp.abs(x))) >= s.alpha_max:
            if float(value) > value0:
                message = (f"{method} diverged (|alpha| = {float(jnp.max(jnp.abs(x))):.4g} >= alpha_max = "
                           f"{s.alpha_max:g} while the objective got worse): lower lr")
            else:
                message = (f"the objective still improves at |alpha| = {float(jnp.max(jnp.abs(x))):.4g} >= "
                           f"alpha_max = {s.alpha_max:g}: the optimum is not attained")
            break
    if not converged and message.startswith("no convergence"):
        message += f" (|grad| = {info.grad_norm:.3g} > tol = {tol:g})"
    # Re-evaluate the answer with the kernel (counted) so every reported number is the kernel's.
    return s.point(np.asarray(x, np.float64)), converged, message


# ----------------------------------------------------------------------------- the driver

def _as_alpha(x, per_context):
    x = np.asarray(x, np.float64).reshape(-1)
    return x.tolist() if per_context else float(x[0])


def closed_form_start(problem: Problem, objective: Objective) -> tuple[float, float]:
    """A first alpha from the quadratic law near 0, and the curvature c it used.

    D(alpha) ≈ D'(0) alpha + c alpha^2 / 2 with c = sum_j w_j Var_{p_0}(d logits_j / d alpha)
    (the Fisher curvature KL''(0) from the kernel; sum_j pi_j Var_j(M) for the UFM, Thm 3.8), and
    dp(alpha) ≈ dp'(0) alpha. Budget: the root of D = budget on the side where the objective
    grows; penalised: the maximiser of the quadratic model; level: the linear-model crossing.
    """
    pb, o = problem, objective
    c = float(pb.w_E @ pb.fisher_curvature())
    rows = pb.at0
    tot = {k: (pb.w_E @ v[0][0], pb.w_E @ v[1][0]) for k, v in rows.items()}
    if o.kind == "level":
        F0, F1 = tot["F"]
        if F1 == 0:
            return 1.0, c
        return float((o.level - F0) / F1), c
    D1 = tot[o.metric][1]
    f1 = tot["dp"][1] - o.lam * D1
    sign = 1.0 if f1 >= 0 else -1.0
    if c <= 0:
        return sign, c
    if o.kind == "penalised":
        return float(f1 / (o.lam * c)), c
    beta = sign * D1
    return float(sign * (-beta + math.sqrt(beta * beta + 2.0 * c * o.budget)) / c), c


def _start(s: _Solver, alpha0: float):
    """The best point of a coarse geometric bracket around the closed-form start (shared alpha)."""
    o, pb = s.obj, s.pb
    a0 = abs(alpha0) if alpha0 != 0 and np.isfinite(alpha0) else 1.0
    a0 = min(a0, s.alpha_max)
    ladder = np.array([r * a0 for r in LADDER if r * a0 <= s.alpha_max] + [s.alpha_max] * (o.kind == "level"))
    cand = np.concatenate([ladder, -ladder])
    # One alpha per call: the shape Newton uses, so the bracket costs no extra compilation.
    at0 = {k: [v[0] for v in vs] for k, vs in pb.at0.items()}
    pts = [s.make_point(np.zeros(1), at0)] + [s.point(np.array([a])) for a in cand]
    s.curv_seen = max(float(np.max(np.abs(p.hf))) for p in pts)
    s.ladder = (cand, pts)
    if o.kind == "penalised":
        return max(pts, key=lambda p: p.f)
    feas = [p for p in pts if p.g[0] <= 0]
    if o.kind == "budget":
        # alpha = 0 is among the points and feasible (D(0) = 0 < budget); the fallback only
        # guards against rounding.
        if not feas:
            return min(pts, key=lambda p: p.g[0])
        return max(feas, key=lambda p: p.f)
    if not feas:
        best = max(pts, key=lambda p: p.rows["F"][0] @ pb.w_E)
        raise ValueError(
            f"level {o.level:g} is above what any alpha reaches: the target-concept probability peaks at "
            f"{best.rows['F'][0] @ pb.w_E:.6g} (alpha = {best.x[0]:.4g}) over |alpha| <= {s.alpha_max:g}")
    return min(feas, key=lambda p: abs(p.x[0]))


def _multiplier_guess(pt: _Point) -> np.ndarray:
    """Least-squares KKT multipliers grad f = mu grad g, clipped at 0."""
    if pt.g.size == 0:
        return np.zeros(0)
    mu, *_ = np.linalg.lstsq(pt.gg.T, pt.gf, rcond=None)
    return np.maximum(mu, 0.0)


def _solve(s: _Solver, pt: _Point, method, tol, ftol, max_iter, max_outer, lr, info):
    """Solve, then refuse to call a flat stationary point an optimum.

    Where the model saturates (a GPT's normalised residual, Prop. 4.1) the objective plateaus and
    its gradient vanishes to rounding at large |alpha|: a stationary point whose Lagrangian has
    no curvature is not a strict maximum, and its alpha is arbitrary. Second-order check.
    """
    pt, mu, ok, msg = _solve_al(s, pt, method, tol, ftol, max_iter, max_outer, lr, info)
    if ok:
        _, _, H = s.lagrangian(pt, mu, info.rho)
        eig = np.linalg.eigvalsh(0.5 * (H + H.T))
        info.curvature = float(eig.min())
        if eig.min() <= FLAT * max(1.0, float(np.max(np.abs(eig)))):
            where = _as_alpha(pt.x, s.per_context)
            where = f"{where:.6g}" if isinstance(where, float) else "the returned alphas"
            return pt, mu, False, (
                f"flat stationary point at alpha = {where} (curvature {eig.min():.3g}): the objective plateaus "
                "(saturating model, Prop. 4.1), so its optimum is not attained at a finite alpha or not unique; "
                "add a penalty (lam) or a budget")
    return pt, mu, ok, msg


def _solve_al(s: _Solver, pt: _Point, method, tol, ftol, max_iter, max_outer, lr, info):
    """Augmented-Lagrangian outer loop (a single inner solve when there is no constraint)."""
    K = pt.g.size
    mu = _multiplier_guess(pt)
    # Penalty weight: newton and lbfgs take a rho whose penalty curvature rho |grad g|^2 dominates
    # the objective's, so each multiplier update gains about three digits; the first-order
    # methods start softer (their step size must stay below 2 / curvature).
    # The penalty multiplies the constraint's rounding error (eps |D|) into the gradient, so rho
    # stays below what the gradient tolerance can resolve (about 1e6 in float64, 1e2 in float32).
    g_scale = max(abs(s.obj.budget or 0.0), 1.0 if s.obj.kind == "level" else 0.0, 1e-3)
    rho_max = float(np.clip(0.1 * tol / (s.eps * g_scale), 1.0, 1e12))
    rho = min(10.0, rho_max)
    if K and method in ("newton", "lbfgs"):
        curv = max(float(np.max(np.abs(pt.hf))), 1e-6)
        slope2 = max(float(np.max(np.sum(pt.gg ** 2, axis=1))), 1e-12)
        rho = float(np.clip(1e3 * curv / slope2, min(10.0, rho_max), rho_max))
    inner = (lambda p, m, r: newton_inner(s, p, m, r, tol, max_iter, info)) if method == "newton" else \
        (lambda p, m, r: _optax_inner(s, p, m, r, tol, max_iter, info, method, lr))
    info.rho = rho
    if K == 0:
        pt, ok, msg = inner(pt, mu, rho)
        return pt, mu, ok, msg
    prev = np.inf
    ok, msg = False, ""
    for outer in range(max_outer):
        info.rho = rho
        pt, ok, msg = inner(pt, mu, rho)
        mu_new = np.maximum(0.0, mu + rho * pt.g)
        viol = float(np.max(np.abs(np.minimum(-pt.g, mu_new))))
        info.outer = outer + 1
        mu = mu_new
        if not ok and "alpha_max" in msg:
            return pt, mu, False, msg
        if ok and viol <= ftol:
            # The inner gradient was taken with multipliers max(0, mu + rho g) = mu_new: KKT holds.
            return pt, mu, True, ""
        if viol > 0.25 * prev:
            rho = min(rho * 10.0, rho_max)
        prev = viol
    if ok:
        msg = f"constraint not met to {ftol:g} after {max_outer} multiplier updates (violation {viol:.3g})"
    return pt, mu, False, msg


def optimize(problem: Problem, objective: Objective, *, per_context: bool = False, method: str = "newton",
             tol: float | None = None, ftol: float | None = None, max_iter: int | None = None,
             max_outer: int = 40, alpha_max: float = 1e3, lr: float | None = None) -> Result:
    """Optimise the steering strength.

    Args:
      problem: the steered model and what is measured (`Problem`).
      objective: what to optimise (`Objective`).
      per_context: one alpha per evaluation row (optimised jointly, in one vectorised run,
        from the shared optimum, which is solved first and reported under `shared`).
      method: "newton" (kernel second derivatives), "lbfgs", "adam" or "gd" (optax).
      tol: gradient tolerance of the (augmented) Lagrangian; 1e-10 in float64, 1e-5 in float32.
      ftol: tolerance on the constraint (|D - budget|, |F - level|); 1e-10 / 1e-5.
      max_iter: iterations per inner solve (newton/lbfgs 100, adam/gd 5000).
      max_outer: multiplier updates of the augmented Lagrangian.
      alpha_max: the largest |alpha| searched; reaching it means no finite optimum was found.
      lr: learning rate of adam (default 0.05) and gd (default: 1 / the largest curvature of the
        objective on the start bracket, from the kernel's second derivatives); lbfgs searches.
    Returns:
      Result. `converged` is False (with a `message`) when a tolerance was not met.
    """
    if isinstance(objective, str):  # a bare name takes that objective's defaults
        objective = Objective(objective)
    if not isinstance(objective, Objective):
        raise ValueError(f"objective must be an Objective or one of its kinds' names, got {objective!r}")
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a Problem (e.g. run.steer(...).problem()), got {type(problem).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (is_finite_number(alpha_max) and alpha_max > 0):
        raise ValueError(f"alpha_max must be a positive number, got {alpha_max!r}")
    f64 = problem.dtype == jnp.float64
    tol = (1e-10 if f64 else 1e-5) if tol is None else float(tol)
    ftol = (1e-10 if f64 else 1e-5) if ftol is None else float(ftol)
    if not tol > 0 or not ftol > 0:
        raise ValueError("tol and ftol must be positive")
    if max_iter is None:
        max_iter = 5000 if method in ("adam", "gd") else 100
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if lr is None:
        lr = DEFAULT_LR.get(method)
    if lr is not None and not (is_finite_number(lr) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")

    t0 = time.perf_counter()
    # The alpha = 0 evaluation made when the problem was built (the start uses it) counts too.
    ev0 = problem.evaluations - 1
    shared = _optimize_shared(problem, objective, method, tol, ftol, max_iter, max_outer, alpha_max, lr)
    shared.seconds = time.perf_counter() - t0
    shared.evaluations = problem.evaluations - ev0
    if not per_context:
        return shared

    s = _Solver(problem, objective, True, alpha_max)
    info = SolveStats()
    if objective.kind == "level":
        _check_level_per_row(s, shared)
    pt = s.point(np.full(s.n, shared.alpha))
    s.path.append(_as_alpha(pt.x, True))
    pt, mu, ok, msg = _solve(s, pt, method, tol, ftol, max_iter, max_outer, lr, info)
    res = _result(s, pt, mu, ok, msg, info, method, alpha_start=shared.alpha, curvature=shared.curvature)
    res.shared = shared.to_dict()
    res.iterations += shared.iterations
    if objective.kind != "level":  # level: shared and per-row levels are different constraints
        res.gain = res.objective - shared.objective
    res.seconds = time.perf_counter() - t0
    res.evaluations = problem.evaluations - ev0
    return res


def _optimize_shared(pb, o, method, tol, ftol, max_iter, max_outer, alpha_max, lr) -> Result:
    s = _Solver(pb, o, False, alpha_max)
    info = SolveStats()
    alpha0, c = closed_form_start(pb, o)
    if o.kind == "level" and pb.w_E @ pb.at0["F"][0][0] >= o.level:
        pt = s.point(np.zeros(1))  # already at the level: alpha = 0 is the smallest
        return _result(s, pt, np.zeros(1), True, "the level is already reached at alpha = 0", info, method,
                       alpha_start=0.0, curvature=c)
    pt = _start(s, alpha0)
    s.path.append(float(pt.x[0]))
    pt, mu, ok, msg = _solve(s, pt, method, tol, ftol, max_iter, max_outer, lr, info)
    return _result(s, pt, mu, ok, msg, info, method, alpha_start=alpha0, curvature=c)


def _check_level_per_row(s: _Solver, shared: Result):
    """Refuse a per-context level some row cannot reach (at the shared ladder or +-alpha_max)."""
    pb, o = s.pb, s.obj
    a = abs(float(shared.alpha)) or 1.0
    cands = sorted({r * a for r in LADDER if r * a < s.alpha_max} | {s.alpha_max})
    best = np.full(s.E, -np.inf)
    for sign in (1.0, -1.0):
        for c in cands:
            best = np.maximum(best, pb.per_row(np.full(s.E, sign * c), order=0)["F"][0])
    bad = np.flatnonzero(best < o.level)
    if bad.size:
        raise ValueError(
            f"level {o.level:g} is above what any alpha reaches for contexts {pb.contexts[bad].tolist()} "
            f"(their target-concept probability peaks at {np.round(best[bad], 6).tolist()} for |alpha| <= "
            f"{s.alpha_max:g})")


def _result(s: _Solver, pt: _Point, mu, ok, msg, info, method, alpha_start, curvature) -> Result:
    pb, o = s.pb, s.obj
    tot = pb.summary(pt.rows)
    if o.kind == "level":
        objective = float(np.abs(pt.x) @ pb.w_E) if s.per_context else float(abs(pt.x[0]))
        # Reported in probability units: level - F (the largest over rows, per context).
        constraint = float(np.max(o.level - pt.rows["F"][0])) if s.per_context else float(o.level - tot["F"])
    else:
        objective = float(pt.f)
        constraint = float(pt.g[0]) if pt.g.size else None
    return Result(
        alpha=_as_alpha(pt.x, s.per_context), objective=objective, delta_p_target=float(tot["dp"]),
        delta_ce=float(tot["ce"]), kl=float(tot["kl"]), target_prob=float(tot["F"]),
        iterations=int(info.iterations), evaluations=pb.evaluations, converged=bool(ok),
        message=msg or ("converged" if ok else "not converged"), objective_kind=o.kind, method=method,
        metric=o.metric, lam=o.lam, budget=o.budget, level=o.level, per_context=s.per_context,
        target=pb.target, contexts=pb.contexts.tolist(), grad_norm=float(info.grad_norm),
        constraint=constraint, multiplier=(np.asarray(mu).tolist() if np.size(mu) else None),
        alpha_start=alpha_start, curvature=curvature, path=list(s.path),
        rows={k: pt.rows[k][0].tolist() for k in ("dp", "ce", "kl", "F")})


