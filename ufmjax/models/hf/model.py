"""Pretrained decoders (GPT-2, Llama/Mistral, Qwen 2/3, Gemma 3) as one NNX module, cut at any layer.

Shape legend: B = prompts, T = positions (padded), D = width, H = query heads, K = key/value
heads, G = H / K, E = head width, F = MLP width, V = vocabulary, S = cached positions (T - 1).

One `Decoder` implements every family of `models.hf.config`: the family only sets switches
of its `Spec`. A block is

    a = ATTN(norm1(h));   [Gemma 3: a = norm_post_attn(a)]      h <- h + a
    m = MLP(norm2(h));    [Gemma 3: m = norm_post_ffn(m)]       h <- h + m

with the attention's q/k norms, RoPE (or learned positions for GPT-2), grouped-query heads,
sliding windows and soft-capping as the Spec says. Layer l in [0, L] of the residual stream is
the input of block l (0: the embedding output, like transformers' `output_hidden_states[l]`;
L: the last block's output, BEFORE the final norm, where transformers' last hidden state has
the norm applied). A forward hook adding alpha * v to the output of block l - 1 (or a pre-hook
on block l) is the same steering point.

Prompts of different lengths are LEFT-padded into one batch: the last position of every row
is its last token, padded keys are masked out of attention (a padded query sees only itself,
so nothing is NaN), and positions count from each prompt's first real token. No padding
value reaches a real token, so a batch equals its prompts one at a time (tested).

Weights stay in the checkpoint's dtype (bfloat16 included); activations are computed in the
closure's dtype (float32 or float64) by promotion.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax.models.hf.config import Spec
from ufmjax.steering import (
    Steered,
    Unembedding,
    add_terms,
    check_terms,
    head_logits,
    layer_groups,
    mask_rowwise,
    register_head,
    register_rowwise,
    residual_rowwise,
)

POSITIONS = ("all", "last")
NEG_INF = -1e30  # finite: a fully masked row of a padded query would otherwise be NaN


def _param(x):
    return None if x is None else nnx.Param(jnp.asarray(x))


def _value(p):
    return None if p is None else p[...]


def norm(x_xD, scale_D, bias_D, kind: str, eps: float):
    """LayerNorm (two-pass), RMSNorm (Llama: w * normed) or Gemma's RMSNorm (normed * (1 + w)),
    computed in at least float32 whatever the weights' dtype."""
    dtype = jnp.promote_types(x_xD.dtype, jnp.float32)
    x = x_xD.astype(dtype)
    if kind == "layernorm":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    w = scale_D.astype(dtype)
    y = y * (1 + w) if kind == "rmsnorm_plus1" else y * w
    return y if bias_D is None else y + bias_D.astype(dtype)


def activation(x, kind: str):
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if kind == "silu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


def linear(x_xI, w_OxI, b_O=None):
    """x W^T + b with the weight stored as transformers' [out, in]."""
    y = jnp.einsum("...i,oi->...o", x_xI, w_OxI.astype(x_xI.dtype))
    return y if b_O is None else y + b_O.astype(x_xI.dtype)


def rotate(x_xTxHxE, cos_xTxE, sin_xTxE):
    """RoPE, transformers' half-split layout: x cos + rotate_half(x) sin."""
    half = x_xTxHxE.shape[-1] // 2
    rot = jnp.concatenate([-x_xTxHxE[..., half:], x_xTxHxE[..., :half]], axis=-1)
    return x_xTxHxE * cos_xTxE[..., None, :] + rot * sin_xTxE[..., None, :]


def rope_angles(pos_xT, inv_freq, dtype):
    """cos and sin [..., T, E] of positions (float32 angles, as transformers)."""
    ang = pos_xT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


