"""KL on rollouts: steered continuations, the teacher-forced KL(steered || base) along them, and
a KL budget solved by Newton on its alpha-derivative against a bracketing regula falsi.

Shape legend: B = prompts, P = prompt positions (left-padded for pretrained decoders), T =
continuation tokens, N = positions of a whole sequence (P + T), V = vocabulary, D = residual
width, H = query heads, K = key/value heads (GPT: K = H), G = H / K, E = head width.

A sweep measures the next token of a fixed prompt; a deployed steered model writes T tokens of
its own and is judged on all of them. Here:

1. `rollout`: steered greedy (argmax, ties by lowest id) or seeded sampled continuations, one
   compiled `fori_loop` over the T steps;
2. `rollout_kl`: with those tokens held fixed, one teacher-forced pass gives every position's
   steered and unsteered next-token distributions, so the per-token KL(p_alpha || p_0) at the T
   positions that predict the continuation, and by forward mode its derivative in alpha;
3. `budget_newton`: alpha where a summary of that KL (mean, p50, p90, p95, max) meets a budget,
   by a safeguarded Newton iteration on the tokens-fixed derivative, re-rolling at each new
   alpha; `budget_regula_falsi` is the derivative-free baseline of steering tools (double alpha
   until over budget, then Illinois regula falsi), and `compare_budget` runs both.

The function solved is F(alpha) = stat(KL along rollout(alpha)): the tokens change with alpha,
so F is only piecewise smooth; the derivative with the tokens fixed is the slope of the piece
the current rollout lies on, which is what a Newton step needs (it re-rolls after each step).

Models enter as a `RolloutModel`: a stable pure `logits_fn(params, tokens, valid, alpha)` of
every position's steered next-token logits, built by `gpt_rollout_model` or
`hf_rollout_model`. With positions="last" the token at position t is predicted with alpha * v
added at position t - 1 ONLY, as `models.gpt.steered_generate` steers; one teacher-forced pass
computes that for every position at once by carrying two residual streams from the steering
layer up: the unsteered one, and a steered one whose query at position s attends to the
unsteered keys and values of positions < s and to its own steered key and value at s
(causality: in the pass that steers s alone, nothing before s moves).

Cost: a rollout step runs the full forward on the whole [B, P + T] buffer (no key/value cache
yet), so a rollout is T forwards and a teacher-forced pass about three; the solvers count both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax.models import gpt as gpt_lib
from ufmjax.models.hf import model as hf_lib

STATS = ("mean", "p50", "p90", "p95", "max")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0}
POSITIONS = ("all", "last")
NEG = -1e30  # finite mask value: a query with no earlier key must not produce inf - inf


class RolloutModel(NamedTuple):
    """A steered model as the rollout functions see it.

    `logits_fn(params, tokens_BxN, valid_BxN, alpha) -> [B, N, V]` is every position's
    next-token logits with alpha * v added at the steering layer (at every real position, or
    with positions="last" at the predicting position only); it must be stable (module level or
    memoised), since the compiled rollout and teacher-forced passes are memoised on it.
    """

    logits_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    params: Any
    prompts_BxP: np.ndarray   # int32 token ids, left-padded
    valid_BxP: np.ndarray     # bool, False on padding
    context: int              # longest sequence the model accepts
    vocab: int


@dataclasses.dataclass(frozen=True)
class RolloutKL:
    """Per-token KL(p_alpha || p_0) along fixed continuations, its alpha-derivatives, summaries."""

    alpha: float
    kl_BxT: np.ndarray
    d_kl_BxT: np.ndarray | None      # d/dalpha with the tokens fixed (order 1)
    fisher_BxT: np.ndarray | None    # E_p[(d log p / d alpha)^2]; = d2 KL / d alpha2 at alpha = 0
    summary: dict                     # STATS -> value over all B * T tokens
    d_summary: dict | None            # STATS -> d/dalpha of that value


@dataclasses.dataclass(frozen=True)
class BudgetResult:
    """The alpha where stat(KL on rollouts) meets the budget, and what it cost to find it."""

    method: str
    alpha: float
    stat: str
    value: float                      # stat(KL) at alpha
    budget: float
    tol: float
    converged: bool                   # |value - budget| <= tol
    summary: dict                     # every STATS value at alpha
    rollouts: int                     # steered rollouts of T tokens
    evaluations: int                  # teacher-forced passes
    path: tuple                       # (alpha, stat value) of every evaluation, in order
    continuation_BxT: np.ndarray      # the rollout at alpha
    seconds: float

    def to_dict(self) -> dict:
        """JSON-ready fields (the continuation as nested lists)."""
        d = dataclasses.asdict(self)
        d["continuation_BxT"] = np.asarray(self.continuation_BxT).tolist()
        d["path"] = [list(p) for p in self.path]
        return d


# ---------------------------------------------------------------- checks

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite(x) -> bool:
    """A real finite scalar (python, numpy or a 0-d array), not a bool or a string."""
    if isinstance(x, (bool, np.bool_, str, bytes)):
        return False
    try:
        return np.ndim(x) == 0 and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _check_new_tokens(rm: RolloutModel, tokens) -> int:
    """T >= 1 new tokens, with the prompt plus the continuation inside the model's context."""
    if not _is_int(tokens) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    P = rm.prompts_BxP.shape[1]
    if P + tokens > rm.context:
        raise ValueError(f"tokens: prompt length {P} + tokens {tokens} exceeds the model's context {rm.context}")
    return int(tokens)


