"""config.json -> Spec: what is refused (by name), what is accepted, and equivalent spellings.

Every case starts from a committed fixture's config.json (as transformers 5.24 wrote it) and
changes one thing, so a refusal is caused by that one field and nothing else.
"""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from ufmjax.models.hf.config import ConfigError, Spec, load_spec, read_config, spec_from_config

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hf"


def fixture_config(variant: str) -> dict:
    return json.loads((FIXTURES / variant / "config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("variant", ["gpt2", "llama", "llama3_tied", "mistral", "qwen2", "qwen3", "gemma3",
                                     "gemma3_mm", "llama_bf16"])
def test_every_fixture_config_is_accepted(variant):
    spec = load_spec(FIXTURES / variant)
    assert isinstance(spec, Spec)
    assert spec.vocab == 256
    assert spec == spec_from_config(fixture_config(variant))
    hash(spec)  # it keys the compiled closures


# ---------------------------------------------------------------- refusals, each naming its field

def _with(variant, **changes):
    cfg = copy.deepcopy(fixture_config(variant))
    cfg.update(changes)
    return cfg


def _rope(variant, **changes):
    cfg = copy.deepcopy(fixture_config(variant))
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **changes}
    return cfg


REFUSALS = {
    # rope types other than default / linear / llama3
    "rope_yarn": (_rope("llama", rope_type="yarn", factor=4.0), "yarn"),
    "rope_dynamic": (_rope("llama", rope_type="dynamic", factor=2.0), "dynamic"),
    "rope_longrope": (_rope("llama", rope_type="longrope"), "longrope"),
    "rope_v4_yarn": (_with("llama", rope_parameters=None, rope_theta=10000.0,
                           rope_scaling={"type": "yarn", "factor": 4.0}), "yarn"),
    "gemma_rope_yarn": (_with("gemma3", rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "yarn"),
    # partial rotary embeddings (v5: inside rope_parameters; v4: a top-level field)
    "partial_rotary": (_rope("llama", partial_rotary_factor=0.5), "partial_rotary_factor"),
    "partial_rotary_top": (_with("qwen2", partial_rotary_factor=0.5), "partial_rotary_factor"),
    # GPT-2's per-layer attention scaling
    "gpt2_inverse_layer_idx": (_with("gpt2", scale_attn_by_inverse_layer_idx=True),
                               "scale_attn_by_inverse_layer_idx"),
    "gpt2_no_scale": (_with("gpt2", scale_attn_weights=False), "scale_attn_weights"),
    # Qwen sliding windows
    "qwen2_sliding": (_with("qwen2", use_sliding_window=True, sliding_window=4), "use_sliding_window"),
    "qwen3_sliding": (_with("qwen3", use_sliding_window=True, sliding_window=4), "use_sliding_window"),
    # Gemma 3 bidirectional attention
    "gemma_bidirectional": (_with("gemma3", use_bidirectional_attention=True), "use_bidirectional_attention"),
    # quantized checkpoints
    "quantized": (_with("llama", quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
                  "quantization_config"),
    "quantized_gpt2": (_with("gpt2", quantization_config={"quant_method": "gptq", "bits": 4}),
                       "quantization_config"),
    # unread fields whose name looks maths-changing
    "unread_logit_scale": (_with("llama", logit_scale=0.5), "logit_scale"),
    "unread_residual_multiplier": (_with("llama", residual_multiplier=0.22), "residual_multiplier"),
    "unread_embedding_multiplier": (_with("qwen3", embedding_multiplier=12.0), "embedding_multiplier"),
    "unread_moe": (_with("mistral", num_local_experts=8), "num_local_experts"),
    "unread_alibi": (_with("gpt2", alibi=True), "alibi"),
    "unread_parallel": (_with("llama", parallel_attn=True), "parallel_attn"),
    "unread_qk_layernorm": (_with("llama", qk_layernorm=True), "qk_layernorm"),
    "unread_gemma_norm": (_with("gemma3", use_norm_bias=True), "use_norm_bias"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_field_is_refused_by_name(case):
    cfg, field = REFUSALS[case]
    with pytest.raises(ConfigError, match=field) as e:
        spec_from_config(cfg, "some/config.json")
    message = str(e.value)
    assert "\n" not in message
    assert "some/config.json" in message


def test_unknown_model_type_is_named():
    for model_type in ("falcon", "mixtral", None):
        cfg = _with("llama", model_type=model_type)
        with pytest.raises(ConfigError, match=f"model_type {model_type!r}"):
            spec_from_config(cfg)
    cfg = fixture_config("llama")
    del cfg["model_type"]
    with pytest.raises(ConfigError, match="model_type"):
        spec_from_config(cfg)


def test_gemma3_wrapper_without_text_config_is_refused():
    with pytest.raises(ConfigError, match="text_config"):
        spec_from_config({"model_type": "gemma3"})


def test_non_positive_size_is_refused_by_name():
    with pytest.raises(ConfigError, match="hidden_size"):
        spec_from_config(_with("llama", hidden_size=0))
    with pytest.raises(ConfigError, match="n_layer"):
        spec_from_config(_with("gpt2", n_layer=None))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        spec_from_config(_with("llama", num_key_value_heads=3))


# ---------------------------------------------------------------- unusable folders / files

def test_folder_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        read_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_spec(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        load_spec(tmp_path / "missing")


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        load_spec(tmp_path)
    assert "\n" not in str(e.value)


def test_config_json_that_is_a_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([fixture_config("llama")]), encoding="utf-8")
    with pytest.raises(ConfigError, match="list"):
        load_spec(tmp_path)


# ---------------------------------------------------------------- accepted

HARMLESS = dict(bos_token_id=5, eos_token_id=[1, 2], pad_token_id=3, attention_dropout=0.3, hidden_dropout=0.1,
                initializer_range=0.01, use_cache=False, dtype="bfloat16", torch_dtype="float16")


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_harmless_fields_are_accepted(variant):
    base = spec_from_config(fixture_config(variant))
    assert spec_from_config(_with(variant, **HARMLESS)) == base


def test_harmless_gpt2_fields_are_accepted():
    base = spec_from_config(fixture_config("gpt2"))
    changed = _with("gpt2", bos_token_id=7, eos_token_id=7, pad_token_id=2, embd_pdrop=0.5, resid_pdrop=0.0,
                    attn_pdrop=0.2, initializer_range=0.02, use_cache=False, dtype="float16")
    assert spec_from_config(changed) == base


def test_false_or_null_maths_fields_are_accepted():
    """A maths-looking field that is off (False / None / empty) changes nothing."""
    base = spec_from_config(fixture_config("llama"))
    assert spec_from_config(_with("llama", parallel_attn=False, logit_scale=None, quantization_config={})) == base


def test_v4_linear_rope_scaling_equals_v5_rope_parameters():
    v5 = _rope("llama", rope_type="linear", factor=4.0, rope_theta=500000.0)
    v4 = fixture_config("llama")
    del v4["rope_parameters"]
    v4.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    s4, s5 = spec_from_config(v4), spec_from_config(v5)
    assert s4.rope_tables == s5.rope_tables
    assert s4 == s5
    default = spec_from_config(fixture_config("llama"))
    assert s4.rope_tables != default.rope_tables  # the scaling and the theta were applied
    # linear scaling divides every inverse frequency by the factor
    plain = spec_from_config(_rope("llama", rope_theta=500000.0))
    for a, b in zip(s4.rope_tables[0], plain.rope_tables[0]):
        assert a == pytest.approx(b / 4.0, rel=1e-6)


def test_v4_rope_theta_alone_equals_v5_default():
    v4 = fixture_config("llama")
    del v4["rope_parameters"]
    v4["rope_theta"] = 10000.0
    assert spec_from_config(v4) == spec_from_config(fixture_config("llama"))


def _wrapper(text: dict) -> dict:
    """Gemma 3 as Gemma3ForConditionalGeneration's config.json holds it: the text model nested."""
    return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": {k: v for k, v in text.items() if k not in ("model_type", "architectures")},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_hidden_layers": 27},
            "image_token_index": 262144, "boi_token_index": 255999, "eoi_token_index": 256000,
            "mm_tokens_per_image": 256, "dtype": "bfloat16", "transformers_version": "5.24.0"}


def test_gemma3_multimodal_wrapper_gives_the_text_spec():
    # as the released Gemma 3 checkpoints: final_logit_softcapping null
    text = _with("gemma3", final_logit_softcapping=None)
    spec = spec_from_config(_wrapper(text))
    assert spec.model_type == "gemma3" and spec.family == "gemma3"
    assert dataclasses.replace(spec, model_type="gemma3_text") == spec_from_config(text)
    assert spec.windows == (4, 0, 4) and spec.sandwich and spec.final_softcap is None
    # the committed fixture's text settings: the same decoder, but no final soft-capping, which
    # transformers' Gemma3ForConditionalGeneration does not apply (its text-only class does)
    text = fixture_config("gemma3")
    assert spec_from_config(text).final_softcap == 30.0
    wrapped = spec_from_config(_wrapper(text))
    assert wrapped.final_softcap is None
    assert wrapped == dataclasses.replace(spec_from_config(text), model_type="gemma3", final_softcap=None)
    # an unsupported field inside text_config is still refused by name
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        spec_from_config(_wrapper({**text, "use_bidirectional_attention": True}))


def test_mistral_sliding_window_null_has_no_windows():
    windowed = spec_from_config(fixture_config("mistral"))
    assert windowed.windows == (4, 4)
    spec = spec_from_config(_with("mistral", sliding_window=None))
    assert spec.windows == (0, 0)
    assert spec.model_type == "mistral" and spec.family == "llama"


def test_gpt2_spec_switches():
    spec = spec_from_config(fixture_config("gpt2"))
    assert (spec.norm, spec.positions, spec.gated, spec.act) == ("layernorm", "learned", False, "gelu_tanh")
    assert spec.mlp_width == 4 * spec.width  # n_inner null


def test_sparse_released_gemma3_4b_config_takes_the_family_defaults():
    """google/gemma-3-4b-it's config.json lists only a few text_config fields; the rest are
    transformers' Gemma 3 defaults (8 heads, 4 kv heads, head_dim 256, window pattern 6)."""
    from ufmjax.models.hf.config import spec_from_config

    cfg = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    s = spec_from_config(cfg)
    assert (s.heads, s.kv_heads, s.head_dim, s.vocab) == (8, 4, 256, 262208)
    assert s.windows[:6] == (1024,) * 5 + (0,) and s.final_softcap is None and s.act == "gelu_tanh"
    assert abs(s.attn_scale - 256 ** -0.5) < 1e-12
    # the global layers' RoPE: theta 1e6 divided by the linear factor 8; local: theta 1e4
    glob, loc = s.rope_tables[s.rope_of_layer[5]], s.rope_tables[s.rope_of_layer[0]]
    assert abs(glob[1] - (1e6 ** (-2 / 256)) / 8) < 1e-6 and abs(loc[1] - 1e4 ** (-2 / 256)) < 1e-6  # float32