class Block(nnx.Module):
    """One decoder block; parameters as transformers stores them ([out, in] linear weights)."""

    def __init__(self, spec: Spec, index: int, w: dict):
        self.spec, self.index = spec, index
        self.window = spec.windows[index] if spec.windows else 0
        for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "post_attn_w", "post_ffn_w", "q_norm", "k_norm",
                     "q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w", "o_b", "gate_w", "gate_b", "up_w",
                     "up_b", "down_w", "down_b"):
            setattr(self, name, _param(w.get(name)))

    def _norm(self, x, w, b=None):
        return norm(x, _value(w), _value(b), self.spec.norm, self.spec.norm_eps)

    def qkv(self, h_xTxD, cos, sin):
        """Queries [.., T, H, E], keys and values [.., T, K, E] of norm1(h), normed and rotated."""
        s = self.spec
        x = self._norm(h_xTxD, self.ln1_w, self.ln1_b)
        lead = x.shape[:-1]
        q = linear(x, self.q_w[...], _value(self.q_b)).reshape(lead + (s.heads, s.head_dim))
        k = linear(x, self.k_w[...], _value(self.k_b)).reshape(lead + (s.kv_heads, s.head_dim))
        v = linear(x, self.v_w[...], _value(self.v_b)).reshape(lead + (s.kv_heads, s.head_dim))
        if s.qk_norm:
            q = norm(q, self.q_norm[...], None, s.norm, s.norm_eps)
            k = norm(k, self.k_norm[...], None, s.norm, s.norm_eps)
        if s.positions == "rope":
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q, k, v

    def scores(self, q_BxQxHxE, k_BxSxKxE):
        """Scaled (and soft-capped) scores [B, K, G, Q, S]."""
        s = self.spec
        B, Q = q_BxQxHxE.shape[:2]
        q = q_BxQxHxE.reshape(B, Q, s.kv_heads, s.group, s.head_dim)
        sc = jnp.einsum("bqkge,bske->bkgqs", q, k_BxSxKxE) * s.attn_scale
        if s.attn_softcap is not None:
            sc = jnp.tanh(sc / s.attn_softcap) * s.attn_softcap
        return sc

    def finish(self, h_xD, att_xHE):
        """Residual updates once attention is done (output projection, sandwich norms, MLP)."""
        s = self.spec
        a = linear(att_xHE, self.o_w[...], _value(self.o_b))
        if s.sandwich:
            a = self._norm(a, self.post_attn_w)
        h = h_xD + a
        x = self._norm(h, self.ln2_w, self.ln2_b)
        if s.gated:
            u = activation(linear(x, self.gate_w[...], _value(self.gate_b)), s.act) * linear(
                x, self.up_w[...], _value(self.up_b))
        else:
            u = activation(linear(x, self.up_w[...], _value(self.up_b)), s.act)
        m = linear(u, self.down_w[...], _value(self.down_b))
        if s.sandwich:
            m = self._norm(m, self.post_ffn_w)
        return h + m

    def __call__(self, h_BxTxD, mask_BxTxT, cos, sin):
        q, k, v = self.qkv(h_BxTxD, cos, sin)
        sc = jnp.where(mask_BxTxT[:, None, None], self.scores(q, k), NEG_INF)
        w = jax.nn.softmax(sc, axis=-1)
        att = jnp.einsum("bkgqs,bske->bqkge", w, v)
        return self.finish(h_BxTxD, att.reshape(att.shape[:2] + (-1,)))

    def step(self, x_BxD, k_BxSxKxE, v_BxSxKxE, cmask_BxS, cos_BxE, sin_BxE):
        """The block on ONE new (last) position attending to S cached positions (masked by
        cmask) and itself; the cache is scored in place, never concatenated (no per-alpha copy)."""
        if cos_BxE is not None:
            cos_BxE, sin_BxE = cos_BxE[:, None], sin_BxE[:, None]
        q, k, v = self.qkv(x_BxD[:, None], cos_BxE, sin_BxE)
        s_cache = jnp.where(cmask_BxS[:, None, None, None], self.scores(q, k_BxSxKxE), NEG_INF)[:, :, :, 0]
        s_new = self.scores(q, k)[:, :, :, 0, 0]                         # [B, K, G]
        m = jnp.maximum(s_cache.max(axis=-1), s_new)
        w_cache = jnp.exp(s_cache - m[..., None])                          # [B, K, G, S]
        w_new = jnp.exp(s_new - m)
        att = jnp.einsum("bkgs,bske->bkge", w_cache, v_BxSxKxE) + w_new[..., None] * v[:, 0, :, None, :]
        att = att / (w_cache.sum(axis=-1) + w_new)[..., None]
        return self.finish(x_BxD, att.reshape(att.shape[0], -1))


