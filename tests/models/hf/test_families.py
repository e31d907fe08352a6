"""Every pretrained family against transformers' own outputs (the committed fixtures).

The fixtures (`tests/fixtures/hf/<variant>/`) are tiny randomly initialised models built with
transformers' config classes and saved with `save_pretrained`; `reference.npz` holds
transformers' logits, hidden states and the forward-hook steered next-token probabilities
(`make_fixtures.py`). These tests need no torch. `test_transformers_live.py` rebuilds them
with transformers when it is installed and runs the same comparisons.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.models.hf import hidden_states, load_decoder, logits, steered_closure

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hf"
VARIANTS = ["gpt2", "llama", "llama3_tied", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_mm", "llama_bf16"]


@functools.lru_cache(maxsize=None)
def _probs_fn(fn):
    """Steered next-token probabilities at every alpha of a grid, one compiled call."""
    return jax.jit(jax.vmap(lambda params, a: jax.nn.softmax(fn(params, a)), in_axes=(None, 0)))


def compare_with_reference(folder, dtype=None) -> dict:
    """Worst absolute differences of ufmjax against a reference.npz, by quantity."""
    folder = Path(folder)
    ref = np.load(folder / "reference.npz")
    model = load_decoder(folder, dtype)
    n = int(ref["num_prompts"])
    prompts = [ref[f"prompt_{i}"] for i in range(n)]
    assert len({p.size for p in prompts}) == n, "the fixtures must hold prompts of different lengths"
    lg, hs = logits(model, prompts), hidden_states(model, prompts)
    worst = {"logits": max(np.abs(lg[i] - ref[f"logits_{i}"]).max() for i in range(n)),
             "hidden": max(np.abs(hs[i] - ref[f"hidden_{i}"]).max() for i in range(n))}
    for positions in ("all", "last"):
        w = 0.0
        for li, layer in enumerate(ref["steer_layers"]):
            st = steered_closure(model, prompts, ref["vector"], int(layer), positions)
            probs = np.asarray(_probs_fn(st.fn)(st.params, jnp.asarray(ref["alphas"], jnp.float32)), np.float64)
            for ai, p in enumerate(probs):
                for i in range(n):
                    w = max(w, np.abs(p[i] - ref[f"steered_{positions}_{i}"][li, ai]).max())
        worst[f"steered_{positions}"] = w
    return worst


@pytest.mark.parametrize("variant", VARIANTS)
def test_family_equals_transformers(variant):
    worst = compare_with_reference(FIXTURES / variant)
    assert worst["logits"] < 1e-4, worst
    assert worst["hidden"] < 1e-4, worst
    assert worst["steered_all"] < 1e-5, worst
    assert worst["steered_last"] < 1e-5, worst


def test_batched_prompts_equal_one_at_a_time():
    """Left padding changes nothing: each prompt alone gives what the padded batch gives."""
    ref = np.load(FIXTURES / "gemma3" / "reference.npz")  # sliding windows + RoPE: the hardest case
    model = load_decoder(FIXTURES / "gemma3")
    prompts = [ref[f"prompt_{i}"] for i in range(int(ref["num_prompts"]))]
    batch = logits(model, prompts)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(logits(model, [p])[0], batch[i], atol=2e-6)
    a = jnp.asarray([3.0], jnp.float32)
    for positions in ("all", "last"):
        st = steered_closure(model, prompts, ref["vector"], 2, positions)
        y = np.asarray(_probs_fn(st.fn)(st.params, a))[0]
        for i, p in enumerate(prompts):
            one = steered_closure(model, [p], ref["vector"], 2, positions)
            np.testing.assert_allclose(np.asarray(_probs_fn(one.fn)(one.params, a))[0, 0], y[i], atol=1e-6)


def test_bfloat16_checkpoint_keeps_its_dtype_and_agrees_within_rounding():
    folder = FIXTURES / "llama_bf16"
    ref = np.load(folder / "reference.npz")
    model = load_decoder(folder)  # weights stay bfloat16, computation in float32
    assert model.blocks[0].q_w[...].dtype == jnp.bfloat16
    assert model.embed[...].dtype == jnp.bfloat16
    prompts = [ref[f"prompt_{i}"] for i in range(int(ref["num_prompts"]))]
    lg = logits(model, prompts)
    for i in range(len(prompts)):
        # the same bf16 weights run by transformers in float32
        assert np.abs(lg[i] - ref[f"logits_{i}"]).max() < 1e-4
        # against the float32 weights before rounding: bf16's 8-bit mantissa moves logits by
        # at most 0.067 here (measured 0.015, 0.035, 0.067 by prompt)
        assert np.abs(lg[i] - ref[f"logits_f32weights_{i}"]).max() < 0.1
    assert compare_with_reference(folder)["steered_all"] < 1e-5


def test_kernel_derivatives_equal_central_differences(x64):
    """d/dalpha and d2/dalpha2 of every quantity on a pretrained family (Qwen 3, float64)."""
    from ufmjax.kernel import sweep

    ref = np.load(FIXTURES / "qwen3" / "reference.npz")
    model = load_decoder(FIXTURES / "qwen3", "float64")
    prompts = [ref[f"prompt_{i}"] for i in range(int(ref["num_prompts"]))]
    concept_of = (np.arange(model.spec.vocab) % 7 == 0).astype(int)
    h = 1e-4
    alphas = np.array([-2.0, 0.7, 3.0])
    for positions in ("all", "last"):
        st = steered_closure(model, prompts, ref["vector"], 1, positions, dtype=jnp.float64)
        kw = dict(concept_of=concept_of, dtype=jnp.float64, tokens=np.arange(6))
        # one compiled shape for the three grids
        out, plus, minus = (sweep(st, a, chunk_size=3, **kw) for a in (alphas, alphas + h, alphas - h))
        for q in ("delta_p", "concept_prob", "delta_ce", "kl", "entropy"):
            fd1 = (plus[q] - minus[q]) / (2 * h)
            fd2 = (plus[q] - 2 * out[q] + minus[q]) / h ** 2
            scale1 = max(np.abs(out["d_" + q]).max(), 1e-8)
            scale2 = max(np.abs(out["d2_" + q]).max(), 1e-8)
            assert np.abs(out["d_" + q] - fd1).max() <= 1e-3 * scale1, (positions, q)
            assert np.abs(out["d2_" + q] - fd2).max() <= 1e-3 * scale2, (positions, q)
