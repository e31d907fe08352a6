"""A Hugging Face `config.json` read into one `Spec` of the decoder it describes.

Every family ufmjax implements (GPT-2, Llama 2/3, Mistral, Qwen 2, Qwen 3, Gemma 3) is a
pre-norm decoder; what differs is a handful of switches (norm kind, position scheme, gated
MLP, biases, q/k norms, Gemma 3's sandwich norms and scales, sliding windows, soft-capping).
`spec_from_config` turns the folder's config into those switches, so `models.hf.model`
has one implementation and no `if family == ...` in its forward pass.

Fields that change the mathematics and that ufmjax does not implement are refused by name
(`ConfigError`), never ignored: a model that loads computes what transformers computes.
Fields that do not change the forward pass (token ids, dropout, initialisation, dtype, cache
switches) are accepted as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAMILIES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
# Keys whose name says they may change the forward pass; one of these that a family does not
# read is refused rather than silently dropped.
MATHS_WORDS = ("rope", "rotary", "window", "softcap", "scal", "norm", "act", "attn", "attention",
               "alibi", "parallel", "quant", "moe", "expert", "logit", "mup", "multiplier",
               "residual", "embedding", "bias")


# transformers 5.24's defaults for fields a config.json may leave out (released Gemma 3 4B's
# text_config, for one, lists only five fields); a missing field takes its family's default,
# never one of another family.
DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-6, "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "sliding_window": 4096,
                    "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
                    "tie_word_embeddings": True},
}


class ConfigError(ValueError):
    """A config.json ufmjax cannot implement exactly (one line, names the field and file)."""


@dataclass(frozen=True)
class Spec:
    """The decoder a config describes (hashable: it keys the compiled closures).

    Shape names: V vocabulary, D width, H query heads, K key/value heads, E head width,
    F MLP width, L blocks.
    """

    model_type: str
    family: str
    vocab: int
    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int
    context: int
    norm: str = "rmsnorm"            # "layernorm" | "rmsnorm" | "rmsnorm_plus1" (Gemma: x (1 + w))
    norm_eps: float = 1e-6
    act: str = "silu"                # "gelu_tanh" | "gelu" | "silu" | "relu"
    gated: bool = True               # act(x W_gate) * (x W_up), then W_down
    positions: str = "rope"          # "rope" | "learned"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich: bool = False           # Gemma 3: norms after attention and around the MLP
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(D)
    attn_scale: float = 1.0           # multiplier of q.k
    attn_softcap: float | None = None
    final_softcap: float | None = None
    tied: bool = True
    windows: tuple = ()              # per block: sliding window (keys seen, itself included) or 0
    rope_of_layer: tuple = ()        # per block: index into rope_tables
    rope_tables: tuple = ()          # inverse frequencies [E / 2] of each RoPE kind (float32 values)

    @property
    def group(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.heads // self.kv_heads


def read_config(folder) -> dict:
    """config.json of a model folder, as a dict (ConfigError naming `--hf` when unusable)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--hf: {str(folder)!r} is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"--hf: no config.json in {str(folder)!r}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--hf: {path} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--hf: {path} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


class _Reader:
    """Reads config fields, remembering which were read so the rest can be checked."""

    def __init__(self, cfg: dict, where: str):
        self.cfg, self.where, self.used = cfg, where, set()

    def get(self, key, default=None):
        self.used.add(key)
        value = self.cfg.get(key, default)
        return default if value is None else value

    def need(self, key, kind=int):
        self.used.add(key)
        value = self.cfg.get(key)
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            raise ConfigError(f"--hf: {self.where}: {key} must be a positive number, got {value!r}")
        return value

    def only(self, key, allowed, default):
        value = self.get(key, default)
        if value not in allowed:
            raise ConfigError(f"--hf: {self.where}: {key}={value!r} is not supported (ufmjax implements "
                              f"{', '.join(map(repr, allowed))})")
        return value

    def refuse_unread(self, ignored):
        """Refuse any key that looks like it changes the maths and that nothing read."""
        for key in sorted(self.cfg):
            value = self.cfg[key]
            if key in self.used or key in ignored or value is None or value is False or value in ([], {}):
                continue
            if any(w in key.lower() for w in MATHS_WORDS):
                raise ConfigError(f"--hf: {self.where}: field {key}={self.cfg[key]!r} changes the model and "
                                  f"ufmjax does not implement it")


# Keys no family's forward pass depends on.
IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "attention_dropout",
    "hidden_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
    "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "task_specific_params",
    "n_ctx", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "_name_or_path", "tokenizer_class", "prefix", "max_window_layers", "cache_implementation",
    "reorder_and_upcast_attn", "scale_attn_weights", "layer_norm_eps", "rms_norm_eps",
    "layer_norm_epsilon", "tie_word_embeddings", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "add_cross_attention", "use_return_dict", "pretraining_tp",
    "attn_implementation", "_attn_implementation_autoset", "image_token_index", "boi_token_index",
    "eoi_token_index", "mm_tokens_per_image", "vision_config", "text_config", "vocab_size",
}