class Decoder(nnx.Module):
    """A pretrained decoder-only transformer of any supported family."""

    def __init__(self, spec: Spec, weights: dict):
        self.spec = spec
        self.embed = _param(weights["embed"])
        self.pos_embed = _param(weights.get("pos_embed"))
        self.blocks = nnx.List([Block(spec, i, weights["blocks"][i]) for i in range(spec.layers)])
        self.final_w = _param(weights["final_w"])
        self.final_b = _param(weights.get("final_b"))
        self.head_w = None if spec.tied else _param(weights["head_w"])

    # --- embedding, masks and positions

    def embed_tokens(self, tokens_BxT, pos_BxT, dtype):
        h = self.embed[...][tokens_BxT].astype(dtype)
        if self.spec.embed_scale is not None:
            # transformers multiplies by the scale rounded to the embedding's dtype
            h = h * jnp.asarray(np.asarray(self.spec.embed_scale, self.embed[...].dtype), dtype)
        if self.pos_embed is not None:
            h = h + self.pos_embed[...][pos_BxT].astype(dtype)
        return h

    def rope(self, pos_xT, dtype):
        """(cos, sin) per RoPE kind of the Spec (empty for learned positions)."""
        if self.spec.positions != "rope":
            return ()
        return tuple(rope_angles(pos_xT, inv, dtype) for inv in self.spec.rope_tables)

    def _cos_sin(self, tables, i):
        return tables[self.spec.rope_of_layer[i]] if tables else (None, None)

    def masks(self, valid_BxT):
        """Attention masks [B, T, T] per distinct window: causal, padded keys hidden, a padded
        query sees itself, a sliding layer sees its last `window` positions (itself included)."""
        T = valid_BxT.shape[1]
        i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        causal = (j <= i)[None] & (valid_BxT[:, None, :] | (i == j)[None])
        out = {}
        for w in sorted(set(self.spec.windows)):
            out[w] = causal if w == 0 else causal & ((i - j) < w)[None]
        return out

    # --- the two halves of a forward pass cut at layer l

    def prefix(self, tokens_BxT, valid_BxT, pos_BxT, layer: int, dtype=jnp.float32):
        """Residual stream h^(l) [B, T, D]: embedding, then blocks 0..l-1."""
        h = self.embed_tokens(tokens_BxT, pos_BxT, dtype)
        tables, masks = self.rope(pos_BxT, dtype), self.masks(valid_BxT)
        for i, block in enumerate(self.blocks[:layer]):
            h = block(h, masks[block.window], *self._cos_sin(tables, i))
        return h

    def hidden_states(self, tokens_BxT, valid_BxT, pos_BxT, dtype=jnp.float32):
        """Every cut point [L + 1, B, T, D] (row L before the final norm)."""
        h = self.embed_tokens(tokens_BxT, pos_BxT, dtype)
        tables, masks = self.rope(pos_BxT, dtype), self.masks(valid_BxT)
        out = [h]
        for i, block in enumerate(self.blocks):
            h = block(h, masks[block.window], *self._cos_sin(tables, i))
            out.append(h)
        return jnp.stack(out)

    def suffix(self, h_BxTxD, valid_BxT, pos_BxT, layer: int, last_only: bool = False, logits: bool = True):
        """Logits from the residual at layer l: blocks l..L-1, final norm, head; [B, T, V], or
        [B, V] at the last position when `last_only` (its last block's MLP on that row alone).
        `logits=False` stops before the unembedding: the final-normed hidden states [.., D]."""
        out = self.head if logits else self.final_norm
        tables, masks = self.rope(pos_BxT, h_BxTxD.dtype), self.masks(valid_BxT)
        blocks = list(enumerate(self.blocks))[layer:]
        if last_only and blocks:
            for i, block in blocks[:-1]:
                h_BxTxD = block(h_BxTxD, masks[block.window], *self._cos_sin(tables, i))
            i, block = blocks[-1]
            cos, sin = self._cos_sin(tables, i)
            q, k, v = block.qkv(h_BxTxD, cos, sin)
            sc = jnp.where(masks[block.window][:, None, None, -1:], block.scores(q[:, -1:], k), NEG_INF)
            w = jax.nn.softmax(sc, axis=-1)
            att = jnp.einsum("bkgqs,bske->bqkge", w, v)[:, 0]
            return out(block.finish(h_BxTxD[:, -1], att.reshape(att.shape[0], -1)))
        for i, block in blocks:
            h_BxTxD = block(h_BxTxD, masks[block.window], *self._cos_sin(tables, i))
        return out(h_BxTxD[:, -1] if last_only else h_BxTxD)

    def unembedding(self):
        """W [V, D], so that logits = norm(h_L) W^T."""
        return self.embed[...] if self.spec.tied else self.head_w[...]

    def unembedding_as_stored(self) -> Unembedding:
        """W [V, D] with the final soft-cap (Gemma 2), as the kernel's head path reads it."""
        return Unembedding(self.unembedding(), vocab_axis=0, softcap=self.spec.final_softcap)

    def final_norm(self, h_xD):
        return norm(h_xD, self.final_w[...], _value(self.final_b), self.spec.norm, self.spec.norm_eps)

    def head(self, h_xD):
        """logits = cap(norm(h_L) W^T)."""
        return head_logits(self.unembedding_as_stored(), self.final_norm(h_xD))

    def kv_cache(self, h_BxTxD, valid_BxT, pos_BxT, layer: int):
        """Keys, values and key masks of every block >= l on the UNSTEERED residual at positions
        0..T-2, as the last position sees them (causality: steering the last position changes
        none of them)."""
        tables, masks = self.rope(pos_BxT, h_BxTxD.dtype), self.masks(valid_BxT)
        ks, vs, ms = [], [], []
        for i, block in list(enumerate(self.blocks))[layer:]:
            cos, sin = self._cos_sin(tables, i)
            _, k, v = block.qkv(h_BxTxD, cos, sin)
            ks.append(k[:, :-1])
            vs.append(v[:, :-1])
            ms.append(masks[block.window][:, -1, :-1])
            h_BxTxD = block(h_BxTxD, masks[block.window], cos, sin)
        return tuple(ks), tuple(vs), tuple(ms)


