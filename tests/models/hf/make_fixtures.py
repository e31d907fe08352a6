"""Tiny random Hugging Face checkpoints with transformers' own reference outputs.

Builds, for each variant in ``VARIANTS``, a tiny randomly initialised causal LM
with transformers' own config and model classes (no download: HF_HUB_OFFLINE=1),
saves it with ``save_pretrained`` (config.json + model.safetensors), saves a
byte-level BPE tokenizer trained here on prose written in this file
(tokenizer.json), and records transformers' outputs in ``reference.npz``.

    python tests/models/hf/make_fixtures.py [--out tests/fixtures/hf] [--variants a,b]

Everything is seeded; a rerun reproduces the same files (the live test
regenerates them in a tmp dir and compares).

Initialisation (``_randomise``, after transformers' own init): every matrix and
embedding ~ N(0, 0.2^2); every bias ~ N(0, 0.1^2); norm weights 1 + 0.1 N(0, 1)
(Gemma 3, whose RMSNorm multiplies by (1 + w): w ~ 0.1 N(0, 1)); LayerNorm
biases 0.1 N(0, 1).  config.initializer_range is 0.2 to match.  Vocabulary 256
rows, tokenizer 250 tokens (ids 250..255 are never produced).

reference.npz (float32 unless said):
  num_prompts; prompt_<i> int32 ids (BOS included where the tokenizer adds it);
  prompt_text_<i> 0-d str; logits_<i> [T, V]; hidden_<i> [L+1, T, D] (row l < L
  the input of block l, row 0 the embedding output (Gemma 3: already times
  sqrt(D)), row L the output of the last block BEFORE the final norm);
  vector [D]; alphas [-8, -1, 0, 0.5, 4]; steer_layers int32 [0, max(1, L//2), L];
  steered_all_<i> / steered_last_<i> [n_layers, A, V] float64 softmax of the
  last position's logits with alpha*v added to the residual at layer l at every
  position / at the last position only (layer l < L: pre-hook on block l;
  layer L: forward hook on the last block's output); llama_bf16 only:
  logits_f32weights_<i>; meta_json 0-d str (variant, versions, and facts
  measured on this transformers: sliding-window keys seen by a query, whether
  Gemma 3's attn_logit_softcapping changes the output).

Rope fields as transformers 5.24 writes them into config.json (v5 moved
``rope_theta``/``rope_scaling`` into ``rope_parameters``; GPT-2 has none, it
uses learned ``wpe`` position embeddings):
  llama, llama_bf16, mistral, qwen2, qwen3:
      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
  llama3_tied:
      "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0,
                          "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 64,
                          "rope_theta": 500000.0, "rope_type": "llama3"}
  gemma3 (per layer type; the local base freq lives in "sliding_attention"):
      "rope_parameters": {"full_attention": {"factor": 2.0, "rope_theta": 1000000.0,
                                             "rope_type": "linear"},
                          "sliding_attention": {"rope_theta": 10000.0,
                                                "rope_type": "default"}}
The dtype is written as "dtype" ("float32"; "bfloat16" for llama_bf16).
``save_pretrained`` in v5 always writes safetensors (the safe_serialization
argument is gone) plus a generation_config.json; tied heads are not stored (no
lm_head.weight in gpt2, llama3_tied, qwen2, gemma3).  GPT-2 keys are
"transformer.*" (Conv1D weights [in, out], c_attn = q|k|v along out); the
others "model.*" + "lm_head.weight".
gemma3_mm (Gemma3ForConditionalGeneration, text settings of gemma3, a 1-layer
SigLIP tower of width 16, 28 x 28 images of 14 x 14 patches, 4 tokens per image,
boi/eoi/image ids 250/251/252): config.json has model_type "gemma3" with nested
"text_config" (model_type "gemma3_text") and "vision_config"
("siglip_vision_model"); save_pretrained writes the original checkpoint names
(not the in-memory "model.language_model.*"): "language_model.model.*",
"vision_tower.*" (no "vision_model." level), "multi_modal_projector.*"; no
lm_head (tied).  Its reference is text only (input_ids, no pixel_values), hooks
on model.model.language_model.layers.  The wrapper's forward applies NO final
soft-capping although text_config holds final_logit_softcapping (meta
"final_logit_softcapping_active", this variant only).

What transformers 5.24 does in these forwards (eager, checked here or in meta):
  * decoder blocks return a plain tensor, not a tuple;
    output_hidden_states[L] is the final-normed state, hence the hook for row L.
  * sliding window w (mistral: every layer; gemma3: "sliding_attention" layers):
    query q sees keys k with q - w < k <= q, i.e. exactly w keys incl. itself.
  * Gemma 3: embed_scale = torch.tensor(sqrt(D)) (float32), cast to the weight
    dtype and multiplied after the lookup; RMSNorm x*rsqrt(mean(x^2)+eps) in
    float32 times (1 + w) in float32, then cast back; q_norm/k_norm (per head,
    before rope); sandwich norms (post_attention / pre_ and post_feedforward);
    scaling query_pre_attn_scalar**-0.5; final_logit_softcapping applied;
    attn_logit_softcapping is NOT applied (Gemma3Attention never passes softcap
    to the attention function), measured as meta "attn_logit_softcapping_active".
  * Llama/Mistral/Qwen RMSNorm: normalise in float32, cast to the input dtype,
    then multiply by w; Qwen3 q_norm/k_norm are such norms over head_dim.
  * gelu_new: 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))) in Python ops;
    gelu_pytorch_tanh: torch.nn.functional.gelu(x, approximate="tanh").
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import zipfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "hf"

VOCAB = 256  # embedding rows
TOKENIZER_VOCAB = 250  # trained tokenizer size (< VOCAB on purpose)
MAX_POS = 64
STD = 0.2  # matrices and embeddings
BIAS_STD = 0.1
NORM_STD = 0.1
ALPHAS = np.array([-8.0, -1.0, 0.0, 0.5, 4.0], dtype=np.float32)
BOS = "<s>"
EOS = "</s>"
GPT2_EOT = "<|endoftext|>"

# 3, 7 and 12 tokens with the BOS of the llama-like tokenizers (2, 6, 11 for GPT-2).
PROMPT_TEXTS = (
    "The river",
    "Old boats drift",
    "Quinn thinks the mill is old.",
)

_COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POS,
    initializer_range=STD,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    attn_implementation="eager",
)

_GEMMA3_TEXT = dict(
    **_COMMON,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,  # != head_dim, so a head_dim**-0.5 scaling would be caught
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    sliding_window=4,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
    tie_word_embeddings=True,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
    },
)

VARIANTS: dict[str, dict] = {
    "gpt2": dict(
        model="GPT2LMHeadModel",
        config="GPT2Config",
        seed=11,
        bos=False,
        kwargs=dict(
            vocab_size=VOCAB,
            n_positions=MAX_POS,
            n_embd=32,
            n_layer=2,
            n_head=4,
            activation_function="gelu_new",
            initializer_range=STD,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=True,
            attn_implementation="eager",
        ),
    ),
    "llama": dict(
        model="LlamaForCausalLM",
        config="LlamaConfig",
        seed=12,
        bos=True,
        kwargs=dict(
            **_COMMON,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "llama3_tied": dict(
        model="LlamaForCausalLM",
        config="LlamaConfig",
        seed=13,
        bos=True,
        kwargs=dict(
            **_COMMON,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,  # with original_max_position_embeddings 64: all three llama3 branches
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": dict(
        model="MistralForCausalLM",
        config="MistralConfig",
        seed=14,
        bos=True,
        kwargs=dict(
            **_COMMON,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            sliding_window=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "qwen2": dict(
        model="Qwen2ForCausalLM",
        config="Qwen2Config",
        seed=15,
        bos=True,
        kwargs=dict(
            **_COMMON,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "qwen3": dict(
        model="Qwen3ForCausalLM",
        config="Qwen3Config",
        seed=16,
        bos=True,
        kwargs=dict(
            **_COMMON,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "gemma3": dict(
        model="Gemma3ForCausalLM",
        config="Gemma3TextConfig",
        seed=17,
        bos=True,
        kwargs=_GEMMA3_TEXT,
    ),
    # The multimodal wrapper Gemma 3 4B ships as (Gemma3ForConditionalGeneration: a SigLIP vision
    # tower, a projector and the language model under "model.language_model."), with gemma3's
    # text settings; the reference is text only (input_ids, no pixel_values).
    "gemma3_mm": dict(
        model="Gemma3ForConditionalGeneration",
        config="Gemma3Config",
        seed=18,
        bos=True,
        kwargs=dict(
            # image ids inside the 256 rows, above the tokenizer's 250 (never produced here)
            boi_token_index=250,
            eoi_token_index=251,
            image_token_index=252,
            mm_tokens_per_image=4,  # 2 x 2 tokens per side: (28 / 14) patches per side, pooled by 1
            initializer_range=STD,
            tie_word_embeddings=True,
            attn_implementation="eager",
        ),
        text_config=("Gemma3TextConfig", _GEMMA3_TEXT),
        vision_config=(
            "SiglipVisionConfig",
            dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
                vision_use_head=False,  # as Gemma 3's SigLIP: no pooling head
                attn_implementation="eager",
            ),
        ),
    ),
    # The llama model (same seed) rounded to bfloat16 and saved as bfloat16.
    "llama_bf16": dict(base="llama", bf16=True),
}

CORPUS = """\
The river bends twice before it reaches the mill, and in late summer the water
runs so low that the children can cross it on the flat grey stones. Nobody
remembers who laid those stones. Some say a farmer set them there to drive his
sheep to the far meadow; others say the river itself sorted them, one flood at
a time, until they made a path that only looks deliberate.