def rope_inv_freq(params: dict, head_dim: int, where: str) -> tuple:
    """Inverse frequencies [E / 2] of one RoPE kind (default, linear or llama3 scaling), float32
    arithmetic as transformers computes them."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"--hf: {where}: rope_type {rope_type!r} is not supported (ufmjax implements "
                          f"{', '.join(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"--hf: {where}: partial_rotary_factor={params['partial_rotary_factor']!r} is not supported")
    if params.get("attention_factor") not in (None, 1, 1.0):
        raise ConfigError(f"--hf: {where}: rope attention_factor={params['attention_factor']!r} is not supported")
    base = float(params.get("rope_theta", 10000.0))
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(base), exponent)).astype(np.float32)
    if rope_type == "linear":
        inv = (inv / np.float32(params["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        factor = np.float32(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > old / low, inv / factor, inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return tuple(float(x) for x in inv)


def _rope_params(r: _Reader, layer_type: str | None = None) -> dict:
    """One RoPE kind's parameters from the v5 `rope_parameters` (flat, or keyed by layer type)
    or the v4 `rope_theta` / `rope_scaling` / `rope_local_base_freq` fields."""
    rp = r.get("rope_parameters")
    if isinstance(rp, dict) and layer_type is not None and layer_type in rp:
        return dict(rp[layer_type])
    if isinstance(rp, dict) and rp and layer_type is None:
        return dict(rp)
    theta = r.get("rope_theta")
    out = dict(r.get("rope_scaling") or {})
    if layer_type == "sliding_attention":
        out = {"rope_type": "default", "rope_theta": r.get("rope_local_base_freq", 10000.0)}
    elif theta is not None:
        out["rope_theta"] = theta
    elif layer_type == "full_attention":
        out.setdefault("rope_theta", 1_000_000.0)
    return out


def spec_from_config(cfg: dict, where: str = "config.json") -> Spec:
    """The `Spec` of a config.json dict (ConfigError naming the field when unsupported)."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"--hf: {where}: model_type {model_type!r} is not supported (ufmjax implements "
                          f"{', '.join(sorted(FAMILIES))})")
    if cfg.get("quantization_config"):
        raise ConfigError(f"--hf: {where}: quantized checkpoints (quantization_config) are not supported")
    if model_type == "gemma3":  # the multimodal wrapper: its language model
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"--hf: {where}: model_type 'gemma3' without a text_config")
        spec = spec_from_config({**text, "model_type": "gemma3_text"}, where)
        # transformers' Gemma3ForConditionalGeneration returns lm_head(h) without the final
        # soft-capping its text-only class applies (released Gemma 3 configs set none anyway).
        return dataclasses.replace(spec, model_type="gemma3", final_softcap=None)
    cfg = {**DEFAULTS.get(model_type, {}), **cfg}  # absent fields: the family's own defaults
    family = FAMILIES[model_type]
    r = _Reader(cfg, where)
    if family == "gpt2":
        return _gpt2(r, model_type)
    return _rope_decoder(r, model_type, family)