# ---------------------------------------------------------------- prompts of several lengths

def pad_prompts(prompts, name: str = "prompts"):
    """Left-pad token-id prompts of any lengths: (tokens [B, T], valid [B, T], positions [B, T]).

    Positions count from each prompt's first token (padded slots get 0); the pad id is 0 and
    never reaches a real token.
    """
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError(f"{name}: no prompts")
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"{name}: prompt {i} has no tokens")
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"{name}: prompt {i} must hold integer token ids, got {r.dtype}")
    T = max(r.size for r in rows)
    tokens = np.zeros((len(rows), T), np.int32)
    valid = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, T - r.size:] = r
        valid[i, T - r.size:] = True
    pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, valid, pos


def check_layer(model: Decoder, layer) -> int:
    L = model.spec.layers
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer <= L:
        raise ValueError(f"--layer must be an integer in [0, {L}] (0: embedding output, {L}: last block's "
                         f"output), got {layer!r}")
    return int(layer)


def check_tokens(model: Decoder, tokens_BxT, name: str = "prompts") -> None:
    s = model.spec
    if tokens_BxT.shape[1] > s.context:
        raise ValueError(f"{name}: {tokens_BxT.shape[1]} tokens, more than the model's context {s.context}")
    if tokens_BxT.min() < 0 or tokens_BxT.max() >= s.vocab:
        raise ValueError(f"{name}: token ids outside [0, {s.vocab})")


def check_vector(model: Decoder, v_D, name: str = "steering vector") -> np.ndarray:
    v = np.asarray(v_D)
    D = model.spec.width
    if v.shape != (D,):
        raise ValueError(f"{name} must have width {D} (the model's hidden size), got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.floating) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite floats")
    return v


# ---------------------------------------------------------------- one-off passes (eager)

def _prepared(model: Decoder, prompts, name="prompts"):
    tokens, valid, pos = pad_prompts(prompts, name)
    check_tokens(model, tokens, name)
    return jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(pos)


@functools.lru_cache(maxsize=32)
def _forward_fn(graphdef, dtype_name: str):
    dtype = jnp.dtype(dtype_name)

    def fn(state, tokens, valid, pos):
        model = nnx.merge(graphdef, state)
        return model.suffix(model.prefix(tokens, valid, pos, 0, dtype), valid, pos, 0)

    return jax.jit(fn)


@functools.lru_cache(maxsize=64)
def _prefix_fn(graphdef, layer: int, dtype_name: str):
    """The prefix as ONE compiled program per shape: eagerly, each of its few hundred small
    ops compiles on its own (measured: ~9 s of a first sweep on a tiny model)."""
    dtype = jnp.dtype(dtype_name)
    return jax.jit(lambda state, tokens, valid, pos: nnx.merge(graphdef, state).prefix(tokens, valid, pos, layer,
                                                                                        dtype))


@functools.lru_cache(maxsize=32)
def _hidden_fn(graphdef, dtype_name: str):
    dtype = jnp.dtype(dtype_name)
    return jax.jit(lambda state, tokens, valid, pos: nnx.merge(graphdef, state).hidden_states(tokens, valid, pos,
                                                                                               dtype))


