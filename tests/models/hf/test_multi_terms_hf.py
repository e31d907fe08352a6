"""Multi-term steering (alpha in R^k) on a pretrained family: identities, not shapes.

The committed Gemma 3 fixture (RoPE with two tables, sliding windows, sandwich norms) and its
left-padded prompts of three lengths: k = 1 is `steered_closure` (1e-12, float64); k = 2, 3
terms at several layers and mixed positions equal a plain full forward pass with every
addition (Eq. 1 per term), norm preservation included; the key/value-cached last-position
path equals the all-positions path with last-position masks. (Padding is never steered, but
that is invisible in the next-token logits: no real token attends to a padded key.)
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.models.hf import load_decoder, residual_norms, steered_closure
from ufmjax.models.hf.model import median_residual_norm, multi_steered_closure, multi_steered_logits_full
from ufmjax.steering import rowwise_of, scalar_of

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "hf" / "gemma3"


@pytest.fixture(scope="module", autouse=True)
def x64():
    """Every comparison here is to 1e-10 or tighter: float64 throughout."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def fixture():
    ref = np.load(FIXTURE / "reference.npz")
    model = load_decoder(FIXTURE, "float64")
    prompts = [ref[f"prompt_{i}"] for i in range(int(ref["num_prompts"]))]
    assert len({p.size for p in prompts}) > 1, "the fixture's prompts must need padding"
    rng = np.random.default_rng(0)
    scale = float(np.median(residual_norms(model, prompts, 1, jnp.float64)))
    vectors = rng.normal(scale=scale, size=(3, model.spec.width))
    return model, prompts, vectors


@functools.lru_cache(maxsize=None)
def _evaluator(fn, rowwise: bool):
    """jit(alphas [A, k] -> vmapped logits [A, B, V], and the one-pass rowwise form at the
    first B alpha vectors when asked): one compile per closure."""
    rw = rowwise_of(fn)[0] if rowwise else None
    return jax.jit(lambda p, A: (jax.vmap(fn, in_axes=(None, 0))(p, A), None if rw is None else rw(p, A[:3])))


def test_one_term_is_the_scalar_closure(fixture):
    model, prompts, vectors = fixture
    alphas = jnp.asarray([-6.0, -0.5, 0.0, 1.0, 9.0])
    for positions in ("all", "last"):
        scalar = steered_closure(model, prompts, vectors[0], 1, positions, dtype=jnp.float64)
        multi = multi_steered_closure(model, prompts, vectors[:1], [1], [positions], dtype=jnp.float64)
        fn1 = scalar_of(multi.fn)  # fn1(params, alpha) is multi.fn(params, [alpha])
        both = jax.jit(lambda ps, pm, a: (jax.vmap(scalar.fn, in_axes=(None, 0))(ps, a),
                                          jax.vmap(fn1, in_axes=(None, 0))(pm, a)))
        want, got = (np.asarray(x) for x in both(scalar.params, multi.params, alphas))
        assert want.dtype == np.float64 and np.abs(want[-1] - want[2]).max() > 1e-2, "it steers nothing"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=positions)


CASES = {  # (layers, positions, preserve, check the rowwise form)
    "3 terms, 3 layers, mixed": ((0, 3, 2), ("all", "last", "all"), False, True),
    "2 terms, one layer, mixed, preserve": ((2, 2), ("all", "last"), True, False),
    "2 terms, all last, preserve": ((3, 1), ("last", "last"), True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_terms_equal_the_full_forward_pass(fixture, case):
    model, prompts, vectors = fixture
    layers, positions, preserve, rowwise = CASES[case]
    k = len(layers)
    A = np.random.default_rng(1).normal(scale=2.0, size=(4, k))
    A[0] = 0.0
    st = multi_steered_closure(model, prompts, vectors[:k], layers, positions, preserve=preserve, dtype=jnp.float64)
    full = multi_steered_logits_full(model, prompts, vectors[:k], layers, positions, A, preserve=preserve,
                                     dtype=jnp.float64)
    got, rw = _evaluator(st.fn, rowwise)(st.params, jnp.asarray(A))
    got = np.asarray(got)
    assert np.abs(full[1] - full[0]).max() > 1e-2, "the fixture steers nothing"
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-10, err_msg=f"{case}: closure != full forward pass")
    if rowwise:  # prompt j steered by A[j] in one pass
        np.testing.assert_allclose(np.asarray(rw), got[np.arange(3), np.arange(3)], rtol=0, atol=1e-10)
    if all(p == "last" for p in positions):
        assert "x" in st.params, "every term at 'last' must take the key/value-cache path"
        masked = multi_steered_closure(model, prompts, vectors[:k], layers, positions, preserve=preserve,
                                       dtype=jnp.float64, cache_last=False)
        np.testing.assert_allclose(np.asarray(_evaluator(masked.fn, False)(masked.params, jnp.asarray(A))[0]), got,
                                   rtol=0, atol=1e-10, err_msg="cache path != all-positions path with last masks")


def test_median_residual_norm(fixture):
    model, prompts, _ = fixture
    norms = residual_norms(model, prompts, 1, jnp.float64)  # real tokens only
    assert norms.size == sum(p.size for p in prompts)
    assert median_residual_norm(model, prompts, 1, jnp.float64) == pytest.approx(float(np.median(norms)), rel=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[0, 4]), r"layer 4 of term 1 is outside \[0, 3\]"),
    (dict(positions=["all", "middle"]), r"positions 'middle' of term 1 must be one of"),
    (dict(layers=[0]), r"vectors has 2 terms, layers 1, positions 2"),
    (dict(vectors=[np.ones(32), np.ones(16)]), r"steering vector 1 must have width 32"),
    (dict(vectors=np.zeros((0, 32))), r"at least one steering term"),
    (dict(rows="all", positions=["all", "all"]), r"rows='all' needs .* prompts of one length"),
])
def test_bad_terms_are_named(fixture, kwargs, match):
    model, prompts, _ = fixture
    args = dict(vectors=[np.ones(32), np.ones(32)], layers=[0, 1], positions=["all", "last"], rows="last")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        multi_steered_closure(model, prompts, args["vectors"], args["layers"], args["positions"], args["rows"])
