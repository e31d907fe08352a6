"""What is optimised: the `Objective`, the `Problem` (a steered model and what it measures),
and the `Result` of a solve.

Shape legend: A = alphas evaluated together, M = rows of the steered model, V = vocabulary,
G = concepts, E = evaluation rows. Every quantity comes from the kernel's public `Evaluator`
(the taylor path by default; see `Problem`'s `method`), so the optimiser measures exactly what
`ufmjax sweep` reports.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ufmjax.common import cast_floats, jsonable
from ufmjax.kernel import PREFIXES, Evaluator, check_alphas, check_dtype, make_measure
from ufmjax.steering import Steered, head_of, rowwise_of

OBJECTIVES = ("penalised", "budget", "level")
METRICS = ("ce", "kl")
DEFAULT_LAM = {"penalised": 0.1, "budget": 0.0}
# What the objectives read from the kernel (the rest is never computed for them).
KERNEL_QUANTITIES = ("delta_p_concept", "concept_prob", "delta_ce_ctx", "kl")


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
            if not (is_finite_number(self.level) and 0.0 < self.level < 1.0):
                raise ValueError(f"level must be a probability in (0, 1), got {self.level!r}")
            return
        if self.level is not None:
            raise ValueError(f"level applies to the level objective, not {self.kind}")
        lam = DEFAULT_LAM[self.kind] if self.lam is None else self.lam
        if not is_finite_number(lam) or lam < 0:
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
            if not is_finite_number(self.budget):
                raise ValueError(f"budget must be a finite number, got {self.budget!r}")
            if self.budget <= 0:
                raise ValueError(f"budget must be positive (a distortion allowance in nats), got {self.budget!r}: "
                                 "steering always costs distortion near alpha = 0 (Thm 3.8)")
        object.__setattr__(self, "lam", float(lam))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_finite_number(x) -> bool:
    """Whether x converts to a finite float."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def check_contexts(contexts, M: int) -> np.ndarray:
    """Evaluation rows (None: all M) as sorted distinct int64 indices, else ValueError naming contexts."""
    contexts = np.arange(M) if contexts is None else np.asarray(contexts).reshape(-1)
    if contexts.size == 0 or not np.issubdtype(contexts.dtype, np.integer):
        raise ValueError("contexts must be a non-empty list of row indices")
    if contexts.min() < 0 or contexts.max() >= M:
        raise ValueError(f"contexts must be row indices in [0, {M}), got {contexts.tolist()}")
    if np.unique(contexts).size != contexts.size:
        raise ValueError(f"contexts holds repeated rows: {contexts.tolist()}")
    return np.sort(contexts).astype(np.int64)


# ----------------------------------------------------------------------------- per-row alphas