@functools.lru_cache(maxsize=64)
def _kv_fn(graphdef, layer: int):
    return jax.jit(lambda state, h, valid, pos: nnx.merge(graphdef, state).kv_cache(h, valid, pos, layer))


def prefix(model: Decoder, tokens, valid, pos, layer: int, dtype=jnp.float32):
    """`model.prefix`, compiled (memoised on the model's shape, the layer and the dtype)."""
    graphdef, state = nnx.split(model)
    return _prefix_fn(graphdef, layer, jnp.dtype(dtype).name)(state, tokens, valid, pos)


def logits(model: Decoder, prompts, dtype=jnp.float32) -> list[np.ndarray]:
    """Unsteered logits [T_i, V] of each prompt (one left-padded batch, padding dropped)."""
    tokens, valid, pos = _prepared(model, prompts)
    graphdef, state = nnx.split(model)
    out = np.asarray(_forward_fn(graphdef, jnp.dtype(dtype).name)(state, tokens, valid, pos))
    lengths = np.asarray(valid).sum(axis=1)
    return [out[i, out.shape[1] - n:] for i, n in enumerate(lengths)]


def hidden_states(model: Decoder, prompts, dtype=jnp.float32) -> list[np.ndarray]:
    """The residual stream at every layer of each prompt, [L + 1, T_i, D]."""
    tokens, valid, pos = _prepared(model, prompts)
    graphdef, state = nnx.split(model)
    hs = np.asarray(_hidden_fn(graphdef, jnp.dtype(dtype).name)(state, tokens, valid, pos))
    lengths = np.asarray(valid).sum(axis=1)
    return [hs[:, i, hs.shape[2] - n:] for i, n in enumerate(lengths)]


def token_mean_residual(model: Decoder, prompts, layer: int, dtype=jnp.float32, batch: int = 32,
                        skip: int = 0) -> np.ndarray:
    """Residual at layer l averaged over each prompt's own tokens (padding masked) [B, D], the
    per-prompt term of the paper's difference of means; the first `skip` tokens of each
    prompt (a BOS) are left out of the mean (they still shape the others)."""
    layer = check_layer(model, layer)
    out = []
    for i in range(0, len(prompts), batch):
        tokens, valid, pos = _prepared(model, prompts[i:i + batch])
        h = np.asarray(prefix(model, tokens, valid, pos, layer, dtype), np.float64)
        m = (np.asarray(valid) & (np.asarray(pos) >= skip)).astype(np.float64)[..., None]
        if np.any(m.sum(axis=1) == 0):
            raise ValueError(f"a steering prompt has no token besides the {skip} special token(s) in front")
        out.append((h * m).sum(axis=1) / m.sum(axis=1))
    return np.concatenate(out)


# ---------------------------------------------------------------- the steered closure

@functools.lru_cache(maxsize=64)
def _steered_fn(graphdef, layer: int, positions: str, rows: str):
    """`fn(params, alpha) -> logits [M, V]` for one model shape, cut point and mode, declared
    with its head (`steering.register_head`): fn = cap(norm(h_L(alpha)) W^T)."""

    if positions == "all":
        def hidden(params, alpha):
            model = nnx.merge(graphdef, params["model"])
            valid, pos = params["valid"], params["pos"]
            steer = params["steer"] * valid[..., None].astype(params["h"].dtype)
            h = params["h"] + alpha * steer  # Eq. 1 at every (real) position
            if rows == "all":
                y = model.suffix(h, valid, pos, layer, logits=False)
                return y.reshape(-1, y.shape[-1])
            return model.suffix(h, valid, pos, layer, last_only=True, logits=False)
    else:
        def hidden(params, alpha):
            model = nnx.merge(graphdef, params["model"])
            x = params["x"] + alpha * params["steer"]  # Eq. 1 at the last position only
            tables = model.rope(params["pos_last"], x.dtype)
            for j, (block, k, v, m) in enumerate(zip(model.blocks[layer:], params["k"], params["v"], params["m"])):
                cos, sin = model._cos_sin(tables, layer + j)
                x = block.step(x, k, v, m, cos, sin)
            return model.final_norm(x)

    def unembedding(params):
        return nnx.merge(graphdef, params["model"]).unembedding_as_stored()

    def fn(params, alpha):
        return head_logits(unembedding(params), hidden(params, alpha))

    fn.__qualname__ = f"hf_steered[layer={layer},positions={positions},rows={rows}]"
    register_head(fn, hidden, unembedding)
    if rows == "last":
        register_rowwise(fn, residual_rowwise(fn))
    return fn