At dusk the baker sets warm bread on the wide stone sill of her window to cool.
She claims the loaves taste better when the evening air has touched them, and
although her neighbours laugh, they still walk past slowly, breathing in. Old
boats drift past the mill with their sails folded, carrying apples, salt, wool
and letters from the towns further down the valley.

Jack, Quinn and Zoe keep a notebook of everything that floats by: 3 ducks, 12
leaves, 7 bottles, 1 hat, 45 sticks, 6 feathers, 89 seeds, 0 fish. Why count
them? Because, Zoe says, a river that is counted is a river that is known. Quinn
thinks that is nonsense; Jack just writes the numbers down (neatly, in pencil)
and asks for the next one.

In winter the mill wheel freezes and the valley goes quiet. Snow gathers on the
roofs, the bridge, the fence posts, the backs of patient cows. Then, one grey
morning in March, the ice cracks with a sound like a door slamming far away,
and the water starts moving again, just as it always has, just as it always will.
"""


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB, *, bos: bool = True):
    """A byte-level BPE of ``vocab_size`` tokens trained on ``CORPUS``.

    With ``bos`` (the llama-like families) the specials are "<s>" (id 0) and
    "</s>" (id 1) and a TemplateProcessing post-processor prepends "<s>";
    without (GPT-2) the only special is "<|endoftext|>" (id 0) and nothing is
    added.  The alphabet is the bytes that occur in CORPUS (no 256-byte initial
    alphabet, so that 250 tokens suffice): a character outside it is dropped.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS] if bos else [GPT2_EOT]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False, min_frequency=1
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


