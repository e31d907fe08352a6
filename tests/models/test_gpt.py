"""The GPT module and its steering closures: invariants, not shapes.

Every test uses an untrained GPT with a large init scale, so its logits are far from uniform
and steering bends them visibly; nothing here needs training.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufmjax import kernel
from ufmjax.models.gpt import (
    GPTConfig,
    init_gpt,
    limit_logits,
    logits,
    next_token_loss,
    residual,
    steered_closure,
    steered_generate,
    steered_logits_full,
    steering_vector,
)
from ufmjax.analysis import grid_extras, validity_range
from ufmjax.steering import linear_steered

CFG = GPTConfig(vocab=11, context=8, layers=2, width=16, heads=2, mlp_ratio=2, init_scale=0.3)


@pytest.fixture(scope="module")
def model():
    return init_gpt(CFG, 0)


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(0).integers(0, CFG.vocab, size=(5, 6)).astype(np.int32)


@pytest.fixture(scope="module")
def vec(model, prompts):
    rng = np.random.default_rng(1)
    other = rng.integers(0, CFG.vocab, size=(5, 6))
    return steering_vector(model, prompts, other, 1)


def _vmapped(steered, alphas, dtype=jnp.float32):
    return np.asarray(jax.vmap(steered.fn, in_axes=(None, 0))(steered.params, jnp.asarray(alphas, dtype)))


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_prefix_cached_closure_equals_full_forward_with_alpha_in_batch(model, prompts, vec, layer, positions):
    alphas = np.array([-30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 25.0])
    steered = steered_closure(model, prompts, vec, layer, positions)
    full = np.asarray(steered_logits_full(model, prompts, vec, layer, alphas, positions))[:, :, -1]
    got = _vmapped(steered, alphas)
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-5,
                               err_msg="the prefix-cached sweep no longer matches the paper's full forward pass")


def test_all_rows_closure_equals_full_forward(model, prompts, vec):
    alphas = np.array([-5.0, 0.0, 2.0])
    steered = steered_closure(model, prompts, vec, 1, "all", rows="all")
    full = np.asarray(steered_logits_full(model, prompts, vec, 1, alphas, "all"))
    np.testing.assert_allclose(_vmapped(steered, alphas), full.reshape(3, -1, CFG.vocab), atol=1e-5)


def test_last_position_steering_leaves_earlier_positions_alone(model, prompts, vec):
    """Causality: steering the last position changes no earlier position's logits."""
    full = np.asarray(steered_logits_full(model, prompts, vec, 1, [0.0, 50.0], "last"))
    np.testing.assert_array_equal(full[1, :, :-1], full[0, :, :-1])
    assert np.abs(full[1, :, -1] - full[0, :, -1]).max() > 1e-2


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_alpha_zero_is_the_unsteered_model(model, prompts, vec, layer, positions):
    # The hooked full pass at alpha = 0 IS the model: h + 0 * v == h, bit for bit.
    full0 = np.asarray(steered_logits_full(model, prompts, vec, layer, [0.0], positions))[0]
    np.testing.assert_array_equal(full0, np.asarray(model(jnp.asarray(prompts))))
    # The cached closure computes only the last position (one attention query instead of T):
    # the same sums in another order, so equal to float32 rounding.
    steered = steered_closure(model, prompts, vec, layer, positions)
    at0 = np.asarray(steered.fn(steered.params, jnp.zeros(())))
    np.testing.assert_allclose(at0, full0[:, -1], rtol=0, atol=2e-6)


# Central differences in float32: h = 1e-2 balances truncation (h^2) and rounding (eps / h);
# both stay two orders below the 1e-3 tolerance (measured: <= 3e-4).
FD_ALPHAS, FD_H = np.array([-2.0, -0.3, 0.0, 0.8, 3.0]), 1e-2
LIMIT_GRID = np.array([10.0, 100.0, 1e3, 1e4])