def _gpt2(r: _Reader, model_type: str) -> Spec:
    D, H = r.need("n_embd"), r.need("n_head")
    if D % H:
        raise ConfigError(f"--hf: {r.where}: n_head={H} does not divide n_embd={D}")
    act = ACTIVATIONS.get(r.only("activation_function", tuple(ACTIVATIONS), "gelu_new"))
    if r.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(f"--hf: {r.where}: scale_attn_by_inverse_layer_idx=True is not supported")
    if not r.get("scale_attn_weights", True):
        raise ConfigError(f"--hf: {r.where}: scale_attn_weights=False is not supported")
    if r.get("add_cross_attention", False):
        raise ConfigError(f"--hf: {r.where}: add_cross_attention=True (an encoder-decoder) is not supported")
    L = r.need("n_layer")
    inner = r.get("n_inner") or 4 * D
    spec = Spec(model_type, "gpt2", vocab=r.need("vocab_size"), width=D, layers=L, heads=H, kv_heads=H,
                head_dim=D // H, mlp_width=int(inner), context=r.need("n_positions"), norm="layernorm",
                norm_eps=float(r.get("layer_norm_epsilon", 1e-5)), act=act, gated=False, positions="learned",
                qkv_bias=True, o_bias=True, mlp_bias=True, attn_scale=1.0 / math.sqrt(D // H),
                tied=bool(r.get("tie_word_embeddings", True)), windows=(0,) * L)
    r.used.update({"n_inner", "n_ctx"})
    r.refuse_unread(IGNORED)
    return spec


def _rope_decoder(r: _Reader, model_type: str, family: str) -> Spec:
    D, H, L = r.need("hidden_size"), r.need("num_attention_heads"), r.need("num_hidden_layers")
    K = r.get("num_key_value_heads", H)
    if not isinstance(K, int) or K < 1 or H % K:
        raise ConfigError(f"--hf: {r.where}: num_key_value_heads={K!r} must divide num_attention_heads={H}")
    E = r.get("head_dim") or D // H
    gemma = family == "gemma3"
    # Gemma 3 reads hidden_activation only (its hidden_act is ignored by transformers too).
    act_key = "hidden_activation" if gemma else "hidden_act"
    act = ACTIVATIONS[r.only(act_key, tuple(ACTIVATIONS), "gelu_pytorch_tanh" if gemma else "silu")]
    r.used.update({"hidden_act", "hidden_activation"})
    eps = float(r.get("rms_norm_eps", 1e-6))

    # Sliding windows and RoPE kinds per block.
    layer_types = r.get("layer_types")
    if layer_types is None:
        if gemma:
            pattern = r.get("sliding_window_pattern", 6)
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
        else:
            layer_types = ["full_attention"] * L
    r.used.update({"sliding_window_pattern", "_sliding_window_pattern"})
    if len(layer_types) != L or any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise ConfigError(f"--hf: {r.where}: layer_types={layer_types!r} must list {L} of "
                          f"'full_attention' / 'sliding_attention'")
    window = r.get("sliding_window")
    if family == "qwen2" or family == "qwen3":
        if r.get("use_sliding_window", False):
            raise ConfigError(f"--hf: {r.where}: use_sliding_window=True is not supported")
        window = None
        r.used.add("sliding_window")
    if model_type == "llama":  # transformers' Llama has no sliding windows, whatever the config says
        layer_types, window = ["full_attention"] * L, None
    if model_type == "mistral":  # every layer slides when a window is set
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * L
    if "sliding_attention" in layer_types and not (isinstance(window, int) and window >= 1):
        raise ConfigError(f"--hf: {r.where}: sliding layers need a positive sliding_window, got {window!r}")
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
    if gemma and r.get("use_bidirectional_attention", False):
        raise ConfigError(f"--hf: {r.where}: use_bidirectional_attention=True is not supported")

    if gemma:
        kinds = sorted(set(layer_types))
        tables = tuple(rope_inv_freq(_rope_params(r, t), E, r.where) for t in kinds)
        rope_of_layer = tuple(kinds.index(t) for t in layer_types)
    else:
        tables = (rope_inv_freq(_rope_params(r), E, r.where),)
        rope_of_layer = (0,) * L
    r.used.update({"rope_parameters", "rope_theta", "rope_scaling", "rope_local_base_freq"})

    # Biases as each family's modeling code builds them: Qwen 2 always has q/k/v biases and no
    # o bias; Llama, Qwen 3 and Gemma 3 follow attention_bias; Mistral has none; only Llama
    # reads mlp_bias.
    attention_bias = bool(r.get("attention_bias", False))
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = attention_bias
    mlp_bias = bool(r.get("mlp_bias", False)) and model_type == "llama"
    spec = Spec(
        model_type, family, vocab=r.need("vocab_size"), width=D, layers=L, heads=H, kv_heads=K, head_dim=int(E),
        mlp_width=r.need("intermediate_size"), context=int(r.get("max_position_embeddings")),
        norm="rmsnorm_plus1" if gemma else "rmsnorm", norm_eps=eps, act=act, gated=True, positions="rope",
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
        qk_norm=family in ("qwen3", "gemma3"), sandwich=gemma,
        embed_scale=math.sqrt(D) if gemma else None,
        attn_scale=float(r.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else 1.0 / math.sqrt(E),
        # transformers reads but never applies attn_logit_softcapping in Gemma 3 (qk-norm replaced it)
        attn_softcap=None,
        final_softcap=_softcap(r, "final_logit_softcapping") if gemma else None,
        tied=bool(r.get("tie_word_embeddings", gemma)), windows=windows, rope_of_layer=rope_of_layer,
        rope_tables=tables,
    )
    r.used.update({"attn_logit_softcapping", "query_pre_attn_scalar", "attention_bias", "mlp_bias", "use_bidirectional_attention",
                   "sliding_window", "layer_types", "use_sliding_window", "max_position_embeddings"})
    r.refuse_unread(IGNORED)
    return spec


def _softcap(r: _Reader, key: str):
    value = r.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"--hf: {r.where}: {key} must be positive or null, got {value!r}")
    return float(value)


def load_spec(folder) -> Spec:
    """The Spec of a model folder's config.json."""
    path = Path(folder) / "config.json"
    return spec_from_config(read_config(folder), str(path))
