"""Several steering vectors: the optimiser over alpha in R^k (docs/theory.md, "Several vectors").

Shape legend: A = alpha points, k = steering terms (alpha is [k]), M = rows of the steered model,
G = concepts, E = evaluation rows, K = constraints (0 or 1).

A k-term closure `fn(params, alpha_k) -> logits [M, V]` steers with h <- h + sum_i alpha_i v_i:
k vectors at one layer, one vector at k layers with a strength per layer, or any mix; the
optimiser only sees alpha in R^k. Every number comes from the k-term kernel
(`ufmjax.kernel.MultiEvaluator`: values, gradients [k] and Hessians [k, k] by forward mode).

What is optimised is the scalar optimiser's objective (package docstring) with a weighted sum of
target concepts, `targets` = [(T_1, omega_1), ...] (one int T is [(T, 1)]):

    dp(alpha) = sum_t omega_t sum_{j in E} w_j Δp(T_t | c_j, alpha)      Def. 3.5 per target
    D(alpha)  = sum_{j in E} w_j ΔCE_j(alpha)  (metric "ce")  or  sum_j w_j KL_j(alpha)  ("kl")
    F(alpha)  = sum_t omega_t sum_{j in E} w_j F_{T_t}(c_j, alpha)        (no 1/|T|)

  penalised   maximise  dp - lam D
  budget      maximise  dp - lam D  subject to  D <= budget
  level       minimise  |alpha|     subject to  F_T >= level   (one target only: a weighted sum of
                                                                 probabilities is no probability)

How. Newton on the augmented Lagrangian with the kernel's exact gradient and Hessian (the
eigenvalues of the Hessian floored so every step descends, the penalty terms active at the
step's end predicted, a step cap, Armijo backtracking), multipliers updated outside (method of
multipliers), the level constraint in logits, logit F >= logit level (well scaled where F
saturates); or an optax solver ("lbfgs", "adam", "gd") on the same Lagrangian written in jax,
under reverse mode through the closure. A stationary point without curvature (a plateau, or
collinear vectors: the objective is flat along their difference) is reported as
`converged=False`, never as an optimum.

The start (`vector_start`, one kernel evaluation at alpha = 0, made when the problem is built):
the quadratic model at 0, dp linear and D quadratic with its Hessian C at 0 (the Fisher
information of the k directions, Cov_0(M) for the UFM):
  penalised  a0 = (lam C)^-1 grad f(0)                    (the model's maximiser)
  budget     a0 = t u, u along C^-1 grad f(0), t the root of D'(0).u t + u.C.u t^2 / 2 = budget
  level      a0 = (level - F(0)) grad F(0) / |grad F(0)|^2 (the linearised constraint's min-norm point)
then a line probe: the best of alpha = 0 and +-r a0 for r in LADDER (level: the smallest feasible),
so a start in the wrong half-line is corrected. For k = 1 this is exactly the scalar optimiser's
start (`closed_form_start` and its bracket). `sign="auto"` (k = 1) probes only the side where
the target's slope at 0 (`slope_sign`) is positive, so steering raises the target; the result
reports `sign` and `slope_at_0`.

Evaluations count points: one model evaluation (every row at once, with its forward-mode
tangents for Newton) per alpha in R^k evaluated. `grid_optimum` is the baseline: a dense
product grid (values only), then zoomed grids around its best point.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ufmjax.common import jsonable
from ufmjax.kernel import (MULTI_PREFIXES, MultiEvaluator, check_dtype, check_points, make_measure, quantities,
                           scalar_view)
from ufmjax.kernel.multi import check_k
from ufmjax.optimize.problem import KERNEL_QUANTITIES, Objective, check_contexts, is_finite_number
from ufmjax.optimize.solvers import DEFAULT_LR, FLAT, LADDER, METHODS
from ufmjax.optimize.solvers import newton_inner
from ufmjax.steering import Steered

SIGNS = (None, "auto", 1, -1)


# ----------------------------------------------------------------------------- the problem

def check_targets(targets, num_concepts: int) -> list[tuple[int, float]]:
    """targets as [(concept, weight)]: an int is [(T, 1.0)]; concepts known and distinct, weights
    finite and >= 0, not all 0; else ValueError naming targets."""
    G = num_concepts

    def concept(c):
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < G:
            raise ValueError(f"targets: unknown target concept {c!r}: concepts are 0..{G - 1}")
        return int(c)

    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        return [(concept(targets), 1.0)]
    try:
        pairs = [tuple(t) for t in targets]
    except TypeError:
        raise ValueError(f"targets must be a concept id or a sequence of (concept, weight) pairs, "
                         f"got {targets!r}") from None
    if not pairs:
        raise ValueError("targets is empty: name at least one target concept")
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"targets must hold (concept, weight) pairs, got {pair!r}")
        c, wt = concept(pair[0]), pair[1]
        if isinstance(wt, bool) or not is_finite_number(wt) or float(wt) < 0:
            raise ValueError(f"targets: the weight of concept {c} must be a finite number >= 0, got {wt!r}")
        out.append((c, float(wt)))
    cs = [c for c, _ in out]
    if len(set(cs)) != len(cs):
        raise ValueError(f"targets names a concept twice: {cs}")
    if not sum(wt for _, wt in out) > 0:
        raise ValueError("targets: the weights are all 0")
    return out


class MultiProblem:
    """A k-term steered model with what the objectives measure on it.

    Args:
      steered: `fn(params, alpha_k) -> logits [M, V]` (e.g. `ufm_multi_steered`).
      k: the number of steering terms (alpha's length).
      concept_of: [V] concept id of every token.
      targets: the target concept T, or [(T_1, omega_1), ...]: dp is the omega-weighted sum of
        the targets' steering effects (each omega finite, >= 0).
      ce_target, weights, contexts, dtype: as for `Problem`.
    """

    def __init__(self, steered: Steered, *, k: int, concept_of, targets, ce_target=None, weights=None,
                 contexts=None, dtype=None):
        if dtype is None:
            dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        self.dtype = check_dtype(dtype)
        self.k = check_k(k)
        self.steered = steered
        try:
            jax.eval_shape(steered.fn, steered.params, jax.ShapeDtypeStruct((self.k,), self.dtype))
        except (TypeError, ValueError) as e:
            raise ValueError(f"k = {self.k} does not fit the closure: fn(params, alpha[{self.k}]) fails ({e})") from e
        measure = make_measure(scalar_view(steered, self.k), concept_of=concept_of, ce_target=ce_target,
                               weights=weights, tokens=[0], dtype=self.dtype)
        M, G = measure.num_rows, measure.num_concepts
        self.num_rows, self.num_concepts = M, G
        self.concept_of = np.asarray(concept_of)
        self.targets = check_targets(targets, G)
        self.contexts = check_contexts(contexts, M)
        w = (np.full(M, 1.0 / M) if weights is None else np.asarray(weights, np.float64))[self.contexts]
        if not w.sum() > 0:
            raise ValueError("the evaluation contexts all have weight 0")
        self.w_E = w / w.sum()
        w_M = np.zeros(M)
        w_M[self.contexts] = self.w_E
        self.measure = measure.replace(weights_M=jnp.asarray(w_M, self.dtype))
        self.target_G = np.zeros(G)
        for c, wt in self.targets:
            self.target_G[c] = wt
        # 1 - F of ONE target, summed from the other concepts (exact where F rounds to 1).
        self.others_G = 1.0 - np.eye(G)[self.targets[0][0]]
        self.evaluator = MultiEvaluator(steered, self.measure, k=self.k, order=2, dtype=self.dtype,
                                        devices=jax.devices()[:1], quantities=KERNEL_QUANTITIES)
        self.params, self.reference = self.evaluator.params, self.evaluator.reference
        self.evaluations = 0
        # Values and two derivatives at alpha = 0 (the start, the slope's sign).
        self.raw0 = self.evaluator.at(np.zeros((1, self.k)), 2)
        self.evaluations += 1
        self.at0 = self._totals(self.raw0, 2)

    def _totals(self, out, order: int) -> dict[str, list[np.ndarray]]:
        E, w = self.contexts, self.w_E
        tot = {}
        for key, name, vec in (("dp", "delta_p_concept", self.target_G), ("F", "concept_prob", self.target_G),
                               ("Fnot", "concept_prob", self.others_G), ("ce", "delta_ce_ctx", None),
                               ("kl", "kl", None)):
            vals = []
            for prefix in MULTI_PREFIXES[:order + 1]:
                a = np.asarray(out[prefix + name], np.float64)[:, E]          # [A, E, (G,) ...]
                if vec is not None:
                    a = np.einsum("aeg...,g->ae...", a, vec)
                vals.append(np.einsum("ae...,e->a...", a, w))
            tot[key] = vals
        return tot

    def evaluate(self, points, order: int = 2, pad_to: int | None = None) -> dict[str, list[np.ndarray]]:
        """Weighted totals at points [A, k]: name ("dp", "F", "Fnot", "ce", "kl") -> [value [A],
        gradient [A, k], Hessian [A, k, k]][: order + 1]. `pad_to` pads the call to that many points
        (one compiled shape for every chunk of a grid); only the A real points are counted."""
        points = check_points(points, self.k)
        A = len(points)
        if pad_to is not None and A < pad_to:
            points = np.concatenate([points, np.repeat(points[-1:], pad_to - A, axis=0)])
        tot = self._totals(self.evaluator.at(points, order), order)
        self.evaluations += A
        return {key: [v[:A] for v in vals] for key, vals in tot.items()}


# ----------------------------------------------------------------------------- results

@dataclass
class VectorResult:
    """An optimisation over alpha in R^k and how it was reached (`to_dict()` is JSON-able)."""

    alpha: list                       # [k]
    objective: float                  # penalised/budget: dp - lam D; level: |alpha|
    delta_p_target: float             # dp: the weighted steering effect on the targets (Def. 3.5)
    delta_ce: float                   # weighted ΔCE (Def. 3.7)
    kl: float                         # weighted mean KL(p_alpha || p_0)
    target_prob: float                # F: the weighted target-concept probability
    grad: list                        # [k] gradient of the objective at alpha
    hessian: list                     # [k, k] its Hessian
    iterations: int
    evaluations: int                  # model evaluations (points), the start's included
    converged: bool
    message: str
    path: list                        # the alphas visited: start, then every accepted step
    objective_kind: str
    method: str
    metric: str
    lam: float | None
    budget: float | None
    level: float | None
    targets: list                     # [[concept, weight], ...]
    k: int
    contexts: list
    grad_norm: float = float("nan")   # max |gradient of the augmented Lagrangian|, last seen
    constraint: float | None = None   # D - budget, or level - F (feasible when <= 0)
    constraint_grad: list | None = None   # [k] gradient of D (budget) or of F (level)
    multiplier: list | None = None
    alpha_start: list | None = None   # alpha0, or the quadratic model's start (`vector_start`)
    sign: int | None = None           # k = 1 with sign="auto" (or given): the side probed
    slope_at_0: float | None = None   # k = 1: d dp / d alpha at 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))


# ----------------------------------------------------------------------------- the Lagrangian

def _logit_level(level: float) -> float:
    return math.log(level) - math.log1p(-level)


def _logit(F, Fnot):
    """logit F = log F - log(1 - F) with gradient [k] and Hessian [k, k], from (value, grad, Hessian)
    of F and of 1 - F (computed apart); 0 slopes where it is infinite."""
    (F0, F1, F2), (N0, N1, N2) = F, Fnot
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.log(F0) - np.log(N0)
        a, b = F1 / F0, N1 / N0
        d1 = a - b
        d2 = F2 / F0 - np.outer(a, a) - N2 / N0 + np.outer(b, b)
    if not np.isfinite(val):
        return float(val), np.zeros_like(F1), np.zeros_like(F2)
    return float(val), d1, d2


@dataclass
class _Point:
    x: np.ndarray          # [k]
    q: dict                # totals: name -> [value, grad [k], Hessian [k, k]]
    f: float               # objective to MAXIMISE
    gf: np.ndarray         # [k]
    hf: np.ndarray         # [k, k]
    g: np.ndarray          # [K] constraints, feasible when <= 0
    gg: np.ndarray         # [K, k]
    hg: np.ndarray         # [K, k, k]


@dataclass
class _Stats:
    iterations: int = 0
    grad_norm: float = float("nan")
    rho: float = 10.0
    outer: int = 0
    curvature: float | None = None


class _Solver:
    def __init__(self, problem: MultiProblem, objective: Objective, alpha_max: float):
        self.pb, self.obj, self.alpha_max, self.k = problem, objective, alpha_max, problem.k
        self.path: list = []
        self.eps = float(jnp.finfo(problem.dtype).eps)
        self.curv_seen = 0.0

    def point(self, x) -> _Point:
        x = np.asarray(x, np.float64).reshape(self.k)
        q = self.pb.evaluate(x[None], 2)
        return self.make_point(x, {key: [a[0] for a in v] for key, v in q.items()})

    def make_point(self, x, q) -> _Point:
        o, k = self.obj, self.k
        if o.kind == "level":
            f, gf, hf = -0.5 * float(x @ x), -x, -np.eye(k)
            lg, lg1, lg2 = _logit(q["F"], q["Fnot"])
            g, gg, hg = np.array([_logit_level(o.level) - lg]), -lg1[None], -lg2[None]
        else:
            (dp, dp1, dp2), (D, D1, D2) = q["dp"], q[o.metric]
            f, gf, hf = float(dp - o.lam * D), dp1 - o.lam * D1, dp2 - o.lam * D2
            if o.kind == "budget":
                g, gg, hg = np.array([D - o.budget]), D1[None], D2[None]
            else:
                g, gg, hg = np.zeros(0), np.zeros((0, k)), np.zeros((0, k, k))
        return _Point(x, q, f, gf, hf, g, gg, hg)

    @staticmethod
    def lagrangian(pt: _Point, mu, rho):
        """L = -f + sum_K (max(0, mu + rho g)^2 - mu^2) / (2 rho), its gradient and Hessian."""
        lin = mu + rho * pt.g
        nu = np.maximum(0.0, lin)
        L = -pt.f + float(np.sum(nu ** 2 - mu ** 2)) / (2.0 * rho) if pt.g.size else -pt.f
        act = lin > 0
        H = -pt.hf + np.einsum("c,cij->ij", nu, pt.hg) + rho * (pt.gg[act].T @ pt.gg[act])
        return L, -pt.gf + nu @ pt.gg, H


def _newton_direction(H, grad):
    """-H^{-1} grad with H's eigenvalues floored to be positive (a descent direction always)."""
    lam, U = np.linalg.eigh(0.5 * (H + H.T))
    scale = max(1.0, float(np.max(np.abs(lam))))
    return -U @ ((U.T @ grad) / np.maximum(np.abs(lam), 1e-8 * scale))


def _model_direction(pt: _Point, mu, rho):
    """Newton step on the piecewise-quadratic model of the augmented Lagrangian, with the active
    penalty terms predicted at the step's END (semismooth Newton), as the scalar optimiser does."""
    lin = mu + rho * pt.g
    H0 = -pt.hf + np.einsum("c,cij->ij", np.maximum(0.0, lin), pt.hg)
    active = lin > 0
    d = None
    for _ in range(6):
        d = _newton_direction(H0 + rho * (pt.gg[active].T @ pt.gg[active]), -pt.gf + (lin * active) @ pt.gg)
        new = (lin + rho * (pt.gg @ d)) > 0
        if np.array_equal(new, active):
            break
        active = new
    return d


@functools.lru_cache(maxsize=64)
def _merit_fn(fn, kind: str, metric: str):
    """The augmented Lagrangian as a jax function of alpha [k] (reverse mode, optax)."""

    def merit(x, params, ref, ms, target_G, others_G, hyper):
        q = quantities(fn(params, x), ref, ms)
        w = ms.weights_M
        if kind == "level":
            f = -0.5 * jnp.sum(x * x)
            F, N = jnp.dot(w, q["concept_prob"] @ target_G), jnp.dot(w, q["concept_prob"] @ others_G)
            g = (hyper["level"] - (jnp.log(F) - jnp.log(N)))[None]
        else:
            dp = jnp.dot(w, q["delta_p_concept"] @ target_G)
            D = jnp.dot(w, q["delta_ce_ctx"] if metric == "ce" else q["kl"])
            f = dp - hyper["lam"] * D
            g = (D - hyper["budget"])[None] if kind == "budget" else jnp.zeros((0,), x.dtype)
        nu = jnp.maximum(0.0, hyper["mu"] + hyper["rho"] * g)
        return -f + jnp.sum(nu ** 2 - hyper["mu"] ** 2) / (2.0 * hyper["rho"])

    return merit


@functools.lru_cache(maxsize=64)
def _optax_step(fn, kind, metric, method, lr):
    merit = _merit_fn(fn, kind, metric)
    if method == "lbfgs":
        tx = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
    elif method == "adam":
        tx = optax.adam(lr)
    else:
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)

    @jax.jit
    def step(x, state, params, ref, ms, target_G, others_G, hyper):
        def value_fn(y):
            return merit(y, params, ref, ms, target_G, others_G, hyper)

        if method == "lbfgs":
            value, grad = optax.value_and_grad_from_state(value_fn)(x, state=state)
            updates, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=value_fn)
        else:
            value, grad = jax.value_and_grad(value_fn)(x)
            updates, state = tx.update(grad, state, x)
        return optax.apply_updates(x, updates), state, value, grad

    return tx, step


