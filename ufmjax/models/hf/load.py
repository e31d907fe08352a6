"""A Hugging Face model folder (config.json, safetensors weights, tokenizer.json) as a `Decoder`.

Tensors are read one at a time from the memory-mapped checkpoint (`checkpoint.Checkpoint`),
turned into device arrays (sharded over a mesh when one is given) and released, so host
memory while loading stays about the checkpoint's size. Every tensor the family needs must
be present with the shape the config implies; a tensor of the language model that nothing
reads is refused by name too (it would be a part of the model silently left out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ufmjax.models.hf.checkpoint import Checkpoint, CheckpointError
from ufmjax.models.hf.config import Spec, load_spec
from ufmjax.models.hf.model import Decoder

# Buffers some checkpoints carry that are not parameters of the forward pass.
BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _prefix(ck: Checkpoint, suffix: str) -> str:
    hits = [n for n in ck.names() if n.endswith(suffix)]
    if not hits:
        raise CheckpointError(f"--hf: no tensor named *{suffix} in {ck.folder} (is this the model's folder?)")
    return min(hits, key=len)[: -len(suffix)]


def _names_gpt2(spec: Spec, p: str) -> dict:
    """ufmjax weight -> (tensor name, transform) for GPT-2 (Conv1D weights are [in, out])."""
    D = spec.width
    out = {"embed": (p + "wte.weight", None), "pos_embed": (p + "wpe.weight", None),
           "final_w": (p + "ln_f.weight", None), "final_b": (p + "ln_f.bias", None), "blocks": []}
    for i in range(spec.layers):
        b = f"{p}h.{i}."
        blk = {"ln1_w": (b + "ln_1.weight", None), "ln1_b": (b + "ln_1.bias", None),
               "ln2_w": (b + "ln_2.weight", None), "ln2_b": (b + "ln_2.bias", None),
               "o_w": (b + "attn.c_proj.weight", "T"), "o_b": (b + "attn.c_proj.bias", None),
               "up_w": (b + "mlp.c_fc.weight", "T"), "up_b": (b + "mlp.c_fc.bias", None),
               "down_w": (b + "mlp.c_proj.weight", "T"), "down_b": (b + "mlp.c_proj.bias", None)}
        for j, name in enumerate("qkv"):
            blk[f"{name}_w"] = (b + "attn.c_attn.weight", ("Tslice", j * D, (j + 1) * D))
            blk[f"{name}_b"] = (b + "attn.c_attn.bias", ("slice", j * D, (j + 1) * D))
        out["blocks"].append(blk)
    return out


def _names_rope(spec: Spec, p: str) -> dict:
    out = {"embed": (p + "embed_tokens.weight", None), "final_w": (p + "norm.weight", None), "blocks": []}
    for i in range(spec.layers):
        b = f"{p}layers.{i}."
        blk = {"ln1_w": (b + "input_layernorm.weight", None)}
        if spec.sandwich:
            blk.update(post_attn_w=(b + "post_attention_layernorm.weight", None),
                       ln2_w=(b + "pre_feedforward_layernorm.weight", None),
                       post_ffn_w=(b + "post_feedforward_layernorm.weight", None))
        else:
            blk["ln2_w"] = (b + "post_attention_layernorm.weight", None)
        for name in "qkvo":
            blk[f"{name}_w"] = (b + f"self_attn.{name}_proj.weight", None)
        if spec.qkv_bias:
            for name in "qkv":
                blk[f"{name}_b"] = (b + f"self_attn.{name}_proj.bias", None)
        if spec.o_bias:
            blk["o_b"] = (b + "self_attn.o_proj.bias", None)
        if spec.qk_norm:
            blk.update(q_norm=(b + "self_attn.q_norm.weight", None), k_norm=(b + "self_attn.k_norm.weight", None))
        for name in ("gate", "up", "down"):
            blk[f"{name}_w"] = (b + f"mlp.{name}_proj.weight", None)
            if spec.mlp_bias:
                blk[f"{name}_b"] = (b + f"mlp.{name}_proj.bias", None)
        out["blocks"].append(blk)
    return out


def expected_shapes(spec: Spec) -> dict:
    """ufmjax weight name -> the shape it must have (after any transform)."""
    D, F, V, E = spec.width, spec.mlp_width, spec.vocab, spec.head_dim
    HE, KE = spec.heads * E, spec.kv_heads * E
    top = {"embed": (V, D), "pos_embed": (spec.context, D), "final_w": (D,), "final_b": (D,), "head_w": (V, D)}
    blk = {"ln1_w": (D,), "ln1_b": (D,), "ln2_w": (D,), "ln2_b": (D,), "post_attn_w": (D,), "post_ffn_w": (D,),
           "q_w": (HE, D), "q_b": (HE,), "k_w": (KE, D), "k_b": (KE,), "v_w": (KE, D), "v_b": (KE,),
           "o_w": (D, HE), "o_b": (D,), "q_norm": (E,), "k_norm": (E,), "gate_w": (F, D), "gate_b": (F,),
           "up_w": (F, D), "up_b": (F,), "down_w": (D, F), "down_b": (D,)}
    return {"top": top, "block": blk}


def _read(ck: Checkpoint, name: str, key: str, transform, shape, dtype, put):
    x = ck.read(name, dtype)
    if transform == "T":
        x = np.ascontiguousarray(x.T)
    elif transform is not None:
        kind, lo, hi = transform
        x = np.ascontiguousarray(x[:, lo:hi].T) if kind == "Tslice" else np.ascontiguousarray(x[lo:hi])
    if x.shape != tuple(shape):
        raise CheckpointError(f"--hf: tensor {name} in {ck.file_of(name).name} has shape {x.shape}, "
                              f"the config implies {tuple(shape)}")
    return put(x, key)


def load_decoder(folder, dtype: str | None = None, put=None) -> Decoder:
    """The Decoder of a model folder, weights in the checkpoint's dtype (or `dtype`).

    Args:
      folder: a folder holding config.json and model.safetensors (or a sharded index).
      dtype: None (keep the checkpoint's dtype) or one of float32, float16, bfloat16, float64.
      put: (numpy array, ufmjax weight name) -> device array (default: jax.device_put;
        `models.hf.shard.sharded_put(mesh)` lays each weight out over a device mesh).
    """
    import jax

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    folder = Path(folder)
    spec = load_spec(folder)
    put = put or (lambda x, key: jax.device_put(x))
    try:
        ck = Checkpoint(folder)
    except CheckpointError as e:  # name the option: the reader only knows files
        raise CheckpointError(f"--hf: {e}") from None
    with ck:
        names = _names_gpt2(spec, _prefix(ck, "wte.weight")) if spec.family == "gpt2" else \
            _names_rope(spec, _prefix(ck, "embed_tokens.weight"))
        if not spec.tied:
            names["head_w"] = (_prefix(ck, "lm_head.weight") + "lm_head.weight", None)
        shapes = expected_shapes(spec)
        used = set()

        def read(key, entry, table):
            name, transform = entry
            if name not in ck:
                raise CheckpointError(f"--hf: tensor {name} is missing from {ck.folder} (needed for {spec.model_type})")
            used.add(name)
            return _read(ck, name, key, transform, shapes[table][key], dtype, put)

        weights = {k: read(k, e, "top") for k, e in names.items() if k != "blocks"}
        weights["blocks"] = [{k: read(k, e, "block") for k, e in blk.items()} for blk in names["blocks"]]
        root = names["embed"][0].rsplit("wte.weight" if spec.family == "gpt2" else "embed_tokens.weight", 1)[0]
        extra = [n for n in ck.names() if n not in used and n.startswith(root) and not n.endswith(BUFFERS)
                 and not n.endswith("lm_head.weight")]
        if extra:
            raise CheckpointError(f"--hf: {len(extra)} tensors of {ck.folder} are not part of the {spec.model_type} "
                                  f"model ufmjax implements (e.g. {', '.join(extra[:3])})")
    return Decoder(spec, weights)
