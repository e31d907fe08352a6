"""Pretrained transformers read from a local Hugging Face folder (no download, no torch).

- `config`: config.json -> `Spec` (GPT-2, Llama 2/3, Mistral, Qwen 2, Qwen 3, Gemma 3);
  fields that change the maths and are not implemented are refused by name;
- `checkpoint`: a memory-mapped safetensors reader (single file or sharded index; bfloat16);
- `model`: one NNX `Decoder` for every family, cut at any layer, with the prefix-cached and
  key/value-cached steering closures the kernel consumes;
- `load`: the folder's tensors into a `Decoder`; `shard`: the weights over a device mesh;
- `tokenizer`: tokenizer.json through the `tokenizers` package.
"""

from ufmjax.models.hf.checkpoint import Checkpoint, CheckpointError
from ufmjax.models.hf.config import FAMILIES, ConfigError, Spec, load_spec, spec_from_config
from ufmjax.models.hf.load import load_decoder
from ufmjax.models.hf.model import (
    Decoder,
    hidden_states,
    limit_logits,
    logits,
    pad_prompts,
    residual_norms,
    steered_closure,
    steered_logits_full,
    token_mean_residual,
)
from ufmjax.models.hf.shard import model_mesh, sharded_put

__all__ = [
    "FAMILIES", "Checkpoint", "CheckpointError", "ConfigError", "Decoder", "Spec", "hidden_states",
    "limit_logits", "load_decoder", "load_spec", "logits", "model_mesh", "pad_prompts", "residual_norms", "sharded_put",
    "spec_from_config", "steered_closure", "steered_logits_full", "token_mean_residual",
]