def steered_closure(model: Decoder, prompts, v_D, layer: int, positions: str = "all", rows: str = "last",
                    dtype=jnp.float32) -> Steered:
    """A pretrained model as the sweep kernel sees it: alpha -> steered logits [M, V].

    Args:
      model: a loaded Decoder.
      prompts: token-id prompts, any lengths (left-padded; exact, see the module docstring).
      v_D: the steering vector, added at layer `layer` as alpha * v.
      layer: cut point in [0, L].
      positions: "all" (every position, the paper's default) or "last".
      rows: "last" (each prompt's next-token logits, M = B) or "all" (every position of
        every prompt, M = B * T, for cross-entropy on text; needs equal-length prompts).
      dtype: precision of the cached prefix and of the computation (weights keep theirs).
    """
    layer = check_layer(model, layer)
    if positions not in POSITIONS:
        raise ValueError(f"--positions must be one of {POSITIONS}, got {positions!r}")
    if rows not in ("last", "all"):
        raise ValueError(f"rows must be 'last' or 'all', got {rows!r}")
    tokens, valid, pos = _prepared(model, prompts)
    if rows == "all" and (positions != "all" or not bool(np.all(np.asarray(valid)))):
        raise ValueError("rows='all' needs positions='all' and prompts of one length")
    v = jnp.asarray(check_vector(model, v_D), dtype)
    h = prefix(model, tokens, valid, pos, layer, dtype)
    graphdef, state = nnx.split(model)
    if positions == "all":
        cache = {"h": h, "valid": valid, "pos": pos}
    else:
        ks, vs, ms = _kv_fn(graphdef, layer)(state, h, valid, pos)
        cache = {"x": h[:, -1], "pos_last": pos[:, -1], "k": ks, "v": vs, "m": ms}
    return Steered(_steered_fn(graphdef, layer, positions, rows), dict(cache, model=state, steer=v))


def limit_logits(model: Decoder, v_D, dtype=jnp.float32) -> np.ndarray:
    """Prop. 4.1: the limits of the steered logits as alpha -> +-inf, head(+-v), [2, V]."""
    v = jnp.asarray(check_vector(model, v_D), dtype)
    return np.asarray(model.head(jnp.stack([v, -v])))


def steered_logits_full(model: Decoder, prompts, v_D, layer: int, alphas_A, positions: str = "all",
                        dtype=jnp.float32) -> np.ndarray:
    """Reference: the FULL forward pass per alpha, no cache (the paper's forward-hook method),
    next-token logits [A, B, V]. The prefix-cached and key/value-cached closures must agree."""
    layer = check_layer(model, layer)
    if positions not in POSITIONS:
        raise ValueError(f"--positions must be one of {POSITIONS}, got {positions!r}")
    tokens, valid, pos = _prepared(model, prompts)
    v = jnp.asarray(check_vector(model, v_D), dtype)
    mask = valid if positions == "all" else jnp.zeros_like(valid).at[:, -1].set(True)
    out = []
    for a in np.asarray(alphas_A, np.float64).reshape(-1):
        h = prefix(model, tokens, valid, pos, layer, dtype) + jnp.asarray(a, dtype) * v * mask[..., None].astype(dtype)
        out.append(np.asarray(model.suffix(h, valid, pos, layer))[:, -1])
    return np.stack(out)


def residual_norms(model: Decoder, prompts, layer: int, dtype=jnp.float32) -> np.ndarray:
    """Norms |h^(l)| of every real token's residual at layer l (padding left out)."""
    tokens, valid, pos = _prepared(model, prompts)
    h = np.asarray(prefix(model, tokens, valid, pos, check_layer(model, layer), dtype), np.float64)
    return np.linalg.norm(h, axis=-1)[np.asarray(valid)]


# ---------------------------------------------------------------- several steering terms
#
# k terms (v_i, l_i, positions_i) and alpha_k in R^k: at every cut point l the residual gets
# h_l <- h_l + sum_{i: l_i = l} alpha_i v_i at the term's (real) positions (Eq. 1 per term).

def check_multi(model: Decoder, vectors_kxD, layers, positions):
    """(vectors [k, D] float64, layers, positions) of a k-term spec, validated for this model."""
    return check_terms(vectors_kxD, layers, positions, model.spec.width, model.spec.layers)