def _optax_inner(s: _Solver, pt: _Point, mu, rho, tol, max_iter, info, method, lr):
    pb, o = s.pb, s.obj
    tx, step = _optax_step(pb.steered.fn, o.kind, o.metric, method, lr)
    dt = pb.dtype
    hyper = {"lam": jnp.asarray(o.lam or 0.0, dt), "budget": jnp.asarray(o.budget or 0.0, dt),
             "level": jnp.asarray(_logit_level(o.level) if o.level else 0.0, dt), "mu": jnp.asarray(mu, dt),
             "rho": jnp.asarray(rho, dt)}
    args = (pb.params, pb.reference, pb.measure, jnp.asarray(pb.target_G, dt), jnp.asarray(pb.others_G, dt), hyper)
    x = jnp.asarray(pt.x, dt)
    state = tx.init(x)
    if method == "gd":
        # Stable below 2 / curvature: 1 / (the largest objective curvature met on the probe, or lr)
        # with what the penalty adds, nu |g''| + rho |grad g|^2.
        nu = np.maximum(0.0, mu + rho * pt.g)
        stiff = (float(np.max(np.abs(np.einsum("c,cij->ij", nu, pt.hg)))) + rho * float(np.max(np.sum(pt.gg ** 2, 1)))
                 if pt.g.size else 0.0)
        s.curv_seen = max(s.curv_seen, float(np.max(np.abs(np.linalg.eigvalsh(pt.hf)))))
        base = 1.0 / max(s.curv_seen, 1e-12) if lr is None else lr
        state.hyperparams["learning_rate"] = jnp.asarray(base / (1.0 + base * stiff), dt)
    searched = method == "lbfgs"
    pb.evaluations += int(searched)  # lbfgs: the first value and gradient; then its line search's
    converged, message = False, f"no convergence in {max_iter} iterations"
    value0, still, best, since_best = None, 0, np.inf, 0
    for _ in range(max_iter):
        x_new, state_new, value, grad = step(x, state, *args)
        value0 = float(value) if value0 is None else value0
        gnorm = float(jnp.max(jnp.abs(grad)))
        info.grad_norm = gnorm
        pb.evaluations += int(optax.tree_utils.tree_get(state_new, "num_linesearch_steps")) if searched else 1
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
        s.path.append(np.asarray(x, np.float64).tolist())
        if float(jnp.max(jnp.abs(x))) >= s.alpha_max:
            worse = float(value) > value0
            message = (f"{method} diverged (|alpha| >= alpha_max = {s.alpha_max:g} while the objective got worse): "
                       "lower lr" if worse else
                       f"the objective still improves at |alpha| >= alpha_max = {s.alpha_max:g}: the optimum is not "
                       "attained")
            break
    if not converged and message.startswith("no convergence"):
        message += f" (|grad| = {info.grad_norm:.3g} > tol = {tol:g})"
    # Re-evaluated with the kernel (counted), so every reported number is the kernel's.
    return s.point(np.asarray(x, np.float64)), converged, message