@functools.lru_cache(maxsize=64)
def shifted_rowwise(rowwise):
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
      method: the kernel path of shared-alpha evaluations: "auto" ("head" for closures declared
        with their unembedding, the GPTs and pretrained models, else "taylor"), "affine"
        (closures declared affine, such as the UFM), "head", "taylor" or "jvp". All agree to rounding
        (tested to 1e-10 on the optimum). "auto" is taylor even for the UFM because the
        optimiser asks for one alpha per call, where the affine path's setup (the exact upper
        envelope) and its longer closed forms cost more than they save: measured 0.84x the
        speed of taylor on the reference UFM and 0.73x at V = 50,257 (`ufmjax bench
        --sections optimize` prints the ratio); its gain is on long grids (`sweep`).
    """

    def __init__(self, steered: Steered, *, concept_of, target: int, ce_target=None, weights=None,
                 contexts=None, dtype=None, method: str = "auto"):
        if dtype is None:
            dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        self.dtype = check_dtype(dtype)
        self.steered = steered
        # The same validation as `ufmjax sweep`; one tracked token (the objectives track none).
        measure = make_measure(steered, concept_of=concept_of, ce_target=ce_target, weights=weights,
                               tokens=[0], dtype=self.dtype)
        concept_of = np.asarray(concept_of)
        self.concept_of = concept_of
        G = measure.num_concepts
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < G:
            raise ValueError(f"unknown target concept {target!r}: concepts are 0..{G - 1}")
        self.target = int(target)
        M, V = measure.num_rows, concept_of.size
        self.num_rows, self.vocab, self.num_concepts = M, V, G
        self.contexts = check_contexts(contexts, M)
        w_all = np.full(M, 1.0 / M) if weights is None else np.asarray(weights, np.float64)
        w = w_all[self.contexts]
        if not w.sum() > 0:
            raise ValueError("the evaluation contexts all have weight 0")
        self.w_E = w / w.sum()
        w_M = np.zeros(M)
        w_M[self.contexts] = self.w_E
        # delta_ce is then the objective's D directly.
        self.measure = measure.replace(weights_M=jnp.asarray(w_M, self.dtype))
        self.target_G = jnp.asarray(np.eye(G)[self.target], self.dtype)
        self.rows_E = jnp.asarray(self.contexts, jnp.int32)
        self.params = cast_floats(steered.params, self.dtype)
        # Every shared alpha is evaluated by this one compiled evaluator, one alpha per call.
        if method == "auto":  # head for closures that declare one, never affine (see above)
            method = "head" if head_of(steered.fn) is not None else "taylor"
        self.evaluator = Evaluator(steered, self.measure, order=2, method=method, dtype=self.dtype,
                                   devices=jax.devices()[:1], quantities=KERNEL_QUANTITIES)
        self.method = self.evaluator.method
        self.reference = self.evaluator.reference
        self.rowwise, self.one_pass = rowwise_of(steered.fn)
        self.evaluations = 0
        # Values and two derivatives at alpha = 0, for the closed-form start.
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
        named = self.evaluator.at(alphas, order)
        self.evaluations += alphas.size
        return self._rows_from_kernel(named, PREFIXES[:order + 1], batched=True)

    def alpha_rows(self, x_E) -> jax.Array:
        """The [M] alpha of every row: x on the evaluation rows, 0 elsewhere."""
        return jnp.zeros(self.num_rows, self.dtype).at[self.rows_E].set(jnp.asarray(x_E, self.dtype))

    def per_row(self, x_E, order: int = 2) -> dict[str, list[np.ndarray]]:
        """Per-row quantities with row j steered by its own alpha: name -> [value, d/dalpha_j, ...], [E]."""
        x_E = np.asarray(x_E, np.float64).reshape(-1)
        # Row j depends on alpha_j only, so the kernel's derivatives in a shift t of every
        # alpha at t = 0 are d(row j)/d(alpha_j); measured against the UNSTEERED reference.
        shifted = Steered(shifted_rowwise(self.rowwise), (self.params, self.alpha_rows(x_E)))
        ev = Evaluator(shifted, self.measure, order=order, method="taylor", dtype=self.dtype,
                       devices=jax.devices()[:1], reference=self.reference, quantities=KERNEL_QUANTITIES)
        named = ev.at([0.0], order)
        self.evaluations += 1 if self.one_pass else self.num_rows
        rows = self._rows_from_kernel(named, PREFIXES[:order + 1], batched=True)
        return {k: [v[0] for v in vs] for k, vs in rows.items()}

    def summary(self, rows: dict[str, list[np.ndarray]]) -> dict[str, float]:
        """Weighted totals dp, D (ce and kl) and F of per-row values [E] (or [A, E])."""
        return {k: rows[k][0] @ self.w_E for k in ("dp", "ce", "kl", "F")}

    def fisher_curvature(self) -> np.ndarray:
        """Per-row Fisher curvature along the steering direction at alpha = 0, [E].

        With s = d logits / d alpha at 0, KL''(0) = Var_{p_0}(s) (the Fisher information in
        alpha; the other term of KL'' vanishes at 0); for the UFM s = M + const, so it is
        Var_j(M) and ΔCE''(0) too (Thm 3.8). Read off the kernel's evaluation at alpha = 0
        made when the problem was built (no further model evaluation). Weight it with w_E.
        """
        return np.asarray(self.at0["kl"][2][0], np.float64)


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
        return jsonable(d)