def _block_last(block: Block, h_BxTxD, mask_BxTxT, cos, sin):
    """A block's output at the last position only, [B, D] (all positions feed its attention)."""
    q, k, v = block.qkv(h_BxTxD, cos, sin)
    sc = jnp.where(mask_BxTxT[:, None, None, -1:], block.scores(q[:, -1:], k), NEG_INF)
    att = jnp.einsum("bkgqs,bske->bqkge", jax.nn.softmax(sc, axis=-1), v)[:, 0]
    return block.finish(h_BxTxD[:, -1], att.reshape(att.shape[0], -1))


@functools.lru_cache(maxsize=64)
def _multi_steered_fn(graphdef, layers: tuple, rows: str, preserve: bool, cached: bool):
    """`fn(params, alpha_k) -> logits [M, V]` for one model shape, term layers and mode."""
    groups = layer_groups(layers)
    lo = min(layers)

    if cached:
        # Every term at the last position: one position per prompt runs through the blocks
        # against the key/value cache of the UNSTEERED pass (exact by causality).
        def fn(params, alpha_k):
            model = nnx.merge(graphdef, params["model"])
            vec_kxD, mask_kx1 = params["vectors"], params["mask"]
            x = params["x"]
            L = len(model.blocks)
            tables = model.rope(params["pos_last"], x.dtype)
            for j, (block, k, v, m) in enumerate(zip(model.blocks[lo:], params["k"], params["v"], params["m"])):
                if lo + j in groups:
                    x = add_terms(x, alpha_k, vec_kxD, mask_kx1, groups[lo + j], preserve)
                x = block.step(x, k, v, m, *model._cos_sin(tables, lo + j))
            if L in groups:
                x = add_terms(x, alpha_k, vec_kxD, mask_kx1, groups[L], preserve)
            return model.head(x)
    else:
        def fn(params, alpha_k):
            model = nnx.merge(graphdef, params["model"])
            vec_kxD, mask_kxBxT = params["vectors"], params["mask"]
            h, valid, pos = params["h"], params["valid"], params["pos"]
            L = len(model.blocks)
            tables, masks = model.rope(pos, h.dtype), model.masks(valid)
            for layer in range(lo, L):
                if layer in groups:
                    h = add_terms(h, alpha_k, vec_kxD, mask_kxBxT, groups[layer], preserve)
                block = model.blocks[layer]
                cos, sin = model._cos_sin(tables, layer)
                if rows == "last" and layer == L - 1:
                    h = _block_last(block, h, masks[block.window], cos, sin)
                else:
                    h = block(h, masks[block.window], cos, sin)
            if rows == "last" and h.ndim == 3:
                h = h[:, -1]
            if L in groups:
                mask = mask_kxBxT if rows == "all" else mask_kxBxT[..., -1]
                h = add_terms(h, alpha_k, vec_kxD, mask, groups[L], preserve)
            y = model.head(h)
            return y.reshape(-1, y.shape[-1])

    fn.__qualname__ = (f"hf_multi_steered[layers={layers},rows={rows},preserve={preserve},"
                       f"cached={cached}]")
    if rows == "last":
        register_rowwise(fn, mask_rowwise(fn))
    return fn