# --------------------------------------------------------------------------- model


def _is_norm(module) -> bool:
    import torch

    return isinstance(module, torch.nn.LayerNorm) or "RMSNorm" in type(module).__name__


def _randomise(model, seed: int, gemma: bool) -> None:
    """Overwrite every parameter from a generator seeded with ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                p.copy_(BIAS_STD * noise)
            elif _is_norm(owner):
                plus_one = gemma and "RMSNorm" in type(owner).__name__  # Gemma3RMSNorm: (1 + w)
                p.copy_(NORM_STD * noise if plus_one else 1.0 + NORM_STD * noise)
            else:
                p.copy_(STD * noise)


def _make_model(spec: dict):
    import torch
    import transformers

    torch.manual_seed(spec["seed"])
    subs = {key: getattr(transformers, spec[key][0])(**spec[key][1])
            for key in ("text_config", "vision_config") if key in spec}
    cfg = getattr(transformers, spec["config"])(**spec["kwargs"], **subs)
    cfg.dtype = torch.float32
    model = getattr(transformers, spec["model"])(cfg).to(torch.float32)
    _randomise(model, spec["seed"], gemma=spec["model"].startswith("Gemma3"))
    model.config._attn_implementation = "eager"
    for sub in subs.values():
        sub._attn_implementation = "eager"
    model.eval()
    return model


def _text_config(model):
    """The language model's config (the multimodal Gemma 3 nests it as text_config)."""
    return model.config.text_config if hasattr(model.config, "text_config") else model.config