def _solve(s: _Solver, pt: _Point, method, tol, ftol, max_iter, max_outer, lr, info):
    """Augmented-Lagrangian outer loop, then the second-order check (no flat 'optimum')."""
    K = pt.g.size
    if K:  # least-squares KKT multiplier, grad f = mu grad g, clipped at 0
        mu = np.maximum(np.linalg.lstsq(pt.gg.T, pt.gf, rcond=None)[0], 0.0)
    else:
        mu = np.zeros(0)
    # As in the scalar optimiser: rho large enough that each multiplier update gains digits,
    # small enough that rho * (rounding of g) stays below the gradient tolerance.
    g_scale = max(abs(s.obj.budget or 0.0), 1.0 if s.obj.kind == "level" else 0.0, 1e-3)
    rho_max = float(np.clip(0.1 * tol / (s.eps * g_scale), 1.0, 1e12))
    rho = min(10.0, rho_max)
    if K and method in ("newton", "lbfgs"):
        curv = max(float(np.max(np.abs(np.linalg.eigvalsh(pt.hf)))), 1e-6)
        slope2 = max(float(np.max(np.sum(pt.gg ** 2, axis=1))), 1e-12)
        rho = float(np.clip(1e3 * curv / slope2, min(10.0, rho_max), rho_max))

    def inner(p, m, r):
        if method == "newton":
            return newton_inner(s, p, m, r, tol, max_iter, info, direction=_model_direction,
                                record=lambda x: x.tolist())
        return _optax_inner(s, p, m, r, tol, max_iter, info, method, lr)

    info.rho = rho
    if K == 0:
        pt, ok, msg = inner(pt, mu, rho)
    else:
        prev, ok, msg = np.inf, False, ""
        for outer in range(max_outer):
            info.rho = rho
            pt, ok, msg = inner(pt, mu, rho)
            mu_new = np.maximum(0.0, mu + rho * pt.g)
            viol = float(np.max(np.abs(np.minimum(-pt.g, mu_new))))
            info.outer, mu = outer + 1, mu_new
            if not ok and "alpha_max" in msg:
                return pt, mu, False, msg
            if ok and viol <= ftol:
                break
            if viol > 0.25 * prev:
                rho = min(rho * 10.0, rho_max)
            prev = viol
        else:
            if ok:
                ok, msg = False, (f"constraint not met to {ftol:g} after {max_outer} multiplier updates "
                                  f"(violation {viol:.3g})")
    if ok:
        _, _, H = s.lagrangian(pt, mu, info.rho)
        eig = np.linalg.eigvalsh(0.5 * (H + H.T))
        info.curvature = float(eig.min())
        if eig.min() <= FLAT * max(1.0, float(np.max(np.abs(eig)))):
            return pt, mu, False, (
                f"flat stationary point at alpha = {np.round(pt.x, 6).tolist()} (curvature {eig.min():.3g}): the "
                "objective does not curve along some direction (a plateau, or steering vectors that are collinear), "
                "so its optimum is not attained or not unique; add a penalty (lam) or a budget, or drop a vector")
    return pt, mu, ok, msg