def multi_steered_closure(model: Decoder, prompts, vectors_kxD, layers, positions, rows: str = "last",
                          preserve: bool = False, dtype=jnp.float32, *, cache_last: bool = True) -> Steered:
    """A pretrained model steered by k terms at once: alpha_k -> steered logits [M, V].

    Args:
      model: a loaded Decoder.
      prompts: token-id prompts, any lengths (left-padded; padding is never steered).
      vectors_kxD: the k steering vectors ([k, D], or a list of [D] vectors).
      layers: the cut point in [0, L] of each term (length k).
      positions: "all" or "last" for each term (length k).
      rows: "last" (M = B) or "all" (M = B * T; needs every term "all" and prompts of one length).
      preserve: at each layer where terms are added, rescale every steered position's
        residual to the norm it had just before that layer's addition.
      dtype: precision of the cached prefix and of the computation (weights keep theirs).
      cache_last: with every term at "last", use the key/value-cached one-position path
        (False: the all-positions path with last-position masks, the same numbers).
    Returns:
      Steered(fn, params) with fn(params, alpha_k [k]) -> logits [M, V]; params hold "model",
      "vectors" [k, D], "mask" [k, B, T] ([k, 1] on the cache path) and either "h", "valid",
      "pos" at min(layers) or "x", "pos_last" and the caches "k", "v", "m" of later blocks.
    """
    vectors, layers, positions = check_multi(model, vectors_kxD, layers, positions)
    if rows not in ("last", "all"):
        raise ValueError(f"rows must be 'last' or 'all', got {rows!r}")
    tokens, valid, pos = _prepared(model, prompts)
    if rows == "all" and (any(p != "all" for p in positions) or not bool(np.all(np.asarray(valid)))):
        raise ValueError("rows='all' needs positions='all' for every term and prompts of one length")
    k = vectors.shape[0]
    lo = min(layers)
    h = prefix(model, tokens, valid, pos, lo, dtype)
    graphdef, state = nnx.split(model)
    cached = bool(cache_last) and all(p == "last" for p in positions)
    if cached:
        ks, vs, ms = _kv_fn(graphdef, lo)(state, h, valid, pos)
        cache = {"x": h[:, -1], "pos_last": pos[:, -1], "k": ks, "v": vs, "m": ms,
                 "mask": jnp.ones((k, 1), dtype)}
    else:
        valid_np = np.asarray(valid)
        last = np.zeros_like(valid_np)
        last[:, -1] = True  # left padding: every row's last slot is its last real token
        mask = np.stack([valid_np if p == "all" else last for p in positions])
        cache = {"h": h, "valid": valid, "pos": pos, "mask": jnp.asarray(mask, dtype)}
    fn = _multi_steered_fn(graphdef, layers, rows, bool(preserve), cached)
    return Steered(fn, dict(cache, model=state, vectors=jnp.asarray(vectors, dtype)))


@functools.lru_cache(maxsize=32)
def _multi_full_fn(graphdef, layers: tuple, positions: tuple, preserve: bool, dtype_name: str):
    """jit(vmap over alphas) of the plain full forward pass with every term's addition."""
    dtype = jnp.dtype(dtype_name)

    def one(state, tokens, valid, pos, vectors_kxD, alpha_k):
        model = nnx.merge(graphdef, state)
        h = model.embed_tokens(tokens, pos, dtype)
        tables, masks = model.rope(pos, dtype), model.masks(valid)
        L = len(model.blocks)
        last = jnp.zeros_like(valid).at[:, -1].set(True)
        for layer in range(L + 1):
            here = [i for i, li in enumerate(layers) if li == layer]
            if here:
                add = jnp.zeros_like(h)
                for i in here:
                    where = valid if positions[i] == "all" else last
                    add = add + alpha_k[i] * vectors_kxD[i] * where[..., None].astype(dtype)
                new = h + add
                if preserve:  # back to the norm before this layer's addition
                    touched = valid if any(positions[i] == "all" for i in here) else last
                    ratio = jnp.linalg.norm(h, axis=-1, keepdims=True) / jnp.linalg.norm(new, axis=-1, keepdims=True)
                    new = jnp.where(touched[..., None], new * ratio, new)
                h = new
            if layer < L:
                block = model.blocks[layer]
                h = block(h, masks[block.window], *model._cos_sin(tables, layer))
        return model.head(h[:, -1])

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, None, None, 0)))


def multi_steered_logits_full(model: Decoder, prompts, vectors_kxD, layers, positions, alphas_Axk,
                              preserve: bool = False, dtype=jnp.float32) -> np.ndarray:
    """Reference: the FULL forward pass from the embedding with every term added at its layer
    (no prefix, no cache), next-token logits [A, B, V]; the closures must agree with it."""
    vectors, layers, positions = check_multi(model, vectors_kxD, layers, positions)
    tokens, valid, pos = _prepared(model, prompts)
    k = vectors.shape[0]
    alphas = np.asarray(alphas_Axk, np.float64)
    if alphas.ndim == 1:
        alphas = alphas[None]
    if alphas.ndim != 2 or alphas.shape[1] != k:
        raise ValueError(f"alphas must be [A, {k}] (one alpha per term), got shape {np.shape(alphas_Axk)}")
    graphdef, state = nnx.split(model)
    fn = _multi_full_fn(graphdef, layers, positions, bool(preserve), jnp.dtype(dtype).name)
    return np.asarray(fn(state, tokens, valid, pos, jnp.asarray(vectors, dtype), jnp.asarray(alphas, dtype)))


def median_residual_norm(model: Decoder, prompts, layer: int, dtype=jnp.float32) -> float:
    """Median |h^(l)| over every real token of every prompt (the "residual" norm unit of alpha)."""
    return float(np.median(residual_norms(model, prompts, layer, dtype)))