def _lm(model):
    """The decoder stack: model.model, or (multimodal Gemma 3) model.model.language_model."""
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else _lm(model).layers


def _final_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else _lm(model).norm


def _head(model, h):
    """Final norm, lm head and (Gemma 3) final soft-capping applied to ``h``."""
    import torch

    logits = model.lm_head(_final_norm(model)(h))
    # Gemma3ForConditionalGeneration's config has no such field, and its forward applies none
    # (measured as meta "final_logit_softcapping_active"; the check against logits in _reference).
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _inputs_embeds(model, ids):
    """What ``model(input_ids=ids)`` computes as ``inputs_embeds`` (GPT-2: wte only, the
    model adds wpe after; Gemma 3: already times sqrt(D))."""
    if hasattr(model, "transformer"):
        return model.transformer.wte(ids)
    return _lm(model).embed_tokens(ids)


# --------------------------------------------------------------------------- hooks


def _with_hidden(args, kwargs, fn):
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


def _steer_hook(model, layer: int, delta, last_only: bool):
    """Register a hook adding ``delta`` [D] at layer ``layer``; return the handle."""
    blocks = _blocks(model)
    L = len(blocks)

    def add(h):
        if last_only:
            h = h.clone()
            h[:, -1, :] = h[:, -1, :] + delta
            return h
        return h + delta

    if layer < L:
        return blocks[layer].register_forward_pre_hook(
            lambda m, a, k: _with_hidden(a, k, add), with_kwargs=True
        )

    def post(m, a, out):
        if isinstance(out, tuple):
            return (add(out[0]), *out[1:])
        return add(out)

    return blocks[L - 1].register_forward_hook(post)