# ----------------------------------------------------------------------------- start and sign

def slope_sign(problem, **problem_kwargs) -> tuple[int, float]:
    """The sign (+1 / -1) and value of the target's slope d dp / d alpha at alpha = 0, for a
    scalar alpha (k = 1), from the kernel: steering with that sign raises the target.

    Args:
      problem: a `MultiProblem` with k = 1, or a Steered (then `problem_kwargs` build the
        MultiProblem; k defaults to 1).
    Returns:
      (sign, slope). Raises ValueError when k != 1 or the slope is 0 to rounding.
    """
    if not isinstance(problem, MultiProblem):
        problem = MultiProblem(problem, **{"k": 1, **problem_kwargs})
    elif problem_kwargs:
        raise ValueError(f"problem is already a MultiProblem; unexpected {sorted(problem_kwargs)}")
    pb = problem
    if pb.k != 1:
        raise ValueError(f"slope_sign needs a scalar alpha (k = 1), got k = {pb.k}: with several terms the target's "
                         "slope is a gradient, and its direction is what the optimiser follows")
    rows = np.einsum("eg,g->e", np.asarray(pb.raw0["grad_delta_p_concept"], np.float64)[0, pb.contexts, :, 0],
                     pb.target_G)
    slope = float(pb.w_E @ rows)
    eps = float(jnp.finfo(pb.dtype).eps)
    if not math.isfinite(slope) or abs(slope) <= 64 * eps * float(pb.w_E @ np.abs(rows)) or slope == 0:
        raise ValueError(f"sign: the target's slope at alpha = 0 is {slope:.3g}, zero to rounding: the vector does not "
                         "move the target to first order, so neither side raises it; give alpha0 (or sign=+1/-1)")
    return (1 if slope > 0 else -1), slope


