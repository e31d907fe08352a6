"""Loading a model folder: every tensor the config implies, with its shape, and nothing more.

Each case copies a committed fixture into tmp_path and rewrites its checkpoint with
`write_safetensors` (one tensor removed, reshaped or added; the file cut short; the tensors
split into shards), so the only difference from a folder that loads is the one under test.
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.data.prompts import InputError
from ufmjax.models.hf import CheckpointError, load_decoder, logits
from ufmjax.models.hf.checkpoint import Checkpoint, write_safetensors
from ufmjax.runs.hf import load_hf

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hf"


def copy_fixture(variant: str, dest: Path) -> Path:
    folder = dest / variant
    shutil.copytree(FIXTURES / variant, folder)
    return folder


def tensors_of(folder: Path) -> dict:
    with Checkpoint(folder) as ck:
        return {name: ck.read(name) for name in ck.names()}


def prompts_of(variant: str) -> list:
    ref = np.load(FIXTURES / variant / "reference.npz")
    return [ref[f"prompt_{i}"] for i in range(int(ref["num_prompts"]))]


def rewrite(folder: Path, tensors: dict) -> None:
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})


@pytest.fixture(scope="module")
def llama_logits():
    return logits(load_decoder(FIXTURES / "llama"), prompts_of("llama"))


def test_copied_fixture_loads(tmp_path, llama_logits):
    folder = copy_fixture("llama", tmp_path)
    rewrite(folder, tensors_of(folder))  # our writer's file reads back like transformers' one
    got = logits(load_decoder(folder), prompts_of("llama"))
    for a, b in zip(got, llama_logits):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant,name", [
    ("llama", "model.layers.1.mlp.up_proj.weight"),
    ("llama", "model.norm.weight"),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
    ("qwen3", "model.layers.1.self_attn.q_norm.weight"),
    ("gemma3", "model.layers.2.pre_feedforward_layernorm.weight"),
    ("gpt2", "transformer.h.0.attn.c_attn.bias"),
    ("gpt2", "transformer.wpe.weight"),
])
def test_missing_tensor_is_named(tmp_path, variant, name):
    folder = copy_fixture(variant, tmp_path)
    tensors = tensors_of(folder)
    del tensors[name]
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match="missing") as e:
        load_decoder(folder)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_missing_untied_head_is_named(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    tensors = tensors_of(folder)
    del tensors["lm_head.weight"]
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_decoder(folder)


@pytest.mark.parametrize("variant,name,shape", [
    ("llama", "model.layers.0.self_attn.k_proj.weight", (8, 32)),   # config: 2 kv heads x 8 = (16, 32)
    ("llama", "model.embed_tokens.weight", (255, 32)),
    ("gpt2", "transformer.h.1.mlp.c_fc.weight", (32, 64)),          # Conv1D [in, out]: (32, 128) expected
])
def test_wrong_shape_names_tensor_and_shapes(tmp_path, variant, name, shape):
    folder = copy_fixture(variant, tmp_path)
    tensors = tensors_of(folder)
    original = tensors[name].shape
    tensors[name] = np.zeros(shape, tensors[name].dtype)
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError) as e:
        load_decoder(folder)
    message = str(e.value)
    assert name in message and "\n" not in message
    got = shape if variant != "gpt2" else shape[::-1]  # GPT-2 is reported after the transpose
    expected = original if variant != "gpt2" else original[::-1]
    assert str(tuple(got)) in message and str(tuple(expected)) in message


@pytest.mark.parametrize("variant,name", [
    ("llama", "model.layers.3.input_layernorm.weight"),      # a fourth block the config does not have
    ("llama", "model.layers.0.self_attn.q_proj.bias"),       # a bias attention_bias=false leaves out
    ("qwen2", "model.layers.0.self_attn.o_proj.bias"),       # Qwen 2 has no o_proj bias
    ("gpt2", "transformer.h.0.ln_3.weight"),
    ("gemma3_mm", "language_model.model.layers.0.mlp.extra_proj.weight"),
])
def test_extra_model_tensor_is_refused_by_name(tmp_path, variant, name):
    folder = copy_fixture(variant, tmp_path)
    tensors = tensors_of(folder)
    tensors[name] = np.ones((32,), np.float32)
    rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match="not part of") as e:
        load_decoder(folder)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_buffers_and_tensors_outside_the_model_are_accepted(tmp_path, llama_logits):
    folder = copy_fixture("llama", tmp_path)
    tensors = tensors_of(folder)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((4,), np.float32)
    tensors["value_head.weight"] = np.ones((1, 32), np.float32)  # not under the "model." prefix
    rewrite(folder, tensors)
    got = logits(load_decoder(folder), prompts_of("llama"))
    for a, b in zip(got, llama_logits):
        np.testing.assert_array_equal(a, b)


def test_gemma3_wrapper_ignores_the_vision_tower(tmp_path):
    """The multimodal checkpoint's language model loads; its vision tower and projector are not
    part of it, so a tensor added there is not refused (one added to the decoder is, above)."""
    folder = copy_fixture("gemma3_mm", tmp_path)
    tensors = tensors_of(folder)
    assert any(n.startswith("vision_tower.") for n in tensors)
    tensors["vision_tower.extra.weight"] = np.ones((4,), np.float32)
    rewrite(folder, tensors)
    model = load_decoder(folder)
    assert model.spec.model_type == "gemma3" and model.spec.layers == 3


@pytest.mark.parametrize("keep", [0.5, 0.999, 4 / 1e9])
def test_truncated_checkpoint_is_reported(tmp_path, keep):
    folder = copy_fixture("llama", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:max(4, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_decoder(folder)
    assert "\n" not in str(e.value)


def test_folder_without_weights_is_reported(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_decoder(folder)


def test_sharded_checkpoint_equals_the_single_file(tmp_path, llama_logits):
    folder = copy_fixture("llama", tmp_path)
    tensors = tensors_of(folder)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, part in halves.items():
        write_safetensors(folder / shard, {n: tensors[n] for n in part}, {"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.nbytes for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}), encoding="utf-8")
    (folder / "model.safetensors").unlink()

    with Checkpoint(folder) as ck:
        assert ck.source.name == "model.safetensors.index.json"
        assert {ck.file_of(n).name for n in names} == set(halves)
    model = load_decoder(folder)
    got = logits(model, prompts_of("llama"))
    for a, b in zip(got, llama_logits):
        np.testing.assert_array_equal(a, b)

    # a shard named by the index but absent is named
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_decoder(folder)


def test_bf16_checkpoint_cast_to_float32(tmp_path):
    kept = load_decoder(FIXTURES / "llama_bf16")
    assert kept.embed[...].dtype == jnp.bfloat16
    model = load_decoder(FIXTURES / "llama_bf16", dtype="float32")
    assert model.embed[...].dtype == jnp.float32
    assert model.head_w[...].dtype == jnp.float32
    blk = model.blocks[0]
    for w in (blk.q_w, blk.k_w, blk.v_w, blk.o_w, blk.gate_w, blk.up_w, blk.down_w, blk.ln1_w):
        assert w[...].dtype == jnp.float32
    # bf16 -> f32 is exact: the same numbers
    np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(kept.embed[...], np.float32))
    with pytest.raises(ValueError, match="--dtype"):
        load_decoder(FIXTURES / "llama_bf16", dtype="int8")


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    rows = 200  # the tokenizer has 250 tokens
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg["vocab_size"] = rows
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tensors = tensors_of(folder)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = np.ascontiguousarray(tensors[name][:rows])
    rewrite(folder, tensors)
    assert load_decoder(folder).spec.vocab == rows  # the model itself is consistent
    with pytest.raises(InputError, match="250 tokens") as e:
        load_hf(folder)
    message = str(e.value)
    assert message.startswith("--hf") and "200" in message and "tokenizer.json" in message


def test_embedding_larger_than_the_tokenizer_is_accepted():
    run = load_hf(FIXTURES / "llama")  # 256 rows, 250 tokens: the padding rows decode to ""
    strs = run.token_strs()
    assert len(strs) == 256 and strs[250:] == [""] * 6 and all(strs[2:250])