def _forward(model, ids):
    """Logits [T, V] and the [L+1, T, D] residual stream (row L before the final norm)."""
    import torch

    blocks = _blocks(model)
    L = len(blocks)
    rows: list = [None] * (L + 1)
    handles = []
    for l, blk in enumerate(blocks):

        def pre(m, a, k, l=l):
            rows[l] = (a[0] if a else k["hidden_states"]).detach().clone()

        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))

    def post(m, a, out):
        rows[L] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handles.append(blocks[L - 1].register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == L + 1
    for l in range(L):  # rows l < L are transformers' own output_hidden_states[l]
        torch.testing.assert_close(rows[l], hs[l], rtol=0, atol=0)
    return out.logits[0], torch.stack([r[0] for r in rows])


def _last_probs(model, ids):
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


def _steered(model, ids, vector, layers, last_only: bool) -> np.ndarray:
    out = np.zeros((len(layers), len(ALPHAS), _text_config(model).vocab_size), dtype=np.float64)
    for a, layer in enumerate(layers):
        for b, alpha in enumerate(ALPHAS):
            handle = _steer_hook(model, int(layer), float(alpha) * vector, last_only)
            try:
                out[a, b] = _last_probs(model, ids).numpy()
            finally:
                handle.remove()
    return out


# --------------------------------------------------------------------------- facts


def _sliding_keys_seen(model, ids) -> int | None:
    """How many keys the last query of a sliding layer may attend to (eager mask)."""
    import torch

    window = getattr(_text_config(model), "sliding_window", None)
    types = getattr(_text_config(model), "layer_types", None)
    if window is None:
        return None
    idx = types.index("sliding_attention") if types else 0
    seen = {}

    def grab(m, a, k):
        seen["mask"] = k.get("attention_mask")

    h = _blocks(model)[idx].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    mask = seen["mask"]
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return int(allowed[0, 0, -1].sum())


def _attn_softcap_active(model, ids) -> bool | None:
    """Whether changing attn_logit_softcapping (to 0.5) changes Gemma 3's logits."""
    import torch

    config = _text_config(model)
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap is None:
        return None
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        for m in model.modules():
            if hasattr(m, "attn_logit_softcapping"):
                m.attn_logit_softcapping = 0.5
        config.attn_logit_softcapping = 0.5
        try:
            new = model(input_ids=ids, use_cache=False).logits
        finally:
            for m in model.modules():
                if hasattr(m, "attn_logit_softcapping"):
                    m.attn_logit_softcapping = cap
            config.attn_logit_softcapping = cap
    return not torch.equal(ref, new)


def _final_softcap_active(model, ids) -> bool | None:
    """Whether changing the text config's final_logit_softcapping (to 0.5) changes the logits
    (asked of the multimodal Gemma 3 only: its forward never reads it in transformers 5.24)."""
    import torch

    config = _text_config(model)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return None
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        config.final_logit_softcapping = 0.5
        try:
            new = model(input_ids=ids, use_cache=False).logits
        finally:
            config.final_logit_softcapping = cap
    return not torch.equal(ref, new)


def _check_image_path(model) -> None:
    """Multimodal only: an image prompt runs (so the vision settings are consistent) and changes
    the logits; the reference itself is text only."""
    import torch

    cfg = model.config
    n = cfg.mm_tokens_per_image
    ids = torch.tensor([[0, 5, cfg.boi_token_index] + [cfg.image_token_index] * n + [cfg.eoi_token_index, 7]])
    size = cfg.vision_config.image_size
    pixels = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        assert feats.shape == (1, n, cfg.text_config.hidden_size), feats.shape
        text = model(input_ids=ids, use_cache=False).logits
        image = model(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == cfg.image_token_index).long(),
                      use_cache=False).logits
    assert not torch.allclose(text[0, -1], image[0, -1])


# --------------------------------------------------------------------------- build