def vector_start(problem: MultiProblem, objective: Objective, sign: int | None = None) -> np.ndarray:
    """A first alpha [k] from the quadratic model at 0 (module docstring; no new evaluation)."""
    pb, o, k = problem, objective, problem.k
    q = {key: [v[0] for v in vals] for key, vals in pb.at0.items()}
    e0 = np.eye(k)[0]
    if o.kind == "level":
        (F0, gF, _) = q["F"]
        n2 = float(gF @ gF)
        a = (o.level - F0) * gF / n2 if n2 > 0 else e0
    else:
        (_, dp1, _), (_, D1, C) = q["dp"], q[o.metric]
        g = dp1 - o.lam * D1
        lam_C, U = np.linalg.eigh(0.5 * (C + C.T))
        floor = 1e-12 * max(1.0, float(np.max(np.abs(lam_C))))
        if o.kind == "penalised":
            a = U @ ((U.T @ g) / (o.lam * np.maximum(lam_C, floor)))
        else:
            u = U @ ((U.T @ g) / np.maximum(lam_C, floor))
            u = u / np.linalg.norm(u) if np.linalg.norm(u) > 0 else e0
            c, beta = float(u @ C @ u), float(D1 @ u)
            t = (-beta + math.sqrt(beta * beta + 2.0 * c * o.budget)) / c if c > 0 else 1.0
            a = t * u
    a = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a)):
        a = e0
    if sign is not None:
        a = sign * np.abs(a) if np.any(a != 0) else sign * e0
    return a


