"""The head path (kernel.head): the vocabulary walked in blocks, never the [M, V] logits.

It must give what the taylor path gives from the materialised logits, for every quantity and
both derivatives, whatever the block size (one block, many, a last block slid back over the
one before), with dense and label CE targets, with a soft-capped head, and where the
distribution concentrates on one token (|alpha| large)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax import steering
from ufmjax.kernel import Evaluator, make_measure, sweep
from ufmjax.kernel import head as head_mod
from ufmjax.kernel.driver import plan_sweep, resolve_method
from ufmjax.models import gpt
from ufmjax.models.hf import load_decoder
from ufmjax.models.hf import steered_closure as hf_closure

HF = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
# Wide enough to concentrate on one token at the ends (|alpha| v moves logits by hundreds).
ALPHAS = np.concatenate([np.linspace(-6.0, 6.0, 9), [-1e3, 2e4]])


def _gpt(tied: bool, vocab: int = 97):
    cfg = gpt.GPTConfig(vocab=vocab, context=8, width=16, heads=2, layers=2, tied=tied)
    return gpt.init_gpt(cfg, seed=1)


def _paths(st, measure, dtype, blocks, order=2):
    """{name: chunk results}: the taylor path and the head path at each block size."""
    ev = Evaluator(st, measure, order=order, method="taylor", dtype=dtype)
    at = jnp.asarray(ALPHAS, dtype)
    out = {"taylor": ev.chunk(at)}
    for b in blocks:
        out[b] = head_mod.head_chunk_fn(st.fn, order, None, b)(at, ev.params, ev.reference, ev.measure)
    return out


def _assert_close(a, b, rtol, what):
    for o, (ta, tb) in enumerate(zip(a, b)):
        assert ta.keys() == tb.keys()
        for k in ta:
            x, y = np.asarray(ta[k], np.float64), np.asarray(tb[k], np.float64)
            scale = np.abs(y).max() + 1e-300
            err = np.abs(x - y).max()
            assert err <= rtol * scale, f"{what}: order {o} {k}: {err:.3g} against |{scale:.3g}|"


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("positions,rows", [("all", "last"), ("last", "last"), ("all", "all")])
def test_the_declared_head_is_the_closure(tied, positions, rows):
    """fn(params, alpha) = head_logits(unembedding(params), hidden(params, alpha)) exactly."""
    model = _gpt(tied)
    rng = np.random.default_rng(0)
    st = gpt.steered_closure(model, rng.integers(0, 97, (3, 8)), rng.normal(size=16), 1, positions, rows)
    head = steering.head_of(st.fn)
    assert head is not None
    unemb = head.unembedding(st.params)
    assert unemb.vocab_axis == (0 if tied else 1) and unemb.W.shape[unemb.vocab_axis] == 97
    for a in (0.0, 1.5, -40.0):
        a = jnp.asarray(a, jnp.float32)
        want = np.asarray(st.fn(st.params, a))
        got = np.asarray(steering.head_logits(unemb, head.hidden(st.params, a)))
        np.testing.assert_array_equal(got, want)


# (tied, label targets, positions, rows, block sizes): 10 is 9 blocks and a last one of 7 new
# tokens, slid back over the one before; 97 is the whole vocabulary in one block.
CASES = [(True, False, "all", "last", (10, 32, 96, 97, 4096)), (True, False, "last", "last", (10, 97)),
         (True, False, "all", "all", (10,)), (False, True, "last", "last", (10, 97)), (False, False, "all", "last", (10,)),
         (False, True, "all", "all", (32,))]


@pytest.mark.parametrize("tied,labels,positions,rows,blocks", CASES)
def test_head_path_equals_the_taylor_path(x64, tied, labels, positions, rows, blocks):
    """float64: every quantity and both derivatives to 1e-10 of the materialised path."""
    model = _gpt(tied)
    rng = np.random.default_rng(1)
    st = gpt.steered_closure(model, rng.integers(0, 97, (3, 8)), 3.0 * rng.normal(size=16), 1, positions, rows,
                             dtype=jnp.float64)
    M = st.fn(st.params, 0.0).shape[0]
    ce = rng.integers(0, 97, M) if labels else None
    ms = make_measure(st, concept_of=rng.integers(0, 3, 97), ce_target=ce, tokens=[0, 5, 96], dtype=jnp.float64)
    out = _paths(st, ms, jnp.float64, blocks)
    for b in blocks:
        _assert_close(out[b], out["taylor"], 1e-10, f"block {b}")


def test_model_part_in_batches_equals_the_whole_chunk(x64):
    """The model part in batches of 3 (11 alphas: a remainder of 2) inside one chunk, the
    vocabulary walk over the whole chunk: the same numbers as one vmap over the chunk, for every
    order and for a subset of the quantities; batches of 1 (one alpha per step) at order 2."""
    model = _gpt(True)
    rng = np.random.default_rng(2)
    st = gpt.steered_closure(model, rng.integers(0, 97, (3, 8)), 3.0 * rng.normal(size=16), 1, "all",
                             dtype=jnp.float64)
    ms = make_measure(st, concept_of=rng.integers(0, 3, 97), tokens=[0, 5, 96], dtype=jnp.float64)
    ev = Evaluator(st, ms, order=2, method="head", dtype=jnp.float64)
    at = jnp.asarray(ALPHAS, jnp.float64)
    cases = [(0, None, (3,)), (1, None, (3,)), (2, None, (1, 3)), (2, ("kl", "delta_p"), (3,))]
    for order, names, batches in cases:  # each case compiles 1 + len(batches) programs
        whole = head_mod.head_chunk_fn(st.fn, order, names, 32)(at, ev.params, ev.reference, ev.measure)
        for batch in batches:
            fn = head_mod.head_chunk_fn(st.fn, order, names, 32, batch)
            _assert_close(fn(at, ev.params, ev.reference, ev.measure), whole, 1e-12,
                          f"order {order}, {names}, batches of {batch}")


def _linear_hidden(params, alpha):
    return params["h"] + alpha * params["u"]


def _linear_unembedding(params):
    return steering.Unembedding(params["W"])


def _linear_head_fn(params, alpha):
    return steering.head_logits(_linear_unembedding(params), _linear_hidden(params, alpha))


# A head whose logits are affine in alpha (a UFM behind an unembedding): x' = u W^T stays large
# while the distribution concentrates, the case where uncentred sums cancel.
steering.register_head(_linear_head_fn, _linear_hidden, _linear_unembedding)


def test_concentrated_ends_keep_their_digits_in_float32():
    """Where one token takes nearly all the mass the variance of x' (hence d2 CE, KL', H'...)
    is a difference of nearly equal sums unless the sums are centred: the head path's float32
    error against float64 stays within 10x the taylor path's own float32 error there (taken
    about an anchor at 0 instead of the maximum, it is off by orders of magnitude)."""
    rng = np.random.default_rng(2)
    V, D = 300, 8
    params = {"h": rng.normal(size=(3, D)), "u": rng.normal(size=(3, D)), "W": rng.normal(size=(V, D))}
    concept_of = rng.integers(0, 3, V)
    alphas = np.array([-400.0, -60.0, -25.0, 25.0, 60.0, 400.0])
    results = {}
    for dtype in (jnp.float64, jnp.float32):
        with jax.enable_x64(dtype == jnp.float64):
            st = steering.Steered(_linear_head_fn, {k: jnp.asarray(x, dtype) for k, x in params.items()})
            ms = make_measure(st, concept_of=concept_of, dtype=dtype)
            ev = Evaluator(st, ms, method="taylor", dtype=dtype)
            at = jnp.asarray(alphas, dtype)
            taylor = ev.chunk(at)
            head = head_mod.head_chunk_fn(_linear_head_fn, 2, None, 64)(at, ev.params, ev.reference, ev.measure)
            results[dtype] = [[{k: np.asarray(x, np.float64) for k, x in t.items()} for t in r] for r in (taylor, head)]
    truth = results[jnp.float64][0]
    taylor32, head32 = results[jnp.float32]
    assert np.abs(truth[2]["delta_ce"]).max() > 0  # d2 CE = T Var(x') does not vanish here
    for o in range(3):
        for k in ("kl", "entropy", "delta_ce_ctx", "concept_prob"):
            t = truth[o][k]
            err_taylor = np.abs(taylor32[o][k] - t).max()
            err_head = np.abs(head32[o][k] - t).max()
            assert err_head <= 10 * err_taylor + 1e-6 * (np.abs(t).max() + 1), (o, k, err_head, err_taylor)


def test_soft_capped_head_equals_the_taylor_path(x64):
    """A Gemma-style final soft-cap (cap * tanh(y / cap)) carried through the series."""
    model = load_decoder(HF / "gemma3", "float64")
    model.spec = dataclasses.replace(model.spec, final_softcap=2.0)  # tight: tanh bends the logits
    rng = np.random.default_rng(3)
    V, D = model.spec.vocab, model.spec.width
    prompts = [rng.integers(0, V, 6), rng.integers(0, V, 4)]
    st = hf_closure(model, prompts, 4.0 * rng.normal(size=D), 1, "all", dtype=jnp.float64)
    head = steering.head_of(st.fn)
    assert head.unembedding(st.params).softcap == model.spec.final_softcap
    ms = make_measure(st, concept_of=np.arange(V) % 4, dtype=jnp.float64)
    out = _paths(st, ms, jnp.float64, (7, V))
    for b in (7, V):
        _assert_close(out[b], out["taylor"], 1e-10, f"gemma soft-cap block {b}")


def test_auto_takes_the_head_path_where_declared():
    model = _gpt(True)
    rng = np.random.default_rng(4)
    st = gpt.steered_closure(model, rng.integers(0, 97, (2, 8)), rng.normal(size=16), 1)
    assert resolve_method(st.fn, "auto", 3) == "head"
    assert resolve_method(st.fn, "auto", 3, sharded=True) == "taylor"
    lin = steering.linear_steered(np.zeros((2, 5)), np.ones(5))
    assert resolve_method(lin.fn, "auto", 3) == "affine"
    with pytest.raises(ValueError, match="method 'head' needs a closure declared"):
        resolve_method(lin.fn, "head", 3)
    # The chunk is sized to one vocabulary block per alpha, not to the [M, V] logits.
    big = _gpt(True, vocab=50_257)
    st = gpt.steered_closure(big, rng.integers(0, 50_257, (2, 8)), rng.normal(size=16), 1)
    ms = make_measure(st, concept_of=np.arange(50_257) % 3)
    grid = np.linspace(-1, 1, 512)
    head = plan_sweep(st, grid, ms, derivatives=2, chunk_size=None, dtype=jnp.float32, devices=None, method="auto")
    taylor = plan_sweep(st, grid, ms, derivatives=2, chunk_size=None, dtype=jnp.float32, devices=None,
                        method="taylor")
    assert head.method == "head" and head.chunk_size >= 8 * taylor.chunk_size, (head.chunk_size, taylor.chunk_size)


def test_sweep_on_the_head_path_equals_the_taylor_sweep():
    """Through `sweep` (chunks, tracked top-k, the model's own CE target), float32."""
    model = _gpt(False, vocab=3000)
    rng = np.random.default_rng(5)
    st = gpt.steered_closure(model, rng.integers(0, 3000, (3, 8)), 2.0 * rng.normal(size=16), 1, "last")
    kw = dict(concept_of=np.arange(3000) % 5, tokens="auto", chunk_size=8)
    a = sweep(st, np.linspace(-5, 5, 21), method="head", **kw)
    b = sweep(st, np.linspace(-5, 5, 21), method="taylor", **kw)
    assert a.keys() == b.keys()
    for k in a:
        if np.asarray(a[k]).dtype.kind == "f":
            scale = np.abs(b[k]).max() + 1e-30
            assert np.abs(a[k] - b[k]).max() <= 2e-4 * scale + 1e-6, k
        else:
            np.testing.assert_array_equal(a[k], b[k])