def _reference(model, tok, name: str, extra_models: dict | None = None) -> dict:
    import tokenizers
    import torch
    import transformers

    L = len(_blocks(model))
    D = _text_config(model).hidden_size
    V = _text_config(model).vocab_size
    layers = np.array([0, max(1, L // 2), L], dtype=np.int32)
    ref: dict = {"num_prompts": np.array(len(PROMPT_TEXTS)), "alphas": ALPHAS, "steer_layers": layers}
    prompts = []
    for i, text in enumerate(PROMPT_TEXTS):
        enc = tok.encode(text)
        assert tok.decode(enc.ids, skip_special_tokens=True) == text, (text, enc.tokens)
        prompts.append(torch.tensor([enc.ids], dtype=torch.long))
        ref[f"prompt_{i}"] = np.array(enc.ids, dtype=np.int32)
        ref[f"prompt_text_{i}"] = np.array(text)
    lengths = [p.shape[1] for p in prompts]
    window = getattr(_text_config(model), "sliding_window", None) or 4
    assert lengths == sorted(set(lengths)) and lengths[-1] > window + 1, lengths

    hiddens = []
    for i, ids in enumerate(prompts):
        logits, hidden = _forward(model, ids)
        with torch.no_grad():
            again = _head(model, hidden[L][None])[0]
        torch.testing.assert_close(again, logits, rtol=0, atol=1e-4)  # row L is pre-norm
        assert hidden.shape == (L + 1, ids.shape[1], D) and logits.shape == (ids.shape[1], V)
        ref[f"logits_{i}"] = logits.numpy().astype(np.float32)
        ref[f"hidden_{i}"] = hidden.numpy().astype(np.float32)
        hiddens.append(hidden)
        for key, other in (extra_models or {}).items():
            with torch.no_grad():
                ref[f"{key}_{i}"] = other(input_ids=ids, use_cache=False).logits[0].numpy().astype(np.float32)

    gen = torch.Generator().manual_seed(1000 + sum(map(ord, name)))
    v = torch.randn(D, generator=gen, dtype=torch.float32)
    target = hiddens[0][1].norm(dim=-1).mean()
    vector = (v * (target / v.norm())).to(torch.float32)
    ref["vector"] = vector.numpy()

    # Layer 0's pre-hook is the same as adding to the embedding output.
    with torch.no_grad():
        emb = _inputs_embeds(model, prompts[1])
        direct = model(inputs_embeds=emb + 4.0 * vector, use_cache=False).logits[0, -1]
    hook0 = _steered(model, prompts[1], vector, [0], last_only=False)[0, -1]
    np.testing.assert_allclose(hook0, torch.softmax(direct.double(), -1).numpy(), rtol=0, atol=1e-6)

    for i, ids in enumerate(prompts):
        base = torch.softmax(torch.from_numpy(ref[f"logits_{i}"][-1]).double(), -1).numpy()
        for kind, last_only in (("all", False), ("last", True)):
            probs = _steered(model, ids, vector, layers, last_only)
            zero = int(np.flatnonzero(ALPHAS == 0)[0])
            np.testing.assert_allclose(probs[:, zero], np.broadcast_to(base, probs[:, zero].shape), atol=1e-6)
            assert np.all(np.abs(probs[:, -1] - base).max(axis=-1) > 1e-3), (name, kind, i)
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-9)
            ref[f"steered_{kind}_{i}"] = probs
    # Every position vs last position only: they differ at layer 0 (through attention); at
    # layer L (after the last block) they coincide, since nothing mixes positions any more.
    assert not np.allclose(ref["steered_all_2"][0], ref["steered_last_2"][0])

    meta = {
        "variant": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "prompt_lengths": lengths,
        "sliding_window_keys_seen": _sliding_keys_seen(model, prompts[-1]),
        "attn_logit_softcapping_active": _attn_softcap_active(model, prompts[-1]),
    }
    if hasattr(model.config, "text_config"):  # multimodal Gemma 3 only (the others' meta unchanged)
        meta["final_logit_softcapping_active"] = _final_softcap_active(model, prompts[-1])
    ref["meta_json"] = np.array(json.dumps(meta, sort_keys=True))
    return ref


def _check_reload(out: Path, ref: dict, cls: str | None = None) -> None:
    """The saved checkpoint, reloaded by transformers in float32, reproduces the logits
    (AutoModelForCausalLM, which also maps model_type "gemma3" to the multimodal class; with
    ``cls`` that class is required)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert cls is None or type(model).__name__ == cls, type(model).__name__
    for i in range(int(ref["num_prompts"])):
        ids = torch.from_numpy(ref[f"prompt_{i}"].astype(np.int64))[None]
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0].numpy()
        np.testing.assert_allclose(logits, ref[f"logits_{i}"], rtol=0, atol=1e-5)


def _savez(path: Path, arrays: dict) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def build(variant: str, out_dir) -> Path:
    """Build ``variant`` into ``out_dir`` (created); return ``out_dir`` as a Path."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(variant, Path(out_dir))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(variant: str, out: Path) -> Path:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = VARIANTS[variant]
    out.mkdir(parents=True, exist_ok=True)
    bf16 = spec.get("bf16", False)
    base_spec = VARIANTS[spec["base"]] if "base" in spec else spec
    model = _make_model(base_spec)
    tok = build_tokenizer(TOKENIZER_VOCAB, bos=base_spec["bos"])
    extra = None
    if bf16:
        f32 = model
        model = _make_model(base_spec)
        with torch.no_grad():  # round the parameters only: buffers (rope inv_freq) stay float32
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        saved = copy.deepcopy(model).to(torch.bfloat16)
        saved.config.dtype = torch.bfloat16
        saved.save_pretrained(out)
        extra = {"logits_f32weights": f32}
    else:
        model.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    tok.save(str(out / "tokenizer.json"))
    if "vision_config" in base_spec:
        _check_image_path(model)
    ref = _reference(model, tok, variant, extra)
    _check_reload(out, ref, base_spec["model"] if "vision_config" in base_spec else None)
    _savez(out / "reference.npz", ref)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder to hold one folder per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    for name in names:
        path = build(name, Path(args.out) / name)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{name}: {path} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