def _probe(s: _Solver, a0: np.ndarray, sign) -> _Point:
    """The best point of a geometric line probe +-r a0 (one side with a sign) and alpha = 0."""
    o, pb = s.obj, s.pb
    n = float(np.linalg.norm(a0))
    u = a0 / n if n > 0 else np.eye(s.k)[0]
    n = min(n if n > 0 else 1.0, s.alpha_max)
    ladder = [r * n for r in LADDER if r * n <= s.alpha_max] + [s.alpha_max] * (o.kind == "level")
    cand = [side * r * u for side in ((1.0,) if sign is not None else (1.0, -1.0)) for r in ladder]
    pts = [s.make_point(np.zeros(s.k), {key: [v[0] for v in vals] for key, vals in pb.at0.items()})]
    pts += [s.point(c) for c in cand]
    s.curv_seen = max(float(np.max(np.abs(np.linalg.eigvalsh(p.hf)))) for p in pts)
    if o.kind == "penalised":
        return max(pts, key=lambda p: p.f)
    feas = [p for p in pts if p.g[0] <= 0]
    if o.kind == "budget":
        return max(feas, key=lambda p: p.f) if feas else min(pts, key=lambda p: p.g[0])
    if feas:
        return min(feas, key=lambda p: float(np.linalg.norm(p.x)))
    best = max(pts, key=lambda p: p.q["F"][0])
    if s.k == 1:  # the probe covers both half-lines up to alpha_max: the level is out of reach
        raise ValueError(f"level {o.level:g} is above what any alpha reaches: the target-concept probability peaks at "
                         f"{best.q['F'][0]:.6g} (alpha = {best.x[0]:.4g}) over |alpha| <= {s.alpha_max:g}")
    return best  # k > 1: other directions may reach it; the solver reports if none does


# ----------------------------------------------------------------------------- the driver