def _check_alpha(alpha, name: str = "alpha") -> float:
    if not _finite(alpha):
        raise ValueError(f"{name} must be a finite number, got {alpha!r}")
    return float(alpha)


def _check_budget_args(budget, stat, tol, sign):
    if not (_finite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    if not (_finite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    return float(budget), stat, float(tol), int(sign)


def _check_positions(positions):
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return positions


def _key(sample: bool, key):
    if not sample:
        return jax.random.key(0)  # drawn from but not used by a greedy rollout
    if key is None:
        raise ValueError("key: a sampled rollout needs a key (an int seed or a jax PRNG key)")
    if _is_int(key):
        return jax.random.key(int(key))
    return key


def _dtype(rm: RolloutModel):
    return rm.params["steer"].dtype


# ---------------------------------------------------------------- GPT adapter

def _gpt_two_streams(block, h_BxNxD, hs_BxNxD):
    """One GPT block on the unsteered stream and on the diagonal steered stream (see module doc)."""
    N = h_BxNxD.shape[1]
    h_next = block(h_BxNxD)
    _, k, v = block.qkv_heads(h_BxNxD)
    qs, ks, vs = block.qkv_heads(hs_BxNxD)
    scale = 1.0 / math.sqrt(qs.shape[-1])
    earlier_NxN = jnp.tril(jnp.ones((N, N), bool), -1)
    s_off_BxHxNxN = jnp.where(earlier_NxN, jnp.einsum("bqhe,bkhe->bhqk", qs, k) * scale, NEG)
    s_self_BxHxN = jnp.einsum("bqhe,bqhe->bhq", qs, ks) * scale
    m = jnp.maximum(s_off_BxHxNxN.max(axis=-1), s_self_BxHxN)
    w_off = jnp.exp(s_off_BxHxNxN - m[..., None])
    w_self = jnp.exp(s_self_BxHxN - m)
    att_BxNxHxE = jnp.einsum("bhqk,bkhe->bqhe", w_off, v) + jnp.moveaxis(w_self, 1, 2)[..., None] * vs
    att_BxNxHxE = att_BxNxHxE / jnp.moveaxis(w_off.sum(axis=-1) + w_self, 1, 2)[..., None]
    return h_next, block.finish(hs_BxNxD, att_BxNxHxE)


@functools.lru_cache(maxsize=64)
def _gpt_logits_fn(graphdef, layer: int, positions: str):
    def fn(params, tokens_BxN, valid_BxN, alpha):
        model = nnx.merge(graphdef, params["model"])
        h = model.prefix(tokens_BxN, layer)
        if positions == "all":
            return model.suffix(h + alpha * valid_BxN[..., None].astype(h.dtype) * params["steer"], layer)
        hs = h + alpha * params["steer"]
        for block in model.blocks[layer:]:
            h, hs = _gpt_two_streams(block, h, hs)
        return model.head(hs)

    fn.__qualname__ = f"gpt_rollout_logits[layer={layer},positions={positions}]"
    return fn


def gpt_rollout_model(model, prompts_BxP, v_D, layer: int, positions: str = "all",
                      dtype=jnp.float32) -> RolloutModel:
    """A GPT (`models.gpt`) steered at `layer` by alpha * v_D, with equal-length prompts [B, P]."""
    layer = gpt_lib.check_layer(model, layer)
    positions = _check_positions(positions)
    prompts_BxP = gpt_lib.check_prompts(model, prompts_BxP)
    gpt_lib.check_vector(model, v_D)
    v = jnp.asarray(np.asarray(v_D, np.float64), dtype)  # (check_vector rounds to float32)
    graphdef, state = nnx.split(gpt_lib.cast_model(model, dtype))
    return RolloutModel(_gpt_logits_fn(graphdef, layer, positions), {"model": state, "steer": v},
                        prompts_BxP, np.ones(prompts_BxP.shape, bool), model.config.context, model.config.vocab)


# ---------------------------------------------------------------- pretrained-decoder adapter

def _hf_two_streams(block, h_BxNxD, hs_BxNxD, mask_BxNxN, cos, sin):
    """One pretrained block on the unsteered stream and on the diagonal steered stream."""
    B, N = h_BxNxD.shape[:2]
    h_next = block(h_BxNxD, mask_BxNxN, cos, sin)
    _, k, v = block.qkv(h_BxNxD, cos, sin)
    qs, ks, vs = block.qkv(hs_BxNxD, cos, sin)
    earlier = mask_BxNxN & jnp.tril(jnp.ones((N, N), bool), -1)[None]
    s_off_BxKxGxNxN = jnp.where(earlier[:, None, None], block.scores(qs, k), NEG)
    # each position's query against its own key: N one-by-one score blocks (soft-cap included)
    s_self = block.scores(qs.reshape((B * N, 1) + qs.shape[2:]), ks.reshape((B * N, 1) + ks.shape[2:]))
    s_self_BxKxGxN = jnp.moveaxis(s_self.reshape((B, N) + s_self.shape[1:3]), 1, -1)
    m = jnp.maximum(s_off_BxKxGxNxN.max(axis=-1), s_self_BxKxGxN)
    w_off = jnp.exp(s_off_BxKxGxNxN - m[..., None])
    w_self_BxNxKxG = jnp.moveaxis(jnp.exp(s_self_BxKxGxN - m), -1, 1)
    att_BxNxKxGxE = jnp.einsum("bkgqs,bske->bqkge", w_off, v) + w_self_BxNxKxG[..., None] * vs[:, :, :, None, :]
    att_BxNxKxGxE = att_BxNxKxGxE / (jnp.moveaxis(w_off.sum(axis=-1), -1, 1) + w_self_BxNxKxG)[..., None]
    return h_next, block.finish(hs_BxNxD, att_BxNxKxGxE.reshape(B, N, -1))


@functools.lru_cache(maxsize=64)
def _hf_logits_fn(graphdef, layer: int, positions: str, dtype_name: str):
    dtype = jnp.dtype(dtype_name)

    def fn(params, tokens_BxN, valid_BxN, alpha):
        model = nnx.merge(graphdef, params["model"])
        pos_BxN = jnp.maximum(jnp.cumsum(valid_BxN, axis=1) - 1, 0).astype(jnp.int32)  # as pad_prompts
        h = model.prefix(tokens_BxN, valid_BxN, pos_BxN, layer, dtype)
        if positions == "all":
            h = h + alpha * valid_BxN[..., None].astype(h.dtype) * params["steer"]
            return model.suffix(h, valid_BxN, pos_BxN, layer)
        tables, masks = model.rope(pos_BxN, h.dtype), model.masks(valid_BxN)
        hs = h + alpha * params["steer"]
        for i, block in list(enumerate(model.blocks))[layer:]:
            cos, sin = tables[model.spec.rope_of_layer[i]] if tables else (None, None)
            h, hs = _hf_two_streams(block, h, hs, masks[block.window], cos, sin)
        return model.head(hs)

    fn.__qualname__ = f"hf_rollout_logits[layer={layer},positions={positions},dtype={dtype_name}]"
    return fn


def hf_rollout_model(decoder, prompts, v_D, layer: int, positions: str = "all",
                     dtype=jnp.float32) -> RolloutModel:
    """A pretrained `models.hf.Decoder` steered at `layer`; prompts of any lengths (left-padded)."""
    layer = hf_lib.check_layer(decoder, layer)
    positions = _check_positions(positions)
    tokens_BxP, valid_BxP, _ = hf_lib.pad_prompts(prompts)
    hf_lib.check_tokens(decoder, tokens_BxP)
    v = jnp.asarray(hf_lib.check_vector(decoder, v_D), dtype)
    graphdef, state = nnx.split(decoder)
    return RolloutModel(_hf_logits_fn(graphdef, layer, positions, jnp.dtype(dtype).name),
                        {"model": state, "steer": v}, tokens_BxP, valid_BxP, decoder.spec.context,
                        decoder.spec.vocab)


# ---------------------------------------------------------------- rollouts and teacher forcing

@functools.lru_cache(maxsize=64)
def _rollout_jit(logits_fn, new: int):
    def fn(params, prompts_BxP, valid_BxP, alpha, sample, key):
        B, P = prompts_BxP.shape
        tokens_BxN = jnp.concatenate([prompts_BxP, jnp.zeros((B, new), jnp.int32)], axis=1)
        # the unfilled slots are marked real: causality keeps them out of every logit read
        valid_BxN = jnp.concatenate([valid_BxP, jnp.ones((B, new), bool)], axis=1)

        def body(i, tokens_BxN):
            t = P + i  # position to fill, predicted from t - 1
            y_BxNxV = logits_fn(params, tokens_BxN, valid_BxN, alpha)
            y_BxV = jax.lax.dynamic_index_in_dim(y_BxNxV, t - 1, axis=1, keepdims=False)
            # greedy and sampled share one program (`sample` is traced): the draw is cheap
            drawn = jax.random.categorical(jax.random.fold_in(key, i), y_BxV)
            greedy = jnp.argmax(y_BxV, axis=-1)  # first maximum: ties go to the lowest id
            return tokens_BxN.at[:, t].set(jnp.where(sample, drawn, greedy).astype(jnp.int32))

        return jax.lax.fori_loop(0, new, body, tokens_BxN)[:, P:]

    return jax.jit(fn)


def rollout(rm: RolloutModel, alpha, tokens: int, sample: bool = False, key=None) -> np.ndarray:
    """Steered continuations of `tokens` tokens after each prompt, int32 [B, T].

    Greedy (argmax, ties by lowest id) unless `sample`; sampled rollouts draw with `key` (an int
    seed or a PRNG key), the same key at every alpha (common random numbers).
    """
    alpha = _check_alpha(alpha)
    T = _check_new_tokens(rm, tokens)
    fn = _rollout_jit(rm.logits_fn, T)
    out = fn(rm.params, jnp.asarray(rm.prompts_BxP), jnp.asarray(rm.valid_BxP),
             jnp.asarray(alpha, _dtype(rm)), jnp.asarray(bool(sample)), _key(sample, key))
    return np.asarray(out)


@functools.lru_cache(maxsize=64)
def _teacher_forced_jit(logits_fn, P: int, order: int):
    def fn(params, tokens_BxN, valid_BxN, alpha):
        def logp_BxTxV(a):
            y = logits_fn(params, tokens_BxN, valid_BxN, a)[:, P - 1:-1]  # positions predicting the T tokens
            return jax.nn.log_softmax(y, axis=-1)

        logp0 = logp_BxTxV(jnp.zeros_like(alpha))
        if order == 0:
            lp = logp_BxTxV(alpha)
            return (jnp.sum(jnp.exp(lp) * (lp - logp0), axis=-1),)
        # One jvp of the log-probabilities gives all three: with s = d log p / d alpha,
        # d KL = E_p[s (log p - log p0)] (E_p[s] = 0), and the Fisher information E_p[s^2],
        # which at alpha = 0 is d2 KL / d alpha2 (no second-order pass needed for it).
        lp, s = jax.jvp(logp_BxTxV, (alpha,), (jnp.ones_like(alpha),))
        p, diff = jnp.exp(lp), lp - logp0
        return jnp.sum(p * diff, axis=-1), jnp.sum(p * s * diff, axis=-1), jnp.sum(p * s * s, axis=-1)

    return jax.jit(fn)


def _check_continuation(rm: RolloutModel, continuation) -> np.ndarray:
    c = np.asarray(continuation)
    B = rm.prompts_BxP.shape[0]
    if c.ndim != 2 or c.shape[0] != B or c.shape[1] == 0:
        raise ValueError(f"continuation must be a [{B}, T >= 1] array of token ids, got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"continuation must hold integer token ids, got dtype {c.dtype}")
    if c.min() < 0 or c.max() >= rm.vocab:
        raise ValueError(f"continuation holds token ids outside [0, {rm.vocab})")
    if rm.prompts_BxP.shape[1] + c.shape[1] > rm.context:
        raise ValueError(f"continuation: prompt length {rm.prompts_BxP.shape[1]} + {c.shape[1]} tokens exceeds "
                         f"the model's context {rm.context}")
    return c.astype(np.int32)


def summarize_kl(kl_BxT, d_kl_BxT=None):
    """(summary, d_summary): mean, p50, p90, p95, max over all tokens and their alpha-derivatives.

    A percentile is numpy's linear interpolation between two order statistics, so its
    derivative is the same interpolation of their derivatives (valid away from ties); the max's
    derivative is that of the largest element.
    """
    x = np.asarray(kl_BxT, np.float64).ravel()
    order = np.argsort(x, kind="stable")
    n = x.size
    picks = {"max": (order[-1], order[-1], 0.0)}
    for name, q in PERCENTILES.items():
        r = q / 100.0 * (n - 1)
        lo = int(math.floor(r))
        picks[name] = (order[lo], order[min(lo + 1, n - 1)], r - lo)

    def stats(y):
        out = {"mean": float(y.mean())}
        for name, (i, j, f) in picks.items():
            out[name] = float(y[i] + f * (y[j] - y[i]))
        return {s: out[s] for s in STATS}

    return stats(x), (None if d_kl_BxT is None else stats(np.asarray(d_kl_BxT, np.float64).ravel()))


def rollout_kl(rm: RolloutModel, alpha, continuation_BxT, order: int = 1) -> RolloutKL:
    """Teacher-forced KL(p_alpha || p_0) at each continuation token, [B, T], with tokens fixed.

    The token at continuation index t is predicted from sequence position P - 1 + t (P the
    padded prompt length); order 1 adds d/dalpha by forward mode through that one pass, and
    the Fisher information of alpha (at alpha = 0 the curvature of KL, so KL ~ alpha^2 F / 2).
    """
    alpha = _check_alpha(alpha)
    c = _check_continuation(rm, continuation_BxT)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order!r}")
    B, T = c.shape
    P = rm.prompts_BxP.shape[1]
    tokens_BxN = jnp.asarray(np.concatenate([rm.prompts_BxP, c], axis=1))
    valid_BxN = jnp.asarray(np.concatenate([rm.valid_BxP, np.ones((B, T), bool)], axis=1))
    out = _teacher_forced_jit(rm.logits_fn, P, order)(rm.params, tokens_BxN, valid_BxN,
                                                       jnp.asarray(alpha, _dtype(rm)))
    out = [np.asarray(o, np.float64) for o in out]
    kl = out[0]
    d, fisher = (out[1], out[2]) if order == 1 else (None, None)
    summary, d_summary = summarize_kl(kl, d)
    return RolloutKL(alpha, kl, d, fisher, summary, d_summary)


# ---------------------------------------------------------------- the budget, two ways

class _Counter:
    """Rollouts, teacher-forced passes and the (alpha, value) path of one solve."""

    def __init__(self, rm, tokens, stat, sample, key):
        self.rm, self.tokens, self.stat, self.sample, self.key = rm, tokens, stat, sample, key
        self.rollouts = self.evaluations = 0
        self.path = []
        self.best = None  # (|value - budget|, alpha, RolloutKL, continuation)

    def __call__(self, alpha, order, budget):
        c = rollout(self.rm, alpha, self.tokens, self.sample, self.key)
        r = rollout_kl(self.rm, alpha, c, order)
        self.rollouts += 1
        self.evaluations += 1
        value = r.summary[self.stat]
        self.path.append((float(alpha), value))
        if self.best is None or abs(value - budget) < self.best[0]:
            self.best = (abs(value - budget), float(alpha), r, c)
        return r

    def result(self, method, budget, tol, t0) -> BudgetResult:
        _, alpha, r, c = self.best
        value = r.summary[self.stat]
        return BudgetResult(method, alpha, self.stat, value, budget, tol, abs(value - budget) <= tol,
                            dict(r.summary), self.rollouts, self.evaluations, tuple(self.path), c,
                            time.perf_counter() - t0)


def budget_newton(rm: RolloutModel, budget, tokens: int, stat: str = "p95", tol: float = 0.05, sign: int = 1,
                  alpha0=None, max_iter: int = 30, sample: bool = False, key=None) -> BudgetResult:
    """alpha (of sign `sign`) where stat(KL on rollouts) = budget, by Newton on the tokens-fixed slope.

    Each step rolls out at the current alpha, teacher-forces (KL and its derivative in one
    pass) and takes a Newton step on stat - budget. A bracket safeguards it: the largest |alpha|
    known under budget and the smallest known over; a step that leaves the bracket, or a slope
    that is not positive, bisects it (or doubles |alpha| while nothing is over budget yet).
    Without `alpha0`, the start is where the quadratic growth of KL at alpha = 0 meets the
    budget: stat(KL) ~ alpha^2 stat(F / 2), F the Fisher information of alpha on the unsteered
    rollout (d2 KL / d alpha2 at 0; one rollout and one pass, counted). Sampled rollouts use
    the same key at every alpha (common random numbers), so F(alpha) stays one function.

    Args:
      rm: the steered model and its prompts; budget: the target of stat(KL) (nats, > 0);
      tokens: T, the rollout length; stat: one of STATS; tol: stop once |stat - budget| <= tol;
      sign: +1 or -1, the sign of the alpha sought; alpha0: a start (of that sign);
      max_iter: most Newton evaluations after the start; sample, key: as for `rollout`.
    Returns:
      BudgetResult; if no evaluation came within tol, the closest one with converged=False.
    """
    budget, stat, tol, sign = _check_budget_args(budget, stat, tol, sign)
    _check_new_tokens(rm, tokens)
    if not (_is_int(max_iter) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    t0 = time.perf_counter()
    ev = _Counter(rm, tokens, stat, sample, key)
    if alpha0 is None:
        curv = ev(0.0, 1, budget)
        half_curv = summarize_kl(0.5 * curv.fisher_BxT)[0][stat]  # a stat of t^2 x is t^2 stat(x)
        t = math.sqrt(budget / half_curv) if half_curv > 0 else 1.0
    else:
        t = sign * _check_alpha(alpha0, "alpha0")
        if t <= 0:
            raise ValueError(f"alpha0 must be nonzero and of the sign {sign:+d}, got {alpha0!r}")
    lo, hi = 0.0, math.inf
    for _ in range(max_iter):
        r = ev(sign * t, 1, budget)
        g, slope = r.summary[stat] - budget, sign * r.d_summary[stat]
        if abs(g) <= tol:
            break
        if g < 0:
            lo = t
        else:
            hi = t
        step = t - g / slope if slope > 0 and math.isfinite(slope) else math.nan
        if math.isinf(hi):
            t = min(step, 4.0 * t) if step > t else 2.0 * t
        elif lo < step < hi:
            t = step
        else:
            t = 0.5 * (lo + hi)
        if math.isfinite(hi) and hi - lo <= 1e-9 * max(hi, 1.0):  # the budget falls in a jump of F
            break
    return ev.result("newton", budget, tol, t0)


def budget_regula_falsi(rm: RolloutModel, budget, tokens: int, stat: str = "p95", tol: float = 0.05,
                        sign: int = 1, alpha_init: float = 1.0, max_iter: int = 60, sample: bool = False,
                        key=None) -> BudgetResult:
    """The derivative-free baseline: values only, one rollout per evaluation.

    stat(KL) at alpha = 0 is 0 (no rollout needed); |alpha| doubles from `alpha_init` until
    the stat exceeds the budget, then Illinois regula falsi (the retained end's residual is
    halved when one end is kept twice) until |stat - budget| <= tol. Arguments as for
    `budget_newton`; `alpha_init` is the first |alpha| tried, `max_iter` the most evaluations.
    """
    budget, stat, tol, sign = _check_budget_args(budget, stat, tol, sign)
    _check_new_tokens(rm, tokens)
    if not (_finite(alpha_init) and alpha_init > 0):
        raise ValueError(f"alpha_init must be a finite number > 0, got {alpha_init!r}")
    if not (_is_int(max_iter) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    t0 = time.perf_counter()
    ev = _Counter(rm, tokens, stat, sample, key)
    lo, g_lo = 0.0, -budget
    t, hi, g_hi = float(alpha_init), None, None
    while ev.evaluations < max_iter:  # bracket
        g = ev(sign * t, 0, budget).summary[stat] - budget
        if abs(g) <= tol:
            return ev.result("regula_falsi", budget, tol, t0)
        if g > 0:
            hi, g_hi = t, g
            break
        lo, g_lo, t = t, g, 2.0 * t
    kept = 0  # +1: the upper end was kept last time, -1: the lower
    while hi is not None and ev.evaluations < max_iter:
        t = lo - g_lo * (hi - lo) / (g_hi - g_lo)
        g = ev(sign * t, 0, budget).summary[stat] - budget
        if abs(g) <= tol:
            break
        if g < 0:
            lo, g_lo = t, g
            if kept == 1:
                g_hi *= 0.5
            kept = 1
        else:
            hi, g_hi = t, g
            if kept == -1:
                g_lo *= 0.5
            kept = -1
        if hi - lo <= 1e-9 * max(hi, 1.0):  # the budget falls in a jump of F
            break
    return ev.result("regula_falsi", budget, tol, t0)


def compare_budget(rm: RolloutModel, budget, tokens: int, stat: str = "p95", tol: float = 0.05, sign: int = 1,
                   alpha0=None, alpha_init: float = 1.0, max_iter: int = 60, sample: bool = False,
                   key=None) -> dict:
    """Both solvers on one budget, for a report.

    Returns:
      dict with budget, stat, tol, tokens; "newton" and "regula_falsi" rows (alpha, value,
      rollouts, evaluations, converged, seconds); "agree" (both converged and their stats
      within tol of each other); "alpha_gap"; "results" (the two BudgetResults).
    """
    newton = budget_newton(rm, budget, tokens, stat, tol, sign, alpha0, max_iter, sample, key)
    rf = budget_regula_falsi(rm, budget, tokens, stat, tol, sign, alpha_init, max_iter, sample, key)
    row = lambda r: {"alpha": r.alpha, "value": r.value, "rollouts": r.rollouts, "evaluations": r.evaluations,
                     "converged": r.converged, "seconds": r.seconds}
    return {"budget": float(budget), "stat": stat, "tol": float(tol), "tokens": int(tokens),
            "newton": row(newton), "regula_falsi": row(rf),
            "agree": bool(newton.converged and rf.converged and abs(newton.value - rf.value) <= tol),
            "alpha_gap": abs(newton.alpha - rf.alpha), "results": {"newton": newton, "regula_falsi": rf}}
