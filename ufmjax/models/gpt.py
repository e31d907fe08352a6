"""A small decoder-only GPT (Taimeskhanov et al. 2026, Sec. 4; docs/theory.md, Sec. 6), cut at any layer.

Shape legend: B = prompts (batch), T = positions, D = residual width, H = heads,
E = head width (D / H), F = MLP width, V = vocabulary, A = alphas, S = cached positions
(T - 1), M = rows handed to the sweep kernel.

Pre-norm blocks, as in Sec. 4: `h_res = h + ATTN(LN(h))`, `h_next = h_res + FFN(LN(h_res))`,
logits `y = LN(h_L) W^T`. The residual stream has L + 1 cut points: layer l in [0, L] is the
input of block l (l = 0: the embedding output; l = L: the final residual, right before the
final norm). Steering adds `alpha * v` there [Eq. 1]:

    prefix(tokens, l)  = embedding and blocks < l         (never depends on alpha)
    suffix(h, l)       = blocks >= l, final norm, unembedding

so a sweep computes the prefix once per prompt and pushes only the suffix through the alpha
grid. With last-position steering, causality makes every position but the last one
alpha-independent in every block, so the suffix runs on ONE position per prompt, attending to
keys and values cached from the unsteered pass (`steered_closure(..., positions="last")`).

Modules hold parameters; the steering closures are pure functions of (state, alpha), memoised
on (graphdef, layer, positions, rows) so the sweep kernel compiles once per model shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax.common import cast_floats
from ufmjax.steering import (
    Steered,
    add_terms,
    Unembedding,
    check_terms,
    head_logits,
    layer_groups,
    mask_rowwise,
    register_head,
    register_rowwise,
    residual_rowwise,
)

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("all", "last")


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only GPT. `context` is the length of the learned position table."""

    vocab: int = 9
    context: int = 5
    layers: int = 1
    width: int = 32
    heads: int = 2
    mlp_ratio: int = 4
    tied: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    init_scale: float = 0.02

    def __post_init__(self):
        for name in ("vocab", "context", "width", "heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.layers, int) or isinstance(self.layers, bool) or self.layers < 0:
            raise ValueError(f"layers must be a non-negative integer, got {self.layers!r}")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.tied, bool):  # a ValueError: the CLI reports it as a usage error
            raise ValueError(f"tied must be a bool, got {self.tied!r}")  # noqa: TRY004
        if not (self.norm_eps > 0 and self.init_scale > 0):
            raise ValueError("norm_eps and init_scale must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return cls(**d)

    @property
    def head_width(self) -> int:
        return self.width // self.heads


# ---------------------------------------------------------------- modules

def normalize(x_xD, scale_D, bias_D, kind: str, eps: float):
    """LayerNorm or RMSNorm over the last axis, two-pass (exact at |alpha v| ~ 1e6).

    A one-pass variance E[x^2] - E[x]^2 cancels catastrophically when alpha is large, which is
    exactly where Prop. 4.1 is checked; the centred two-pass form does not.
    """
    if kind == "layernorm":
        x_xD = x_xD - jnp.mean(x_xD, axis=-1, keepdims=True)
    y = x_xD * jax.lax.rsqrt(jnp.mean(jnp.square(x_xD), axis=-1, keepdims=True) + eps) * scale_D
    return y if bias_D is None else y + bias_D


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only)."""

    def __init__(self, width: int, kind: str, eps: float):
        self.kind, self.eps = kind, eps
        self.scale = nnx.Param(jnp.ones((width,)))
        self.bias = nnx.Param(jnp.zeros((width,))) if kind == "layernorm" else None

    def __call__(self, x_xD):
        return normalize(x_xD, self.scale[...], None if self.bias is None else self.bias[...],
                         self.kind, self.eps)


def attend(q_BxQxHxE, k_BxKxHxE, v_BxKxHxE, mask_QxK=None):
    """Softmax attention of Q queries over K keys (mask: True where a key is visible)."""
    scores = jnp.einsum("bqhe,bkhe->bhqk", q_BxQxHxE, k_BxKxHxE) / math.sqrt(q_BxQxHxE.shape[-1])
    if mask_QxK is not None:
        scores = jnp.where(mask_QxK, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhe->bqhe", weights, v_BxKxHxE)


class Block(nnx.Module):
    """Pre-norm decoder block: h + ATTN(LN(h)), then + FFN(LN(.)) (Sec. 4)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        D, F = cfg.width, cfg.mlp_ratio * cfg.width
        init = nnx.initializers.normal(cfg.init_scale)
        # GPT-2's residual-projection scaling keeps the residual stream O(1) with depth.
        out_init = nnx.initializers.normal(cfg.init_scale / math.sqrt(2 * max(cfg.layers, 1)))
        self.heads = cfg.heads
        self.ln1 = Norm(D, cfg.norm, cfg.norm_eps)
        self.qkv = nnx.Linear(D, 3 * D, kernel_init=init, rngs=rngs)
        self.proj = nnx.Linear(D, D, kernel_init=out_init, rngs=rngs)
        self.ln2 = Norm(D, cfg.norm, cfg.norm_eps)
        self.fc = nnx.Linear(D, F, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(F, D, kernel_init=out_init, rngs=rngs)

    def qkv_heads(self, h_xD):
        """Queries, keys and values of LN(h), split into heads: each [..., H, E]."""
        qkv = self.qkv(self.ln1(h_xD))
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = q.shape[:-1] + (self.heads, q.shape[-1] // self.heads)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def mlp(self, h_xD):
        return self.out(jax.nn.gelu(self.fc(self.ln2(h_xD))))

    def finish(self, h_xD, att_xHxE):
        """Residual updates once attention is done: h_res = h + proj(att); h_res + FFN."""
        h_res = h_xD + self.proj(att_xHxE.reshape(att_xHxE.shape[:-2] + (-1,)))
        return h_res + self.mlp(h_res)

    def __call__(self, h_BxTxD):
        q, k, v = self.qkv_heads(h_BxTxD)
        T = h_BxTxD.shape[1]
        causal_TxT = jnp.tril(jnp.ones((T, T), bool))
        return self.finish(h_BxTxD, attend(q, k, v, causal_TxT))

    def last(self, h_BxTxD):
        """The block's output at the LAST position only (all positions feed its attention)."""
        q, k, v = self.qkv_heads(h_BxTxD)
        return self.finish(h_BxTxD[:, -1], attend(q[:, -1:], k, v)[:, 0])

    def step(self, x_BxD, k_cache_BxSxHxE, v_cache_BxSxHxE):
        """The block on ONE new (last) position, attending to S cached earlier positions.

        The cached keys and values are scored directly, never concatenated with the new one:
        under vmap over alpha a concatenation copies the whole alpha-independent cache once
        per alpha (measured: 62% of a small model's last-position sweep). The softmax over
        cache plus new key is taken with one shared maximum, so it equals `attend` exactly.
        """
        q, k, v = self.qkv_heads(x_BxD)
        scale = 1.0 / math.sqrt(q.shape[-1])
        s_cache_BxHxS = jnp.einsum("bhe,bshe->bhs", q, k_cache_BxSxHxE) * scale
        s_new_BxH = jnp.einsum("bhe,bhe->bh", q, k) * scale
        m_BxH = jnp.maximum(s_cache_BxHxS.max(axis=-1), s_new_BxH)
        w_cache_BxHxS = jnp.exp(s_cache_BxHxS - m_BxH[..., None])
        w_new_BxH = jnp.exp(s_new_BxH - m_BxH)
        att_BxHxE = jnp.einsum("bhs,bshe->bhe", w_cache_BxHxS, v_cache_BxSxHxE) + w_new_BxH[..., None] * v
        return self.finish(x_BxD, att_BxHxE / (w_cache_BxHxS.sum(axis=-1) + w_new_BxH)[..., None])


class GPT(nnx.Module):
    """Decoder-only GPT with learned positions and an optionally tied unembedding."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(config.init_scale)
        self.embed = nnx.Embed(config.vocab, config.width, embedding_init=nnx.initializers.normal(1.0),
                               rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (config.context, config.width)))
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.layers)])
        self.ln_f = Norm(config.width, config.norm, config.norm_eps)
        self.unembed = None if config.tied else nnx.Linear(config.width, config.vocab, use_bias=False,
                                                           kernel_init=init, rngs=rngs)

    # --- the two halves of a forward pass cut at layer l

    def embed_tokens(self, tokens_BxT):
        """Residual stream at layer 0: token plus position embedding."""
        T = tokens_BxT.shape[-1]
        return self.embed(tokens_BxT) + self.pos[...][:T]

    def prefix(self, tokens_BxT, layer: int):
        """Residual stream h^(l) at layer l: embedding, then blocks 0..l-1."""
        h = self.embed_tokens(tokens_BxT)
        for block in self.blocks[:layer]:
            h = block(h)
        return h

    def suffix(self, h_BxTxD, layer: int):
        """Logits from the residual at layer l: blocks l..L-1, final norm, unembedding."""
        for block in self.blocks[layer:]:
            h_BxTxD = block(h_BxTxD)
        return self.head(h_BxTxD)

    def unembedding(self):
        """W [V, D], so that logits = LN(h) W^T."""
        return self.embed.embedding[...] if self.config.tied else self.unembed.kernel[...].T

    def unembedding_as_stored(self) -> Unembedding:
        """W where it lies: the tied embedding [V, D], or the Dense kernel [D, V] (no copy)."""
        if self.config.tied:
            return Unembedding(self.embed.embedding[...], vocab_axis=0)
        return Unembedding(self.unembed.kernel[...], vocab_axis=1)

    def head(self, h_xD):
        """y = LN(h_L) W^T (Sec. 4)."""
        return head_logits(self.unembedding_as_stored(), self.ln_f(h_xD))

    def __call__(self, tokens_BxT, layer: int | None = None, add_BxTxD=None):
        """Logits [B, T, V]; optionally add `add_BxTxD` to the residual stream at `layer`."""
        if layer is None:
            return self.suffix(self.embed_tokens(tokens_BxT), 0)
        h = self.prefix(tokens_BxT, layer)
        return self.suffix(h if add_BxTxD is None else h + add_BxTxD, layer)

    def kv_cache(self, h_BxTxD, layer: int):
        """Keys and values of every block >= l on the UNSTEERED residual, positions 0..T-2.

        With last-position steering these are exactly the keys and values the steered pass
        sees at those positions (causality), so they are computed once per prompt.
        """
        ks, vs = [], []
        for block in self.blocks[layer:]:
            _, k, v = block.qkv_heads(h_BxTxD)
            ks.append(k[:, :-1])
            vs.append(v[:, :-1])
            h_BxTxD = block(h_BxTxD)
        return tuple(ks), tuple(vs)


@functools.lru_cache(maxsize=32)
def _init_fn(config: GPTConfig):
    return nnx.jit(lambda key: GPT(config, rngs=nnx.Rngs(key)))


def init_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A freshly initialised GPT, built by ONE compiled program (eagerly, every initializer of
    a new shape would compile on its own: seconds on a small CPU)."""
    return _init_fn(config)(jax.random.key(seed))


def next_token_loss(model: GPT, batch):
    """Mean next-token cross-entropy; batch = (tokens [B, T], weight [B, T-1] of each target)."""
    tokens_BxT, weight_BxS = batch
    logits = model(tokens_BxT[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll_BxS = -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll_BxS * weight_BxS) / jnp.sum(weight_BxS)


# ---------------------------------------------------------------- checks

def check_layer(model: GPT, layer) -> int:
    L = model.config.layers
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer <= L:
        raise ValueError(f"layer must be an integer in [0, {L}] (0: embedding output, {L}: final residual), "
                         f"got {layer!r}")
    return int(layer)


def check_prompts(model: GPT, prompts, name: str = "prompts") -> np.ndarray:
    """Token ids [B, T] with 1 <= T <= context and ids in [0, V); refuses an empty set."""
    arr = np.asarray(prompts)
    if arr.ndim == 1 and arr.size:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [prompts, positions] array of token ids, "
                         f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    cfg = model.config
    if arr.shape[1] > cfg.context:
        raise ValueError(f"{name} have {arr.shape[1]} positions, more than the model's context {cfg.context}")
    if arr.min() < 0 or arr.max() >= cfg.vocab:
        raise ValueError(f"{name} hold token ids outside [0, {cfg.vocab})")
    return arr.astype(np.int32)


def check_vector(model: GPT, v_D) -> jax.Array:
    D = model.config.width
    v = np.asarray(v_D)
    if v.shape != (D,):
        raise ValueError(f"steering vector must have width {D}, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("steering vector must be finite")
    return jnp.asarray(v, jnp.float32)


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return positions


# ---------------------------------------------------------------- pure, memoised computations

# One-off passes (prefixes, caches) run eagerly: they are a few large array ops, run once
# per sweep, and on CPU compiling them would cost more than running them.

def cast_model(model: GPT, dtype) -> GPT:
    """A copy of the model with float parameters in `dtype` (float64 sweeps need float64
    prefixes, not float32 ones cast afterwards)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, cast_floats(state, dtype))


@functools.lru_cache(maxsize=64)
def _logits_fn(graphdef):
    return jax.jit(lambda state, tokens_BxT: nnx.merge(graphdef, state)(tokens_BxT))


def logits(model: GPT, tokens_BxT, batch: int = 256) -> np.ndarray:
    """Unsteered logits [B, T, V], in batches (jitted: evaluation calls it every few steps)."""
    tokens = jnp.asarray(check_prompts(model, tokens_BxT, "tokens"))
    graphdef, state = nnx.split(model)
    fn = _logits_fn(graphdef)
    return np.concatenate([np.asarray(fn(state, tokens[i:i + batch])) for i in range(0, len(tokens), batch)])


def residual(model: GPT, prompts_BxT, layer: int) -> np.ndarray:
    """The residual stream h^(l) [B, T, D] of each prompt (the prefix)."""
    layer = check_layer(model, layer)
    return np.asarray(model.prefix(jnp.asarray(check_prompts(model, prompts_BxT)), layer))


def mean_residual(model: GPT, prompts_BxT, layer: int) -> np.ndarray:
    """Token-averaged residual stream at layer l, one row per prompt [B, D] (Sec. 4)."""
    return residual(model, prompts_BxT, layer).mean(axis=1)


def steering_vector(model: GPT, P_prompts, N_prompts, layer: int) -> np.ndarray:
    """Eq. 3 on the GPT: mean over P prompts minus mean over N prompts of the token-averaged
    residual stream at layer l (Sec. 4)."""
    P = check_prompts(model, P_prompts, "P prompts")
    N = check_prompts(model, N_prompts, "N prompts")
    return mean_residual(model, P, layer).mean(axis=0) - mean_residual(model, N, layer).mean(axis=0)


@functools.lru_cache(maxsize=64)
def _steered_fn(graphdef, layer: int, positions: str, rows: str):
    """`fn(params, alpha) -> logits [M, V]` for one model shape, cut point and mode, declared
    with its head (`steering.register_head`): fn = LN(h_L(alpha)) W^T."""

    if positions == "all":
        def hidden(params, alpha):
            model = nnx.merge(graphdef, params["model"])
            h = params["h"] + alpha * params["steer"]  # Eq. 1 at every position
            blocks = model.blocks[layer:]
            if rows == "all":
                for block in blocks:
                    h = block(h)
                return model.ln_f(h.reshape(-1, h.shape[-1]))
            # Only the last position's logits are read: the last block's MLP and the
            # unembedding run on that position alone (its attention still sees them all).
            for block in blocks[:-1]:
                h = block(h)
            return model.ln_f(blocks[-1].last(h) if len(blocks) else h[:, -1])
    else:
        def hidden(params, alpha):
            model = nnx.merge(graphdef, params["model"])
            x = params["x"] + alpha * params["steer"]  # Eq. 1 at the last position only
            for block, k, v in zip(model.blocks[layer:], params["k"], params["v"]):
                x = block.step(x, k, v)
            return model.ln_f(x)

    def unembedding(params):
        return nnx.merge(graphdef, params["model"]).unembedding_as_stored()

    def fn(params, alpha):
        return head_logits(unembedding(params), hidden(params, alpha))

    fn.__qualname__ = f"gpt_steered[layer={layer},positions={positions},rows={rows}]"
    register_head(fn, hidden, unembedding)
    if rows == "last":  # one row per prompt: a per-row alpha is a per-prompt alpha
        register_rowwise(fn, residual_rowwise(fn))
    return fn


def steered_closure(model: GPT, prompts_BxT, v_D, layer: int, positions: str = "all",
                    rows: str = "last", dtype=jnp.float32) -> Steered:
    """The GPT as the sweep kernel sees it: alpha -> steered logits.

    Args:
      model: a GPT.
      prompts_BxT: prompts of equal length (token ids).
      v_D: the steering vector, added at layer `layer` as alpha * v.
      layer: cut point in [0, L].
      positions: "all" (steer every position, Sec. 4 default) or "last".
      rows: "last" (one row per prompt: its next-token logits, M = B) or "all" (one row per
        (prompt, position), M = B * T, for cross-entropy on text; needs positions="all").
      dtype: precision of the cached prefix and parameters (match the sweep's dtype).
    Returns:
      Steered(fn, params) with the prefix (positions="all") or the prefix plus the key/value
      cache of every later block (positions="last") precomputed in params.
    """
    layer = check_layer(model, layer)
    positions = check_positions(positions)
    if rows not in ("last", "all"):
        raise ValueError(f"rows must be 'last' or 'all', got {rows!r}")
    if rows == "all" and positions != "all":
        raise ValueError("rows='all' (every position's prediction) needs positions='all'")
    prompts = jnp.asarray(check_prompts(model, prompts_BxT))
    v = jnp.asarray(check_vector(model, v_D), dtype)
    model = cast_model(model, dtype)
    h = model.prefix(prompts, layer)
    if positions == "all":
        cache = {"h": h}
    else:
        ks, vs = model.kv_cache(h, layer)
        cache = {"x": h[:, -1], "k": ks, "v": vs}
    graphdef, state = nnx.split(model)
    return Steered(_steered_fn(graphdef, layer, positions, rows), dict(cache, model=state, steer=v))


# ---------------------------------------------------------------- references and limits

def steered_logits_full(model: GPT, prompts_BxT, v_D, layer: int, alphas_A, positions: str = "all"):
    """Reference: the FULL forward pass with alpha as a batch dimension, [A, B, T, V].

    This is how the paper's released code sweeps (a hook adding alpha * v, prompts tiled over
    the grid); the prefix-cached closure must agree with it.
    """
    layer = check_layer(model, layer)
    positions = check_positions(positions)
    prompts = jnp.asarray(check_prompts(model, prompts_BxT))
    v = check_vector(model, v_D)
    alphas = jnp.asarray(alphas_A, v.dtype).reshape(-1)
    A, (B, T) = alphas.shape[0], prompts.shape
    mask_T = jnp.ones((T,), v.dtype) if positions == "all" else jnp.zeros((T,), v.dtype).at[-1].set(1)
    add_AxBxTxD = jnp.broadcast_to(alphas[:, None, None, None] * mask_T[None, None, :, None] * v,
                                   (A, B, T, v.shape[0]))

    out = model(jnp.tile(prompts, (A, 1)), layer, add_AxBxTxD.reshape(A * B, T, -1))
    return out.reshape(A, B, T, -1)


def limit_logits(model: GPT, v_D) -> np.ndarray:
    """Prop. 4.1: the limits LN(+v) W^T and LN(-v) W^T of the steered logits, [2, V]."""
    v = check_vector(model, v_D)
    return np.asarray(model.head(jnp.stack([v, -v])))


@functools.lru_cache(maxsize=64)
def _generate_fn(graphdef, layer: int, positions: str, prompt_len: int, new_tokens: int):
    T = prompt_len + new_tokens

    def one_alpha(state, prompts_BxP, v_D, alpha, key):
        model = nnx.merge(graphdef, state)
        B = prompts_BxP.shape[0]
        buf = jnp.zeros((B, T), jnp.int32).at[:, :prompt_len].set(prompts_BxP)

        def body(i, carry):
            buf, key = carry
            t = prompt_len + i  # position to fill, predicted from position t - 1
            if positions == "all":
                mask_T = jnp.ones((T,), v_D.dtype)
            else:
                mask_T = (jnp.arange(T) == t - 1).astype(v_D.dtype)
            # Causality: the unfilled positions >= t cannot influence the logits at t - 1.
            y = model(buf, layer, alpha * mask_T[None, :, None] * v_D)
            y_BxV = jax.lax.dynamic_index_in_dim(y, t - 1, axis=1, keepdims=False)
            key, sub = jax.random.split(key)
            return buf.at[:, t].set(jax.random.categorical(sub, y_BxV).astype(jnp.int32)), key

        buf, _ = jax.lax.fori_loop(0, new_tokens, body, (buf, key))
        return buf[:, prompt_len:]

    # Same key at every alpha: common random numbers across the grid.
    return jax.jit(jax.vmap(one_alpha, in_axes=(None, None, None, 0, None)))


def steered_generate(model: GPT, prompts_BxT, v_D, layer: int, alphas_A, new_tokens: int, key,
                     positions: str = "all") -> np.ndarray:
    """Sample `new_tokens` tokens after each prompt with alpha * v added at layer l, [A, B, new].

    positions="all" steers every position (prompt and generated); "last" steers only the
    position each new token is predicted from.
    """
    layer = check_layer(model, layer)
    positions = check_positions(positions)
    prompts = check_prompts(model, prompts_BxT)
    v = check_vector(model, v_D)
    if not isinstance(new_tokens, (int, np.integer)) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive integer, got {new_tokens!r}")
    if prompts.shape[1] + new_tokens > model.config.context:
        raise ValueError(f"prompt length {prompts.shape[1]} + new_tokens {new_tokens} exceeds the "
                         f"model's context {model.config.context}")
    graphdef, state = nnx.split(model)
    fn = _generate_fn(graphdef, layer, positions, prompts.shape[1], int(new_tokens))
    return np.asarray(fn(state, jnp.asarray(prompts), v, jnp.asarray(alphas_A, v.dtype).reshape(-1), key))


# ---------------------------------------------------------------- several steering terms
#
# k terms (v_i, l_i, positions_i) and alpha_k in R^k: at every cut point l the residual gets
# h_l <- h_l + sum_{i: l_i = l} alpha_i v_i at the term's positions (Eq. 1 per term). Below
# min(l_i) nothing depends on alpha_k: that prefix is computed once, outside the closure.

def check_multi(model: GPT, vectors_kxD, layers, positions):
    """(vectors [k, D] float64, layers, positions) of a k-term spec, validated for this GPT."""
    return check_terms(vectors_kxD, layers, positions, model.config.width, model.config.layers)


@functools.lru_cache(maxsize=64)
def _multi_steered_fn(graphdef, layers: tuple, rows: str, preserve: bool, cached: bool):
    """`fn(params, alpha_k) -> logits [M, V]` for one model shape, term layers and mode."""
    groups = layer_groups(layers)
    lo = min(layers)

    if cached:
        # Every term at the last position: one position runs through the blocks, attending to
        # the cache of the UNSTEERED pass (exact by causality, whatever the terms' layers).
        def fn(params, alpha_k):
            model = nnx.merge(graphdef, params["model"])
            vec_kxD, mask_kx1 = params["vectors"], params["mask"]
            x = params["x"]
            L = len(model.blocks)
            for j, (block, k, v) in enumerate(zip(model.blocks[lo:], params["k"], params["v"])):
                if lo + j in groups:
                    x = add_terms(x, alpha_k, vec_kxD, mask_kx1, groups[lo + j], preserve)
                x = block.step(x, k, v)
            if L in groups:
                x = add_terms(x, alpha_k, vec_kxD, mask_kx1, groups[L], preserve)
            return model.head(x)
    else:
        def fn(params, alpha_k):
            model = nnx.merge(graphdef, params["model"])
            vec_kxD, mask_kx1xT = params["vectors"], params["mask"]
            h = params["h"]
            L = len(model.blocks)
            for layer in range(lo, L):
                if layer in groups:
                    h = add_terms(h, alpha_k, vec_kxD, mask_kx1xT, groups[layer], preserve)
                block = model.blocks[layer]
                # rows="last": the last block's MLP and the head run on the last position only.
                h = block.last(h) if rows == "last" and layer == L - 1 else block(h)
            if rows == "last" and h.ndim == 3:
                h = h[:, -1]
            if L in groups:
                mask = mask_kx1xT if rows == "all" else mask_kx1xT[..., -1]
                h = add_terms(h, alpha_k, vec_kxD, mask, groups[L], preserve)
            y = model.head(h)
            return y.reshape(-1, y.shape[-1])

    fn.__qualname__ = (f"gpt_multi_steered[layers={layers},rows={rows},preserve={preserve},"
                       f"cached={cached}]")
    if rows == "last":  # one row per prompt: a per-row alpha_k is a per-prompt alpha_k
        register_rowwise(fn, mask_rowwise(fn))
    return fn


def multi_steered_closure(model: GPT, prompts_BxT, vectors_kxD, layers, positions, rows: str = "last",
                          preserve: bool = False, dtype=jnp.float32, *, cache_last: bool = True) -> Steered:
    """The GPT steered by k terms at once, as the sweep kernel sees it: alpha_k -> logits.

    Args:
      model: a GPT.
      prompts_BxT: prompts of equal length (token ids).
      vectors_kxD: the k steering vectors ([k, D], or a list of [D] vectors).
      layers: the cut point in [0, L] of each term (length k).
      positions: "all" or "last" for each term (length k).
      rows: "last" (M = B, next-token logits) or "all" (M = B * T; needs every term "all").
      preserve: at each layer where terms are added, rescale every steered position's
        residual to the norm it had just before that layer's addition.
      dtype: precision of the cached prefix, vectors and parameters.
      cache_last: with every term at "last", run one position against the key/value cache
        (False: the all-positions path with last-position masks, the same numbers).
    Returns:
      Steered(fn, params) with fn(params, alpha_k [k]) -> logits [M, V]; params hold "model",
      "vectors" [k, D], "mask" [k, 1, T] ([k, 1] on the cache path) and the prefix "h"
      [B, T, D] at min(layers), or "x" [B, D] with the caches "k", "v" of every later block.
    """
    vectors, layers, positions = check_multi(model, vectors_kxD, layers, positions)
    if rows not in ("last", "all"):
        raise ValueError(f"rows must be 'last' or 'all', got {rows!r}")
    if rows == "all" and any(p != "all" for p in positions):
        raise ValueError("rows='all' (every position's prediction) needs positions='all' for every term")
    prompts = jnp.asarray(check_prompts(model, prompts_BxT))
    k, T = vectors.shape[0], prompts.shape[1]
    model = cast_model(model, dtype)
    lo = min(layers)
    h = model.prefix(prompts, lo)
    cached = bool(cache_last) and all(p == "last" for p in positions)
    if cached:
        ks, vs = model.kv_cache(h, lo)
        cache = {"x": h[:, -1], "k": ks, "v": vs, "mask": jnp.ones((k, 1), dtype)}
    else:
        last_T = (np.arange(T) == T - 1).astype(np.float64)
        mask = np.stack([np.ones(T) if p == "all" else last_T for p in positions])[:, None, :]
        cache = {"h": h, "mask": jnp.asarray(mask, dtype)}
    graphdef, state = nnx.split(model)
    fn = _multi_steered_fn(graphdef, layers, rows, bool(preserve), cached)
    return Steered(fn, dict(cache, model=state, vectors=jnp.asarray(vectors, dtype)))


@functools.lru_cache(maxsize=32)
def _multi_full_fn(graphdef, layers: tuple, positions: tuple, preserve: bool, rows: str):
    """jit(vmap over alphas) of the plain full forward pass with every term's addition."""

    def one(state, tokens_BxT, vectors_kxD, alpha_k):
        model = nnx.merge(graphdef, state)
        h = model.embed_tokens(tokens_BxT)
        L = len(model.blocks)
        for layer in range(L + 1):
            here = [i for i, li in enumerate(layers) if li == layer]
            if here:
                add = jnp.zeros_like(h)
                for i in here:
                    if positions[i] == "all":
                        add = add + alpha_k[i] * vectors_kxD[i]
                    else:
                        add = add.at[:, -1].add(alpha_k[i] * vectors_kxD[i])
                new = h + add
                if preserve:  # back to the norm before this layer's addition
                    every = any(positions[i] == "all" for i in here)
                    touched_T = np.arange(h.shape[1]) >= (0 if every else h.shape[1] - 1)
                    ratio = jnp.linalg.norm(h, axis=-1, keepdims=True) / jnp.linalg.norm(new, axis=-1, keepdims=True)
                    new = jnp.where(touched_T[None, :, None], new * ratio, new)
                h = new
            if layer < L:
                h = model.blocks[layer](h)
        return model.head(h if rows == "all" else h[:, -1])

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))


def multi_steered_logits_full(model: GPT, prompts_BxT, vectors_kxD, layers, positions, alphas_Axk,
                              preserve: bool = False, dtype=jnp.float32, rows: str = "last") -> np.ndarray:
    """Reference: the FULL forward pass from the embedding with every term added at its layer
    (no prefix, no cache), next-token logits [A, B, V] (rows="all": every position's logits,
    [A, B, T, V]); the closures must agree with it."""
    vectors, layers, positions = check_multi(model, vectors_kxD, layers, positions)
    if rows not in ("last", "all"):
        raise ValueError(f"rows must be 'last' or 'all', got {rows!r}")
    prompts = jnp.asarray(check_prompts(model, prompts_BxT))
    k = vectors.shape[0]
    alphas = np.asarray(alphas_Axk, np.float64)
    if alphas.ndim == 1:
        alphas = alphas[None]
    if alphas.ndim != 2 or alphas.shape[1] != k:
        raise ValueError(f"alphas must be [A, {k}] (one alpha per term), got shape {np.shape(alphas_Axk)}")
    model = cast_model(model, dtype)
    graphdef, state = nnx.split(model)
    fn = _multi_full_fn(graphdef, layers, positions, bool(preserve), rows)
    return np.asarray(fn(state, prompts, jnp.asarray(vectors, dtype), jnp.asarray(alphas, dtype)))


def median_residual_norm(model: GPT, prompts_BxT, layer: int) -> float:
    """Median |h^(l)| over every position of every prompt (the "residual" norm unit of alpha)."""
    return float(np.median(np.linalg.norm(np.asarray(residual(model, prompts_BxT, layer), np.float64), axis=-1)))
