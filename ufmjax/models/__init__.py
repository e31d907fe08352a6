"""The steered models: each builds the `Steered` closure the kernel consumes.

- `ufm`: the Unconstrained Features Model (Def. 2.2), affine in alpha (Lemma B.2);
- `gpt`: a small pre-norm decoder-only GPT cut at any layer, with prefix-cached closures.
"""

from ufmjax.models.gpt import (
    GPT,
    GPTConfig,
    check_layer,
    check_positions,
    init_gpt,
    steered_closure,
    steered_logits_full,
)
from ufmjax.models.ufm import UFM, UFMConfig, expected_ce, ufm_logits, ufm_loss, ufm_steered, ufm_steering_vector

__all__ = [
    "GPT", "GPTConfig", "UFM", "UFMConfig", "check_layer", "check_positions", "expected_ce", "init_gpt",
    "steered_closure", "steered_logits_full", "ufm_logits", "ufm_loss", "ufm_steered", "ufm_steering_vector",
]
