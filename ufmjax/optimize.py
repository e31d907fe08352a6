"""Optimal steering strength by gradient-based optimisation of alpha (issue #4).

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

How. Every quantity comes from the sweep kernel's own point function (`sweep._chunk_fn`: the
kernel's quantities with first and second derivatives in alpha by forward mode), so the
optimiser measures exactly what `ufmjax sweep` reports; per context, row j's derivative in its
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
Fisher curvature along the steering direction from one jvp, = sum_j pi_j Var_j(M) for the UFM,
Thm 3.8) and a coarse geometric bracket around it (both signs) choose where to start, so a
multi-modal or plateauing landscape (GPTs: ΔCE flattens at large |alpha|, Prop. 4.1) is met
honestly: iterates that run to |alpha| = alpha_max, or a stationary point without curvature
(a plateau), are reported as `converged=False` with a message, never as an optimum.

Evaluations count forward passes of the steered model over all its rows (with their
forward-mode tangents for newton, a reverse pass for the optax solvers); a vector of per-row
alphas costs one pass when the closure has a registered one-pass `rowwise` form (the UFM, linear
closures, GPT closures via `ufmjax.cli_optimize.problem_from_run`), else one pass per row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ufmjax import steering
from ufmjax.steering import Steered
# The kernel's internals, so that the optimiser measures exactly what `sweep` reports (a public
# point-evaluation API in sweep.py would let these go; see the issue #4 report).
from ufmjax.sweep import _base_fn, _cast_floats, _chunk_fn, _quantities, check_alphas, sweep

OBJECTIVES = ("penalised", "budget", "level")
METRICS = ("ce", "kl")
METHODS = ("newton", "lbfgs", "adam", "gd")
DEFAULT_LAM = {"penalised": 0.1, "budget": 0.0}
# Multiples of the closed-form start tried before descending (both signs): a coarse bracket.
LADDER = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Default learning rates of the first-order optax solvers (lbfgs finds its own by line search).
DEFAULT_LR = {"adam": 0.05}  # gd: 1 / the largest curvature met on the start bracket
# A stationary point is called flat (not a strict optimum) when the smallest eigenvalue of the
# Lagrangian's Hessian is below FLAT times its largest (or FLAT in absolute terms).
FLAT = 1e-9


# ----------------------------------------------------------------------------- objectives

@dataclass(frozen=True)
class Objective:
    """What to optimise; see the module docstring for the exact formulas.

    Args:
      kind: "penalised", "budget" or "level".
      lam: weight of the distortion penalty (penalised: > 0, default 0.1; budget: >= 0, default 0).
      budget: the distortion budget (kind "budget"), > 0, in nats.
      level: target-concept probability to reach (kind "level"), in (0, 1).
      metric: the distortion D: "ce" (ΔCE, Def. 3.7) or "kl" (mean KL to the unsteered model).
    """

    kind: str = "penalised"
    lam: float | None = None
    budget: float | None = None
    level: float | None = None
    metric: str = "ce"

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.kind == "level":
            if self.lam is not None:
                raise ValueError("lam applies to the penalised and budget objectives, not level")
            if self.budget is not None:
                raise ValueError("budget applies to the budget objective, not level")
            if self.level is None:
                raise ValueError("the level objective needs a level (a target-concept probability in (0, 1))")
            if not (_finite(self.level) and 0.0 < self.level < 1.0):
                raise ValueError(f"level must be a probability in (0, 1), got {self.level!r}")
            return
        if self.level is not None:
            raise ValueError(f"level applies to the level objective, not {self.kind}")
        lam = DEFAULT_LAM[self.kind] if self.lam is None else self.lam
        if not _finite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.kind == "penalised":
            if self.budget is not None:
                raise ValueError("budget applies to the budget objective (use --objective budget)")
            if lam == 0:
                raise ValueError("penalised needs lam > 0: with lam = 0 the steering effect grows with alpha "
                                 "and has no finite maximiser (use the budget or level objective)")
        else:
            if self.budget is None:
                raise ValueError("the budget objective needs a budget (in nats)")
            if not _finite(self.budget):
                raise ValueError(f"budget must be a finite number, got {self.budget!r}")
            if self.budget <= 0:
                raise ValueError(f"budget must be positive (a distortion allowance in nats), got {self.budget!r}: "
                                 "steering always costs distortion near alpha = 0 (Thm 3.8)")
        object.__setattr__(self, "lam", float(lam))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- per-row alphas

# fn -> rowwise(params, alpha_M) -> logits [M, V] with row j steered by alpha_M[j]. Models whose
# rows are independent (every Steered) can always be steered row by row by evaluating the whole
# model once per row (`_diagonal_rowwise`); a model that knows how to do it in one pass registers it.
_ROWWISE: dict[Callable, Callable] = {}


def register_rowwise(fn: Callable, rowwise: Callable) -> None:
    """Declare `rowwise(params, alpha_M) -> logits [M, V]` (row j at alpha_M[j]) for a closure fn.

    Without it, per-context optimisation evaluates the model once per row (M times the work).
    `rowwise` must be a stable (module-level or memoised) function, like fn.
    """
    _ROWWISE[fn] = rowwise


def _ufm_rowwise(params, alpha_M):
    W_VxD = params["W"]
    return (W_VxD @ params["H"]).T + alpha_M[:, None] * (W_VxD @ params["v"])[None, :]


def _linear_rowwise(params, alpha_M):
    return params["base"] + alpha_M[:, None] * params["direction"]


if hasattr(steering, "ufm_logits"):
    register_rowwise(steering.ufm_logits, _ufm_rowwise)
register_rowwise(steering.linear_logits, _linear_rowwise)


@functools.lru_cache(maxsize=64)
def _diagonal_rowwise(fn):
    """Row j of fn(params, alpha_M[j]) for every j: one full model evaluation per row."""

    def rowwise(params, alpha_M):
        rows = jnp.arange(alpha_M.shape[0])
        return jax.vmap(lambda a, j: jnp.take(fn(params, a), j, axis=0))(alpha_M, rows)

    return rowwise


def rowwise_of(fn) -> tuple[Callable, bool]:
    """(rowwise closure, whether it is one pass) for a steered closure fn."""
    if fn in _ROWWISE:
        return _ROWWISE[fn], True
    return _diagonal_rowwise(fn), False


@functools.lru_cache(maxsize=64)
def _shifted(rowwise):
    """`(params, alpha_M), t -> rowwise(params, alpha_M + t)`: a Steered closure whose kernel
    derivatives in t at t = 0 are d(row j)/d(alpha_j), since row j depends on alpha_j only."""

    def fn(params_and_alphas, t):
        params, alpha_M = params_and_alphas
        return rowwise(params, alpha_M + t)

    return fn


# ----------------------------------------------------------------------------- the problem

class Problem:
    """A steered model with what the objectives measure on it.

    Args:
      steered: the model's `alpha -> logits [M, V]` closure (UFM, GPT, any Steered).
      concept_of: [V] concept id of every token.
      target: the target concept T.
      ce_target: what ΔCE is measured against, as for `sweep`: None (the model's own unsteered
        distribution), a [M, V] table, or [M] observed next tokens.
      weights: [M] row weights (context probabilities pi); uniform by default.
      contexts: evaluation rows E (indices into the M rows); all rows by default.
      dtype: float64 (default when jax_enable_x64 is on) or float32.
    """

    def __init__(self, steered: Steered, *, concept_of, target: int, ce_target=None, weights=None,
                 contexts=None, dtype=None):
        if dtype is None:
            dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        self.dtype = jnp.dtype(dtype)
        self.steered = steered
        # A values-only sweep at alpha = 0 validates every argument exactly as `ufmjax sweep` does.
        at0 = sweep(steered, [0.0], concept_of=concept_of, ce_target=ce_target, weights=weights,
                    tokens=[0], derivatives=0, chunk_size=1, dtype=self.dtype)
        concept_of = np.asarray(concept_of)
        self.concept_of = concept_of
        G = int(concept_of.max()) + 1
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < G:
            raise ValueError(f"unknown target concept {target!r}: concepts are 0..{G - 1}")
        self.target = int(target)
        M, V = at0["probs_base"].shape
        self.num_rows, self.vocab, self.num_concepts = M, V, G
        if contexts is None:
            contexts = np.arange(M)
        contexts = np.asarray(contexts).reshape(-1)
        if contexts.size == 0 or not np.issubdtype(contexts.dtype, np.integer):
            raise ValueError("contexts must be a non-empty list of row indices")
        if contexts.min() < 0 or contexts.max() >= M:
            raise ValueError(f"contexts must be row indices in [0, {M}), got {contexts.tolist()}")
        if np.unique(contexts).size != contexts.size:
            raise ValueError(f"contexts holds repeated rows: {contexts.tolist()}")
        self.contexts = np.sort(contexts).astype(np.int64)
        w = at0["weights"][self.contexts]
        if not w.sum() > 0:
            raise ValueError("the evaluation contexts all have weight 0")
        self.w_E = w / w.sum()
        w_M = np.zeros(M)
        w_M[self.contexts] = self.w_E

        fn = steered.fn
        self.params = _cast_floats(steered.params, self.dtype)
        sizes = np.bincount(concept_of, minlength=G)
        if ce_target is None:  # the model's own unsteered distribution (as `sweep`)
            targets = jnp.asarray(at0["probs_base"], self.dtype)
            self.label_targets = False
        else:
            targets = np.asarray(ce_target)
            self.label_targets = bool(np.issubdtype(targets.dtype, np.integer))
            targets = jnp.asarray(targets, jnp.int32 if self.label_targets else self.dtype)
        self.consts = {
            "tokens": jnp.zeros((1,), jnp.int32),
            "onehot": jnp.asarray(np.eye(G)[concept_of], self.dtype),
            "inv_size": jnp.asarray(1.0 / sizes, self.dtype),
            "targets": targets,
            "weights": jnp.asarray(w_M, self.dtype),  # delta_ce is the objective's D directly
            "target": jnp.asarray(np.eye(G)[self.target], self.dtype),
            "rows": jnp.asarray(self.contexts, jnp.int32),
        }
        self.base = _base_fn(fn)(self.params, self.consts, label_targets=self.label_targets)
        self.rowwise, self.one_pass = rowwise_of(fn)
        self.evaluations = 0
        # Values and two derivatives at alpha = 0, for the closed-form start. Every evaluation
        # of a shared alpha goes through this one compiled shape (one alpha per call).
        self.at0 = self.shared([0.0])

    # -- evaluation -------------------------------------------------------------------------

    def _rows_from_kernel(self, out, prefixes, batched: bool) -> dict[str, list[np.ndarray]]:
        """Per-row quantities [A, E] (value and derivatives) from kernel output."""
        T, E = self.target, self.contexts
        rows = {}
        others = np.arange(self.num_concepts) != T
        for key, name, col in (("dp", "delta_p_concept", True), ("F", "concept_prob", True),
                               ("Fnot", "concept_prob", False), ("ce", "delta_ce_ctx", None),
                               ("kl", "kl", None)):
            vals = []
            for prefix in prefixes:
                a = np.asarray(out[prefix + name], np.float64)
                if col is True:
                    a = a[..., T]
                elif col is False:
                    # 1 - F_T summed from the other concepts: exact where F_T rounds to 1.
                    a = a[..., others].sum(axis=-1)
                vals.append(a[:, E] if batched else a[E])
            rows[key] = vals
        return rows

    def shared(self, alphas, order: int = 2) -> dict[str, list[np.ndarray]]:
        """Per-row quantities at shared alphas: name -> [value, d/dalpha, ...], each [A, E]."""
        alphas = check_alphas(alphas)
        out = _chunk_fn(self.steered.fn, order, self.label_targets)(
            jnp.asarray(alphas, self.dtype), self.params, self.base, self.consts)
        self.evaluations += alphas.size
        named = {}
        for prefix, tree in zip(("", "d_", "d2_")[:order + 1], out):
            named.update({prefix + k: v for k, v in tree.items()})
        return self._rows_from_kernel(named, ("", "d_", "d2_")[:order + 1], batched=True)

    def alpha_rows(self, x_E) -> jax.Array:
        """The [M] alpha of every row: x on the evaluation rows, 0 elsewhere."""
        return jnp.zeros(self.num_rows, self.dtype).at[self.consts["rows"]].set(jnp.asarray(x_E, self.dtype))

    def per_row(self, x_E, order: int = 2) -> dict[str, list[np.ndarray]]:
        """Per-row quantities with row j steered by its own alpha: name -> [value, d/dalpha_j, ...], [E]."""
        x_E = np.asarray(x_E, np.float64).reshape(-1)
        out = _chunk_fn(_shifted(self.rowwise), order, self.label_targets)(
            jnp.zeros((1,), self.dtype), (self.params, self.alpha_rows(x_E)), self.base, self.consts)
        self.evaluations += 1 if self.one_pass else self.num_rows
        named = {}
        for prefix, tree in zip(("", "d_", "d2_")[:order + 1], out):
            named.update({prefix + k: v for k, v in tree.items()})
        rows = self._rows_from_kernel(named, ("", "d_", "d2_")[:order + 1], batched=True)
        return {k: [v[0] for v in vs] for k, vs in rows.items()}

    def summary(self, rows: dict[str, list[np.ndarray]]) -> dict[str, float]:
        """Weighted totals dp, D (ce and kl) and F of per-row values [E] (or [A, E])."""
        return {k: rows[k][0] @ self.w_E for k in ("dp", "ce", "kl", "F")}

    def fisher_curvature(self) -> np.ndarray:
        """Per-row Fisher curvature along the steering direction at alpha = 0, from one jvp.

        With s = d logits / d alpha at 0, KL''(0) = Var_{p_0}(s) (the Fisher information in
        alpha); for the UFM s = M + const, so it is Var_j(M) and ΔCE''(0) too (Thm 3.8).
        Returns [E] per-row curvatures (weight them with w_E for the objective's c).
        """
        var = _fisher_fn(self.steered.fn)(self.params, jnp.zeros((), self.dtype))
        self.evaluations += 1
        return np.asarray(var, np.float64)[self.contexts]


@functools.lru_cache(maxsize=64)
def _fisher_fn(fn):
    def fisher(params, zero):
        logits, s = jax.jvp(lambda a: fn(params, a), (zero,), (jnp.ones_like(zero),))
        p = jax.nn.softmax(logits, axis=-1)
        mean = jnp.sum(p * s, axis=-1, keepdims=True)
        return jnp.sum(p * (s - mean) ** 2, axis=-1)

    return jax.jit(fisher)


# ----------------------------------------------------------------------------- results

@dataclass
class Result:
    """An optimisation's answer and how it was reached (`to_dict()` is the CLI's JSON)."""

    alpha: Any                      # float, or [E] per context
    objective: float                # the optimised value (penalised/budget: dp - lam D; level: |alpha|)
    delta_p_target: float           # dp: weighted mean of Δp(T | c_j, alpha) (Def. 3.5)
    delta_ce: float                 # weighted ΔCE (Def. 3.7)
    kl: float                       # weighted mean KL(p_alpha || p_0)
    target_prob: float              # weighted mean F_T(alpha)
    iterations: int
    evaluations: int
    converged: bool
    message: str
    objective_kind: str
    method: str
    metric: str
    lam: float | None
    budget: float | None
    level: float | None
    per_context: bool
    target: int
    contexts: list
    grad_norm: float
    constraint: float | None = None       # D - budget, or level - F (max over rows per context)
    multiplier: Any = None
    alpha_start: Any = None               # the closed-form start
    curvature: float | None = None        # c of the closed-form start
    path: list = field(default_factory=list)
    seconds: float = 0.0
    rows: dict = field(default_factory=dict)      # per-row dp, ce, kl, F at the answer
    shared: dict | None = None                    # per context: the shared-alpha solve
    gain: float | None = None                     # per context: objective gain over the shared alpha

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return _jsonable(d)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


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


def _newton_inner(s: _Solver, pt: _Point, mu, rho, tol, max_iter, info):
    """Damped Newton on the augmented Lagrangian from pt; returns (point, converged, message)."""
    for _ in range(max_iter):
        L, grad, H = s.lagrangian(pt, mu, rho)
        gnorm = float(np.max(np.abs(grad)))
        info["grad_norm"] = gnorm
        # Relative to the size of the balanced terms (grad f = nu grad g at a constrained optimum).
        if gnorm <= tol * max(1.0, float(np.max(np.abs(pt.gf)))):
            return pt, True, ""
        d = _model_direction(pt, mu, rho)
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
        info["iterations"] += 1
        if accepted is None:
            return pt, False, f"line search failed at |grad| = {gnorm:.3g}"
        pt = accepted
        s.path.append(_as_alpha(pt.x, s.per_context))
        if np.max(np.abs(pt.x)) >= s.alpha_max:
            return pt, False, (f"the objective still improves at |alpha| = {np.max(np.abs(pt.x)):.4g} >= alpha_max"
                               f" = {s.alpha_max:g}: the optimum is not attained (a plateau or an unbounded"
                               " objective); raise alpha_max or add a penalty")
    return pt, False, f"no convergence in {max_iter} iterations (|grad| = {info['grad_norm']:.3g} > tol = {tol:g})"


@functools.lru_cache(maxsize=64)
def _merit_fn(fn, rowwise, label_targets: bool, kind: str, metric: str, per_context: bool):
    """The augmented Lagrangian as a jax function of x, for reverse-mode autodiff and optax."""

    def merit(x, params, base, consts, hyper):
        if per_context:
            alpha_M = jnp.zeros(consts["weights"].shape[0], x.dtype).at[consts["rows"]].set(x)
            logits = rowwise(params, alpha_M)
        else:
            logits = fn(params, x[0])
        q = _quantities(logits, base, consts, label_targets)
        w = consts["weights"]
        F_M = q["concept_prob"] @ consts["target"]
        if kind == "level":
            f = -0.5 * jnp.sum(x * x)
            Fnot_M = q["concept_prob"] @ (1.0 - consts["target"])
            if per_context:
                logit = jnp.log(F_M[consts["rows"]]) - jnp.log(Fnot_M[consts["rows"]])
            else:
                logit = (jnp.log(jnp.dot(w, F_M)) - jnp.log(jnp.dot(w, Fnot_M)))[None]
            g = hyper["level"] - logit
        else:
            dp = jnp.dot(w, q["delta_p_concept"] @ consts["target"])
            D = jnp.dot(w, q["delta_ce_ctx"] if metric == "ce" else q["kl"])
            f = dp - hyper["lam"] * D
            g = (D - hyper["budget"])[None] if kind == "budget" else jnp.zeros((0,), x.dtype)
        mu, rho = hyper["mu"], hyper["rho"]
        nu = jnp.maximum(0.0, mu + rho * g)
        return -f + jnp.sum(nu ** 2 - mu ** 2) / (2.0 * rho)

    return merit


@functools.lru_cache(maxsize=64)
def _optax_step(fn, rowwise, label_targets, kind, metric, per_context, method, lr):
    merit = _merit_fn(fn, rowwise, label_targets, kind, metric, per_context)
    if method == "lbfgs":
        tx = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
    elif method == "adam":
        tx = optax.adam(lr)
    else:
        # Plain gradient descent with a fixed step (a state hyperparameter, set per inner solve).
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)

    @jax.jit
    def step(x, state, params, base, consts, hyper):
        def value_fn(y):
            return merit(y, params, base, consts, hyper)

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
    tx, step = _optax_step(pb.steered.fn, pb.rowwise, pb.label_targets, s.obj.kind, s.obj.metric,
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
        info["lr"] = step_size
        state.hyperparams["learning_rate"] = jnp.asarray(step_size, pb.dtype)
    cost = 1 if (pb.one_pass or not s.per_context) else pb.num_rows
    searched = method == "lbfgs"
    if searched:
        pb.evaluations += cost  # the first value and gradient; later ones come from the line search
    converged, message = False, f"no convergence in {max_iter} iterations"
    value0, still, best, since_best = None, 0, np.inf, 0
    for _ in range(max_iter):
        x_new, state_new, value, grad = step(x, state, params, pb.base, pb.consts, hyper)
        value0 = float(value) if value0 is None else value0
        gnorm = float(jnp.max(jnp.abs(grad)))
        info["grad_norm"] = gnorm
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
        info["iterations"] += 1
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
        message += f" (|grad| = {info['grad_norm']:.3g} > tol = {tol:g})"
    # Re-evaluate the answer with the kernel (counted) so every reported number is the kernel's.
    return s.point(np.asarray(x, np.float64)), converged, message


# ----------------------------------------------------------------------------- the driver

def _as_alpha(x, per_context):
    x = np.asarray(x, np.float64).reshape(-1)
    return x.tolist() if per_context else float(x[0])


def closed_form_start(problem: Problem, objective: Objective) -> tuple[float, float]:
    """A first alpha from the quadratic law near 0, and the curvature c it used.

    D(alpha) ≈ D'(0) alpha + c alpha^2 / 2 with c = sum_j w_j Var_{p_0}(d logits_j / d alpha)
    (the Fisher curvature from one jvp; sum_j pi_j Var_j(M) for the UFM, Thm 3.8), and
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
        # alpha = 0 is always feasible for KL; for CE it is unless ΔCE'(0) is large.
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
        _, _, H = s.lagrangian(pt, mu, info.get("rho", 10.0))
        eig = np.linalg.eigvalsh(0.5 * (H + H.T))
        info["curvature"] = float(eig.min())
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
    inner = (lambda p, m, r: _newton_inner(s, p, m, r, tol, max_iter, info)) if method == "newton" else \
        (lambda p, m, r: _optax_inner(s, p, m, r, tol, max_iter, info, method, lr))
    info["rho"] = rho
    if K == 0:
        pt, ok, msg = inner(pt, mu, rho)
        return pt, mu, ok, msg
    prev = np.inf
    ok, msg = False, ""
    for outer in range(max_outer):
        info["rho"] = rho
        pt, ok, msg = inner(pt, mu, rho)
        mu_new = np.maximum(0.0, mu + rho * pt.g)
        viol = float(np.max(np.abs(np.minimum(-pt.g, mu_new))))
        info["outer"] = outer + 1
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (_finite(alpha_max) and alpha_max > 0):
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
    if lr is not None and not (_finite(lr) and lr > 0):
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
    info = {"iterations": 0, "grad_norm": np.nan}
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
    info = {"iterations": 0, "grad_norm": np.nan}
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
        iterations=int(info["iterations"]), evaluations=pb.evaluations, converged=bool(ok),
        message=msg or ("converged" if ok else "not converged"), objective_kind=o.kind, method=method,
        metric=o.metric, lam=o.lam, budget=o.budget, level=o.level, per_context=s.per_context,
        target=pb.target, contexts=pb.contexts.tolist(), grad_norm=float(info["grad_norm"]),
        constraint=constraint, multiplier=(np.asarray(mu).tolist() if np.size(mu) else None),
        alpha_start=alpha_start, curvature=curvature, path=list(s.path),
        rows={k: pt.rows[k][0].tolist() for k in ("dp", "ce", "kl", "F")})


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
    if not (_finite(budget) and budget > 0):
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