def optimize_vector(problem: MultiProblem, objective: Objective, *, method: str = "newton", alpha0=None,
                    sign=None, tol: float | None = None, ftol: float | None = None, max_iter: int | None = None,
                    max_outer: int = 40, alpha_max: float = 1e3, lr: float | None = None) -> VectorResult:
    """Optimise alpha in R^k.

    Args:
      problem: the k-term steered model and what is measured (`MultiProblem`).
      objective: an `Objective` (or a kind's name): penalised, budget or level; metric ce or kl.
      method: "newton" (the kernel's gradient and Hessian), "lbfgs", "adam" or "gd" (optax).
      alpha0: a start [k]; default the quadratic model's start and a line probe (module docstring).
      sign: k = 1 only: "auto" probes the side where the target's slope at 0 is positive
        (`slope_sign`), +1 / -1 that side; None probes both. Reported as `sign`, `slope_at_0`.
      tol, ftol, max_iter, max_outer, alpha_max, lr: as for `optimize` (tol and ftol default to
        1e-10 in float64, 1e-5 in float32).
    Returns:
      VectorResult. `converged` is False (with a `message`) when a tolerance was not met, the
      iterates reached alpha_max, or the answer is a flat stationary point.
    """
    if isinstance(objective, str):
        objective = Objective(objective)
    if not isinstance(objective, Objective):
        raise ValueError(f"objective must be an Objective or one of its kinds' names, got {objective!r}")
    if not isinstance(problem, MultiProblem):
        raise ValueError(f"problem must be a MultiProblem, got {type(problem).__name__}")
    pb, o, k = problem, objective, problem.k
    if o.kind == "level" and len(pb.targets) > 1:
        raise ValueError(f"targets: the level objective needs one target concept, got {len(pb.targets)} (a weighted "
                         "sum of probabilities is no probability); use penalised or budget")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (is_finite_number(alpha_max) and alpha_max > 0):
        raise ValueError(f"alpha_max must be a positive number, got {alpha_max!r}")
    if alpha0 is not None:
        a = np.asarray(alpha0, np.float64).reshape(-1) if np.ndim(alpha0) <= 1 else None
        if a is None or a.shape != (k,) or not np.all(np.isfinite(a)):
            raise ValueError(f"alpha0 must be {k} finite numbers (one per steering term, k = {k}), got {alpha0!r}")
        alpha0 = a
    if isinstance(sign, bool) or sign not in SIGNS:
        raise ValueError(f"sign must be None, 'auto', 1 or -1, got {sign!r}")
    if sign is not None and k != 1:
        raise ValueError(f"sign applies to a scalar alpha (k = 1), got k = {k}")
    if sign is not None and alpha0 is not None:
        raise ValueError("sign chooses the side the start is probed on: give alpha0 or sign, not both")
    f64 = pb.dtype == jnp.float64
    tol = (1e-10 if f64 else 1e-5) if tol is None else float(tol)
    ftol = (1e-10 if f64 else 1e-5) if ftol is None else float(ftol)
    if not (is_finite_number(tol) and tol > 0):
        raise ValueError(f"tol must be positive, got {tol!r}")
    if not (is_finite_number(ftol) and ftol > 0):
        raise ValueError(f"ftol must be positive, got {ftol!r}")
    if max_iter is None:
        max_iter = 5000 if method in ("adam", "gd") else 100
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(max_outer, bool) or not isinstance(max_outer, int) or max_outer < 1:
        raise ValueError(f"max_outer must be a positive integer, got {max_outer!r}")
    lr = DEFAULT_LR.get(method) if lr is None else lr
    if lr is not None and not (is_finite_number(lr) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")

    t0 = time.perf_counter()
    ev0 = pb.evaluations - 1  # the alpha = 0 evaluation made with the problem counts too
    slope = float(pb.at0["dp"][1][0][0]) if k == 1 else None
    if sign == "auto":
        sign, slope = slope_sign(pb)
    s, info = _Solver(pb, o, float(alpha_max)), _Stats()
    start = vector_start(pb, o, sign)
    if o.kind == "level" and pb.at0["F"][0][0] >= o.level:
        pt, mu, ok, msg = s.point(np.zeros(k)), np.zeros(1), True, "the level is already reached at alpha = 0"
        s.path.append(pt.x.tolist())
    else:
        pt = s.point(alpha0) if alpha0 is not None else _probe(s, start, sign)
        s.path.append(pt.x.tolist())
        pt, mu, ok, msg = _solve(s, pt, method, tol, ftol, max_iter, max_outer, lr, info)
    q = {key: v for key, v in pt.q.items()}
    if o.kind == "level":
        r = float(np.linalg.norm(pt.x))
        u = pt.x / r if r > 0 else np.zeros(k)
        objective_value, grad = r, u
        hess = (np.eye(k) - np.outer(u, u)) / r if r > 0 else np.zeros((k, k))
        constraint, cgrad = float(o.level - q["F"][0]), q["F"][1]
    else:
        objective_value, grad, hess = float(pt.f), pt.gf, pt.hf
        constraint = float(pt.g[0]) if pt.g.size else None
        cgrad = q[o.metric][1] if pt.g.size else None
    return VectorResult(
        alpha=pt.x.tolist(), objective=objective_value, delta_p_target=float(q["dp"][0]), delta_ce=float(q["ce"][0]),
        kl=float(q["kl"][0]), target_prob=float(q["F"][0]), grad=np.asarray(grad).tolist(),
        hessian=np.asarray(hess).tolist(), iterations=int(info.iterations), evaluations=pb.evaluations - ev0,
        converged=bool(ok), message=msg or ("converged" if ok else "not converged"), path=list(s.path),
        objective_kind=o.kind, method=method, metric=o.metric, lam=o.lam, budget=o.budget, level=o.level,
        targets=[[c, wt] for c, wt in pb.targets], k=k, contexts=pb.contexts.tolist(),
        grad_norm=float(info.grad_norm), constraint=constraint,
        constraint_grad=None if cgrad is None else np.asarray(cgrad).tolist(),
        multiplier=np.asarray(mu).tolist() if np.size(mu) else None,
        alpha_start=(start if alpha0 is None else alpha0).tolist(),
        sign=sign, slope_at_0=slope, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the grid baseline

def vector_landscape(problem: MultiProblem, objective: Objective, points, *, chunk_size: int = 1024) -> dict:
    """The objective at points [A, k] (values only, chunks of one compiled shape).

    Returns dict of arrays: `points` [A, k], `dp`, `ce`, `kl`, `F`, `objective` (the maximised
    value: dp - lam D, or -|alpha| for level) and `feasible` (the constraint holds), each [A].
    """
    if isinstance(objective, str):
        objective = Objective(objective)
    points = check_points(points, problem.k)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    C = int(min(chunk_size, len(points)))
    parts = [problem.evaluate(points[i:i + C], 0, pad_to=C) for i in range(0, len(points), C)]
    out = {key: np.concatenate([p[key][0] for p in parts]) for key in ("dp", "ce", "kl", "F")}
    out["points"] = points
    o = objective
    if o.kind == "level":
        out["objective"] = -np.linalg.norm(points, axis=1)
        out["feasible"] = out["F"] >= o.level
    else:
        out["objective"] = out["dp"] - o.lam * out[o.metric]
        out["feasible"] = out[o.metric] <= o.budget if o.kind == "budget" else np.ones(len(points), bool)
    return out


def _product(axes) -> np.ndarray:
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


def grid_optimum(problem: MultiProblem, objective: Objective, axes, *, refine: str | None = "zoom", zoom: int = 11,
                 xtol: float | None = None, chunk_size: int = 1024, max_rounds: int = 60) -> dict:
    """The baseline: the best feasible point of the dense product grid of `axes` (one 1-D grid per
    steering term, one model evaluation per point, values only), refined.

    Refinement ("zoom", values only): a grid of `zoom` points per axis spanning +-1 old spacing
    around the best point, the spacing shrinking by (zoom - 1) / 2 each round (or the window
    recentred, same spacing, when the best point lies on its edge) until it is below xtol
    (1e-7 in float64, 1e-4 in float32). On a binding constraint the best feasible grid point is
    accurate to about sqrt(spacing) along the constraint's boundary only. "newton":
    `optimize_vector` from the best grid point. None: the grid point itself.

    Returns:
      dict: `alpha` [k], `objective` (as VectorResult's), `delta_p_target`, `delta_ce`, `kl`,
      `target_prob`, `evaluations` (all, refinement included), `grid_evaluations`, `grid_alpha`,
      `grid_objective`, `on_grid_edge` (the dense grid's best point is on its boundary: widen it),
      `spacing` [k] (final), `rounds` (zooms, or Newton steps), `converged` (spacing <= xtol within
      max_rounds, or Newton's verdict), `seconds`.
    """
    if isinstance(objective, str):
        objective = Objective(objective)
    if not isinstance(objective, Objective):
        raise ValueError(f"objective must be an Objective or one of its kinds' names, got {objective!r}")
    if not isinstance(problem, MultiProblem):
        raise ValueError(f"problem must be a MultiProblem, got {type(problem).__name__}")
    if refine not in ("zoom", "newton", None):
        raise ValueError(f"refine must be 'zoom', 'newton' or None, got {refine!r}")
    if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 3 or zoom % 2 == 0:
        raise ValueError(f"zoom must be an odd integer >= 3, got {zoom!r}")
    k = problem.k
    try:
        axes = [np.asarray(a, np.float64).reshape(-1) for a in axes]
    except (TypeError, ValueError):
        raise ValueError("axes must be a list of 1-D grids, one per steering term") from None
    if len(axes) != k or any(a.size == 0 or not np.all(np.isfinite(a)) or np.any(np.diff(a) <= 0) for a in axes):
        raise ValueError(f"axes must be {k} non-empty, finite, increasing 1-D grids (one per steering term)")
    xtol = (1e-7 if problem.dtype == jnp.float64 else 1e-4) if xtol is None else float(xtol)
    if not (is_finite_number(xtol) and xtol > 0):
        raise ValueError(f"xtol must be positive, got {xtol!r}")
    t0 = time.perf_counter()
    ev0 = problem.evaluations

    def best_of(points):
        land = vector_landscape(problem, objective, points, chunk_size=chunk_size)
        score = np.where(land["feasible"], land["objective"], -np.inf)
        if not np.isfinite(score).any():
            raise ValueError("no point of the grid satisfies the constraint")
        i = int(np.argmax(score))
        return i, {key: float(land[key][i]) for key in ("objective", "dp", "ce", "kl", "F")}

    i, vals = best_of(_product(axes))
    idx = np.unravel_index(i, tuple(a.size for a in axes))
    x = np.array([a[j] for a, j in zip(axes, idx)])
    on_edge = any(a.size > 1 and j in (0, a.size - 1) for a, j in zip(axes, idx))
    grid_alpha, grid_value, grid_evals = x.tolist(), vals["objective"], problem.evaluations - ev0
    h = np.array([float(np.max(np.diff(a))) if a.size > 1 else 0.0 for a in axes])
    rounds, converged = 0, True
    if refine == "zoom":
        half = (zoom - 1) // 2
        while np.max(h) > xtol and rounds < max_rounds:
            offsets = [np.linspace(-hi, hi, zoom) if hi > 0 else np.zeros(1) for hi in h]
            i, vals = best_of(x + _product(offsets))
            j = np.unravel_index(i, tuple(o.size for o in offsets))
            x = x + np.array([o[jj] for o, jj in zip(offsets, j)])
            if not any(o.size > 1 and jj in (0, zoom - 1) for o, jj in zip(offsets, j)):
                h = h / half
            rounds += 1
        converged = bool(np.max(h) <= xtol)
    elif refine == "newton":
        res = optimize_vector(problem, objective, alpha0=x)
        x, rounds, converged = np.asarray(res.alpha), res.iterations, res.converged
        vals = {"objective": res.objective, "dp": res.delta_p_target, "ce": res.delta_ce, "kl": res.kl,
                "F": res.target_prob}
    value = vals["objective"]
    if objective.kind == "level":
        value, grid_value = (abs(value) if refine != "newton" else value), abs(grid_value)
    return {"alpha": x.tolist(), "objective": value, "delta_p_target": vals["dp"], "delta_ce": vals["ce"],
            "kl": vals["kl"], "target_prob": vals["F"], "evaluations": problem.evaluations - ev0,
            "grid_evaluations": grid_evals, "grid_alpha": grid_alpha, "grid_objective": grid_value,
            "on_grid_edge": bool(on_edge), "spacing": h.tolist(), "rounds": rounds, "converged": converged,
            "seconds": time.perf_counter() - t0}