@pytest.fixture(scope="module", params=["all", "last"])
def swept(request, model, prompts, vec):
    """One sweep per steering mode (layer 1 of 2), shared by the tests below: the grid holds
    alpha - h, alpha, alpha + h, so one compiled kernel call gives central differences."""
    positions = request.param
    steered = steered_closure(model, prompts, vec, 1, positions)
    grid = np.concatenate([FD_ALPHAS - FD_H, FD_ALPHAS, FD_ALPHAS + FD_H])
    out = kernel.sweep(steered, grid, derivatives=2, concept_of=np.arange(CFG.vocab) % 3,
                       ce_target=np.arange(prompts.shape[0]) % CFG.vocab, chunk_size=16)
    lim = limit_logits(model, vec)
    ex = {s: grid_extras(steered, s * LIMIT_GRID, lim, chunk_size=4) for s in (1.0, -1.0)}
    # A v as long as the residual stream (same closure function: no recompilation).
    norm_h = np.median(np.linalg.norm(residual(model, prompts, 1), axis=-1))
    r = np.random.default_rng(5).normal(size=CFG.width)
    r *= norm_h / np.linalg.norm(r)
    steered_r = steered_closure(model, prompts, r, 1, positions)
    lim_r = limit_logits(model, r)
    limit_r = {s: grid_extras(steered_r, s * LIMIT_GRID, lim_r, chunk_size=4)["limit_distance"] for s in (1.0, -1.0)}
    return {"out": out, "u": ex[1.0]["local_ufm_direction"], "limit_r": limit_r,
            "limit": {s: e["limit_distance"] for s, e in ex.items()}}


def test_kernel_derivatives_equal_central_differences(swept):
    out, n = swept["out"], FD_ALPHAS.size
    for name in ("delta_p", "concept_prob", "delta_p_concept", "delta_ce", "kl", "entropy"):
        for order in ("d_", "d2_"):
            f = out[name] if order == "d_" else out["d_" + name]
            want = (f[2 * n:] - f[:n]) / (2 * FD_H)
            got = out[order + name][n:2 * n]
            scale = np.abs(want).max()
            assert scale > 1e-4, f"{order}{name} is trivially zero: the test model steers nothing"
            err = np.abs(got - want).max() / scale
            assert err < 1e-3, f"{order}{name}: relative error {err:.2e} against central differences"


def test_local_ufm_direction_is_the_jvp(swept):
    """Item 7: u = dy/dalpha(0), so the kernel's slope at 0 is the softmax Jacobian applied
    to it, p (u - E_p[u]) (Lemma B.5 with M replaced by u)."""
    out, u, n = swept["out"], swept["u"], FD_ALPHAS.size
    p0 = out["probs_base"]
    np.testing.assert_allclose(out["d_delta_p"][n + 2], p0 * (u - np.sum(p0 * u, axis=1, keepdims=True)),
                               rtol=0, atol=1e-6)


def test_local_ufm_of_a_linear_model_is_the_model():
    """A closure linear in alpha (the UFM, Lemma B.2) is its own local UFM: KL = 0 on the whole
    grid, and the validity range is the grid (censored at both ends)."""
    rng = np.random.default_rng(0)
    steered = linear_steered(rng.normal(size=(4, 7)), rng.normal(size=(4, 7)))
    alphas = np.linspace(-50, 50, 11)
    ex = grid_extras(steered, alphas, np.zeros((2, 7)), chunk_size=11)
    assert np.abs(ex["local_ufm_kl"]).max() < 1e-5
    assert validity_range(alphas, ex["local_ufm_kl"]) == (-50.0, 50.0, (True, True))


def test_logits_approach_the_prop_4_1_limit(swept):
    """Prop. 4.1: y(alpha) -> LN(±v) W^T, the distance shrinking like C / |alpha| with
    C ~ |h| / |v|; for a v as long as the residual stream it is < 1e-3 at |alpha| = 1e4."""
    for which in ("limit", "limit_r"):
        for sign, dist in swept[which].items():
            assert np.all(np.diff(dist) < 0), f"{which}: distance to LN({sign:+g} v) W^T does not shrink: {dist}"
            rate = dist[1:] * LIMIT_GRID[1:]
            assert rate.max() < 1.5 * rate.min(), f"{which}: distance is not ~ C / alpha: {dist}"
    for sign, dist in swept["limit_r"].items():
        # The distance is the largest over prompts, so every prompt's logits are within it of
        # one prompt-independent limit: the output forgets the prompt.
        assert dist[-1] < 1e-3, f"distance at alpha = {sign * 1e4:g} is {dist[-1]:.2e}"


def test_validity_range():
    alphas = np.linspace(-4, 4, 9)
    kl = np.array([0.5, 0.2, 0.005, 0.001, 0.0, 0.001, 0.009, 0.002, 0.02])
    assert validity_range(alphas, kl) == (-2.0, 3.0, (False, False))
    assert validity_range(alphas, np.zeros(9)) == (-4.0, 4.0, (True, True))


def test_same_shape_models_share_one_compiled_kernel(model, prompts, vec):
    """The closure is memoised on (graphdef, layer, positions, rows): a second model of the same
    shape is swept without recompiling."""
    alphas = np.linspace(-1, 1, 5)
    concept_of = np.arange(CFG.vocab) % 3
    graphdef, state = nnx.split(model)
    a = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5, state))
    b = nnx.merge(graphdef, jax.tree.map(lambda x: x * 0.5, state))
    kw = {"concept_of": concept_of, "chunk_size": 5, "derivatives": 0}
    kernel.sweep(steered_closure(a, prompts, vec, 2, "last"), alphas, **kw)
    before = kernel.trace_count()
    out = kernel.sweep(steered_closure(b, prompts, vec, 2, "last"), alphas, **kw)
    assert kernel.trace_count() == before
    assert np.abs(out["delta_p"]).max() > 0


def test_refuses_wrong_width_bad_layer_and_empty_prompts(model, prompts, vec):
    with pytest.raises(ValueError, match="width 16"):
        steered_closure(model, prompts, np.ones(15), 1)
    for layer in (-1, 3, 1.0):
        with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\]"):
            steered_closure(model, prompts, vec, layer)
    with pytest.raises(ValueError, match="non-empty"):
        steered_closure(model, np.zeros((0, 4), np.int32), vec, 1)
    with pytest.raises(ValueError, match="P prompts must be a non-empty"):
        steering_vector(model, np.zeros((0, 4), np.int32), prompts, 1)
    with pytest.raises(ValueError, match="more than the model's context"):
        steered_closure(model, np.zeros((2, 9), np.int32), vec, 1)
    with pytest.raises(ValueError, match="outside"):
        steered_closure(model, np.full((2, 3), CFG.vocab), vec, 1)
    with pytest.raises(ValueError, match="positions"):
        steered_closure(model, prompts, vec, 1, "first")
    with pytest.raises(ValueError, match="needs positions='all'"):
        steered_closure(model, prompts, vec, 1, "last", rows="all")
    with pytest.raises(ValueError, match="heads"):
        GPTConfig(width=10, heads=3)
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")


def test_model_is_causal_and_loss_is_the_weighted_next_token_ce(model, prompts):
    """Changing token t changes no logits before t (nanodo's causality check)."""
    changed = prompts.copy()
    changed[:, 3] = (changed[:, 3] + 1) % CFG.vocab
    a, b = logits(model, prompts), logits(model, changed)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert np.abs(a[:, 3:] - b[:, 3:]).max() > 1e-3
    # The loss reads positions 0..T-2 predicting 1..T-1, weighted (here: the last target only).
    weight = np.zeros((prompts.shape[0], prompts.shape[1] - 1), np.float32)
    weight[:, -1] = 1
    loss = float(next_token_loss(model, (jnp.asarray(prompts), jnp.asarray(weight))))
    y = a[:, -2].astype(np.float64)  # position T-2 predicts the last token
    logp = y - np.log(np.exp(y).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(loss, -logp[np.arange(len(y)), prompts[:, -1]].mean(), rtol=1e-5)


@pytest.mark.parametrize("norm,tied", [("rmsnorm", True), ("layernorm", False)])
def test_norms_and_tying(norm, tied, prompts):
    cfg = GPTConfig(vocab=11, context=8, layers=1, width=16, heads=2, norm=norm, tied=tied, init_scale=0.3)
    m = init_gpt(cfg, 1)
    assert (m.unembed is None) == tied
    if tied:
        np.testing.assert_array_equal(np.asarray(m.unembedding()), np.asarray(m.embed.embedding[...]))
    v = np.random.default_rng(2).normal(size=16)
    steered = steered_closure(m, prompts, v, 1, "last")
    full = np.asarray(steered_logits_full(m, prompts, v, 1, [0.0, 3.0], "last"))[:, :, -1]
    np.testing.assert_allclose(_vmapped(steered, [0.0, 3.0]), full, atol=1e-5)


def test_steered_generation_follows_the_steering(model, prompts):
    """Huge alpha along the unembedding row of token 4 makes token 4 the likely draw (the
    limit softmax(LN(v) W^T) of Prop. 4.1); equal alphas give equal draws (one key)."""
    W = np.asarray(model.unembedding())
    v = W[4] - W.mean(axis=0)
    gen = steered_generate(model, prompts[:, :4], v, 2, [0.0, 0.0, 1e3], 4, jax.random.key(0))
    np.testing.assert_array_equal(gen[0], gen[1])
    assert (gen[2] == 4).mean() > max(0.5, 2 * (gen[0] == 4).mean())
