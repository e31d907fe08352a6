"""Multi-term steering (alpha in R^k) and the norm conventions: identities, not shapes.

k = 1 is today's scalar closure (to 1e-12, float64); k = 2, 3 terms at several layers and
mixed positions equal a plain full forward pass with every addition (Eq. 1 per term); the
key/value-cached last-position path equals the all-positions path with last-position masks;
forward-mode derivatives equal central differences; norm-preserving steering keeps every
steered residual's norm. Every compiled program is built once per closure (`_evaluator`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufmjax.common import cast_floats
from ufmjax.models.gpt import (
    GPTConfig,
    cast_model,
    init_gpt,
    median_residual_norm,
    multi_steered_closure,
    multi_steered_logits_full,
    residual,
    steered_closure,
)
from ufmjax.models.ufm import (
    UFM,
    UFMConfig,
    ufm_median_norm,
    ufm_multi_logits,
    ufm_multi_preserve_logits,
    ufm_multi_steered,
    ufm_steered,
)
from ufmjax.steering import (
    NORMS,
    Steered,
    Term,
    check_norm,
    is_affine,
    linear_logits,
    linear_multi_logits,
    linear_multi_steered,
    preserve_norm,
    rowwise_of,
    scalar_of,
    scale_vector,
    split_terms,
)

# test_gpt.py's model: in one pytest process its compiled initialiser is shared.
CFG = GPTConfig(vocab=11, context=8, layers=2, width=16, heads=2, mlp_ratio=2, init_scale=0.3)
B, T = 3, 5


@pytest.fixture(scope="module", autouse=True)
def x64():
    """Every test here compares to 1e-10 or tighter: float64 throughout."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def model():
    return init_gpt(CFG, 0)


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(0).integers(0, CFG.vocab, size=(B, T)).astype(np.int32)


@pytest.fixture(scope="module")
def vectors():
    # Representable in float32, so the scalar closure (which rounds v to float32 first) and
    # the multi closure (which keeps float64) steer along the very same vector.
    v = np.random.default_rng(1).normal(size=(3, CFG.width))
    return v.astype(np.float32).astype(np.float64)


@functools.lru_cache(maxsize=None)
def _evaluator(fn, rowwise: bool):
    """jit(alphas [A, k] -> vmapped logits [A, M, V], and the one-pass rowwise form at the
    first B alpha vectors when asked): one compile per closure."""
    rw = rowwise_of(fn)[0] if rowwise else None

    def run(params, A):
        y = jax.vmap(fn, in_axes=(None, 0))(params, A)
        return (y, rw(params, A[:B])) if rw is not None else (y, None)

    return jax.jit(run)


def _sweep(st, A, rowwise=False):
    y, r = _evaluator(st.fn, rowwise)(st.params, jnp.asarray(A, jnp.float64))
    return np.asarray(y), (None if r is None else np.asarray(r))


# ---------------------------------------------------------------- norm conventions and helpers

def test_norm_conventions():
    v = np.array([3.0, -4.0, 0.0])
    np.testing.assert_array_equal(scale_vector(v, "raw"), v)
    np.testing.assert_array_equal(scale_vector(v, "preserve"), v)
    np.testing.assert_allclose(scale_vector(v, "unit"), v / 5.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(scale_vector(v, "residual", residual_norm=7.0), v / 5.0 * 7.0, rtol=0, atol=1e-14)
    assert scale_vector(v.astype(np.float32), "raw").dtype == np.float64
    assert check_norm("unit") == "unit" and NORMS == ("raw", "unit", "residual", "preserve")
    with pytest.raises(ValueError, match=r"normalize must be one of .*'raw'.*'preserve'"):
        check_norm("l2")
    for bad in (np.zeros(3), np.array([1.0, np.nan, 0.0])):
        with pytest.raises(ValueError, match="normalize='unit'"):
            scale_vector(bad, "unit")
        with pytest.raises(ValueError, match="normalize='residual'"):
            scale_vector(bad, "residual", residual_norm=1.0)
    for r in (None, 0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match="residual norm"):
            scale_vector(v, "residual", residual_norm=r)


def test_preserve_norm_keeps_row_norms_and_padding_rows():
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(2, 4, 6)))
    s = jnp.asarray(rng.normal(size=(2, 4, 6))).at[1, 2].set(0.0)  # one padding row
    out = np.asarray(preserve_norm(h, s))
    n_h, n_out = np.linalg.norm(np.asarray(h), axis=-1), np.linalg.norm(out, axis=-1)
    keep = np.ones((2, 4), bool)
    keep[1, 2] = False
    np.testing.assert_allclose(n_out[keep], n_h[keep], rtol=1e-12)
    np.testing.assert_array_equal(out[1, 2], 0.0)  # unchanged, not NaN
    # The direction is the steered one.
    np.testing.assert_allclose(out[keep] / n_out[keep][:, None],
                               np.asarray(s)[keep] / np.linalg.norm(np.asarray(s)[keep], axis=-1)[:, None], atol=1e-12)
    # Derivatives stay finite through the zero row (the kernel differentiates in alpha).
    v = jnp.asarray(rng.normal(size=(2, 4, 6)))
    d, g = jax.jit(lambda a: (jax.jacfwd(lambda b: preserve_norm(h, b * v))(a),
                              jax.grad(lambda b: jnp.sum(preserve_norm(h, s + b * v)))(a)))(jnp.zeros(()))
    assert np.all(np.isfinite(np.asarray(d))) and np.isfinite(float(g))


def test_linear_multi_and_scalar_of():
    rng = np.random.default_rng(3)
    base, dirs = rng.normal(size=(4, 7)), rng.normal(size=(3, 4, 7))
    st = linear_multi_steered(base, dirs)
    a = rng.normal(size=3)
    np.testing.assert_allclose(np.asarray(st.fn(st.params, jnp.asarray(a))),
                               base + np.einsum("k,kmv->mv", a, dirs), atol=1e-12)
    assert is_affine(linear_multi_logits)
    rw, one_pass = rowwise_of(linear_multi_logits)
    a_M = rng.normal(size=(4, 3))
    want = np.stack([np.asarray(st.fn(st.params, jnp.asarray(a_M[j])))[j] for j in range(4)])
    assert one_pass
    np.testing.assert_allclose(np.asarray(rw(st.params, jnp.asarray(a_M))), want, atol=1e-12)
    # k = 1 through scalar_of: the scalar contract, affine kept, one-pass rowwise kept.
    one = linear_multi_steered(base, dirs[:1])
    fn1 = scalar_of(linear_multi_logits)
    assert scalar_of(linear_multi_logits) is fn1 and is_affine(fn1)
    for alpha in (-3.0, 0.0, 0.7):
        np.testing.assert_array_equal(np.asarray(fn1(one.params, jnp.asarray(alpha))),
                                      np.asarray(linear_logits({"base": base, "direction": dirs[0]}, alpha)))
    rw1, one_pass1 = rowwise_of(fn1)
    assert one_pass1
    np.testing.assert_allclose(np.asarray(rw1(one.params, jnp.asarray(a_M[:, 0]))),
                               base + a_M[:, :1] * dirs[0], atol=1e-12)
    with pytest.raises(ValueError, match="directions"):
        linear_multi_steered(base, dirs[0])


def test_terms_split():
    v = np.ones(4)
    vectors, layers, positions = split_terms([Term(v, 1, "last"), (2 * v, 0)])
    assert layers == [1, 0] and positions == ["last", "all"]
    np.testing.assert_array_equal(vectors[1], 2 * v)


# ---------------------------------------------------------------- UFM

@pytest.fixture(scope="module")
def ufm():
    return UFM(UFMConfig(vocab=7, contexts=5, dim=6), rngs=nnx.Rngs(0))


def test_ufm_one_term_is_the_scalar_closure(ufm):
    v = np.random.default_rng(4).normal(size=6)
    multi, scalar = ufm_multi_steered(ufm, v[None]), ufm_steered(ufm, v)
    fn1 = scalar_of(multi.fn)
    assert is_affine(multi.fn) and is_affine(fn1)
    for alpha in (-20.0, -1.5, 0.0, 0.3, 8.0):
        want = np.asarray(scalar.fn(scalar.params, jnp.asarray(alpha)))
        np.testing.assert_allclose(np.asarray(multi.fn(multi.params, jnp.asarray([alpha]))), want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(fn1(multi.params, jnp.asarray(alpha))), want, rtol=0, atol=1e-12)


def test_ufm_several_terms_and_preserve(ufm):
    rng = np.random.default_rng(5)
    V = rng.normal(size=(3, 6))
    W, H = np.asarray(ufm.W[...], np.float64), np.asarray(ufm.H[...], np.float64)
    # The UFM draws float32 parameters: the closures' params in float64 for a 1e-12 check.
    st, pr = (Steered(s.fn, cast_floats(s.params, jnp.float64))
              for s in (ufm_multi_steered(ufm, V), ufm_multi_steered(ufm, list(V), preserve=True)))
    assert st.fn is ufm_multi_logits and pr.fn is ufm_multi_preserve_logits
    assert not is_affine(ufm_multi_preserve_logits)
    for a in rng.normal(scale=2.0, size=(4, 3)):
        s_MxD = H.T + a @ V  # h_j + sum_i alpha_i v_i
        np.testing.assert_allclose(np.asarray(st.fn(st.params, jnp.asarray(a))), s_MxD @ W.T, atol=1e-12)
        r_MxD = s_MxD * (np.linalg.norm(H.T, axis=1) / np.linalg.norm(s_MxD, axis=1))[:, None]
        np.testing.assert_allclose(np.linalg.norm(r_MxD, axis=1), np.linalg.norm(H.T, axis=1), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(pr.fn(pr.params, jnp.asarray(a))), r_MxD @ W.T, atol=1e-12)
    for fn, params in ((st.fn, st.params), (pr.fn, pr.params)):
        rw, one_pass = rowwise_of(fn)
        a_M = rng.normal(size=(5, 3))
        want = np.stack([np.asarray(fn(params, jnp.asarray(a_M[j])))[j] for j in range(5)])
        assert one_pass
        np.testing.assert_allclose(np.asarray(rw(params, jnp.asarray(a_M))), want, atol=1e-12)
    assert ufm_median_norm(ufm) == pytest.approx(float(np.median(np.linalg.norm(H, axis=0))), rel=1e-12)


def test_ufm_bad_vectors_are_named(ufm):
    with pytest.raises(ValueError, match="steering vector 1 must have width 6"):
        ufm_multi_steered(ufm, [np.ones(6), np.ones(5)])
    with pytest.raises(ValueError, match="at least one steering term"):
        ufm_multi_steered(ufm, [])
    with pytest.raises(ValueError, match="steering vector 0 must hold finite"):
        ufm_multi_steered(ufm, [np.full(6, np.inf)])


# ---------------------------------------------------------------- GPT, k = 1

@pytest.mark.parametrize("layer,positions,rows", [(1, "all", "last"), (0, "last", "last"), (2, "all", "all")])
def test_gpt_one_term_is_the_scalar_closure(model, prompts, vectors, layer, positions, rows):
    alphas = np.array([-12.0, -1.0, 0.0, 0.4, 3.0, 30.0])
    scalar = steered_closure(model, prompts, vectors[0], layer, positions, rows, dtype=jnp.float64)
    multi = multi_steered_closure(model, prompts, vectors[:1], [layer], [positions], rows, dtype=jnp.float64)
    fn1 = scalar_of(multi.fn)

    # fn1(params, alpha) is multi.fn(params, [alpha]): one compiled program checks both.
    both = jax.jit(lambda ps, pm, a_A: (jax.vmap(scalar.fn, in_axes=(None, 0))(ps, a_A),
                                        jax.vmap(fn1, in_axes=(None, 0))(pm, a_A)))
    want, got = (np.asarray(x) for x in both(scalar.params, multi.params, jnp.asarray(alphas)))
    assert want.dtype == np.float64 and np.abs(want[-1] - want[2]).max() > 1e-2  # it steers
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- GPT, k = 2, 3

CASES = {  # (layers, positions, preserve, check the rowwise form)
    "3 terms, 2 layers, mixed at one": ((0, 2, 0), ("all", "last", "last"), False, True),
    "2 terms, 2 layers": ((2, 1), ("all", "all"), False, False),
    "2 terms, one layer, mixed, preserve": ((1, 1), ("last", "all"), True, False),
    "2 terms, all last, preserve": ((2, 0), ("last", "last"), True, True),
}


def _case(model, prompts, vectors, case, **kw):
    layers, positions, preserve, _ = CASES[case]
    return multi_steered_closure(model, prompts, vectors[:len(layers)], layers, positions, preserve=preserve,
                                 dtype=jnp.float64, **kw)


def _grid(k):
    """2k alpha vectors, the first at 0: as many as a central difference at one point needs,
    so the jacfwd test reuses this compiled shape."""
    A = np.random.default_rng(6).normal(scale=3.0, size=(2 * k, k))
    A[0] = 0.0
    return A


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_terms_equal_the_full_forward_pass(model, prompts, vectors, case):
    layers, positions, preserve, rowwise = CASES[case]
    k = len(layers)
    A = _grid(k)
    st = _case(model, prompts, vectors, case)
    full = multi_steered_logits_full(model, prompts, vectors[:k], layers, positions, A, preserve=preserve,
                                     dtype=jnp.float64)
    got, rw = _sweep(st, A, rowwise)
    assert np.abs(full[1] - full[0]).max() > 1e-2, "the test model steers nothing"
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-10, err_msg=f"{case}: closure != full forward pass")
    if rowwise:  # prompt j steered by A[j] in one pass (the per-prompt optimiser's form)
        np.testing.assert_allclose(rw, got[np.arange(B), np.arange(B)], rtol=0, atol=1e-10)
    if all(p == "last" for p in positions):
        assert "x" in st.params, "every term at 'last' must take the key/value-cache path"
        masked = _case(model, prompts, vectors, case, cache_last=False)
        assert "h" in masked.params
        np.testing.assert_allclose(_sweep(masked, A)[0], got, rtol=0, atol=1e-10,
                                   err_msg="the cache path != the all-positions path with last-position masks")


def test_gpt_every_row_equals_the_full_forward_pass(model, prompts, vectors):
    layers, positions = (2, 1), ("all", "all")
    A = np.random.default_rng(7).normal(scale=2.0, size=(3, 2))
    st = multi_steered_closure(model, prompts, vectors[:2], layers, positions, rows="all", dtype=jnp.float64)
    full = multi_steered_logits_full(model, prompts, vectors[:2], layers, positions, A, dtype=jnp.float64, rows="all")
    np.testing.assert_allclose(_sweep(st, A)[0], full.reshape(3, B * T, CFG.vocab), rtol=0, atol=1e-10)


def _jacfwd_error(fn, params, a, h=1e-5, evaluate=None):
    """max |jacfwd - central differences| / max |central differences| at alpha_k = a."""
    k = a.shape[0]
    E = np.eye(k)
    points = np.concatenate([a + h * E, a - h * E])  # [2k, k]
    if evaluate is None:
        evaluate = jax.jit(jax.vmap(fn, in_axes=(None, 0)))
    y = np.asarray(evaluate(params, jnp.asarray(points)))
    J = np.asarray(jax.jit(lambda p, a: jax.jacfwd(functools.partial(fn, p))(a))(params, jnp.asarray(a)))
    fd = np.moveaxis((y[:k] - y[k:]) / (2 * h), 0, -1)  # [M, V, k] like jacfwd
    assert np.all(np.abs(fd).max(axis=(0, 1)) > 1e-4), "a term does not steer"
    return np.abs(J - fd).max() / np.abs(fd).max()


@pytest.mark.parametrize("case", ["2 terms, 2 layers", "2 terms, all last, preserve"])
def test_gpt_jacfwd_equals_central_differences(model, prompts, vectors, case):
    """Forward-mode d logits / d alpha_k (what the kernel takes) on 2-term GPTs, the second
    through the cache path and the norm-preserving rescale."""
    st = _case(model, prompts, vectors, case)

    def evaluate(params, A):  # the compiled program of the test above (same [2k, k] grid)
        return _sweep(st, A, CASES[case][3])[0]

    assert _jacfwd_error(st.fn, st.params, np.array([0.7, -1.9]), evaluate=evaluate) <= 1e-6


def test_ufm_preserve_jacfwd_equals_central_differences(ufm):
    """Through the norm-preserving rescale too (its safe denominators keep jvp exact)."""
    st = ufm_multi_steered(ufm, np.random.default_rng(8).normal(size=(2, 6)), preserve=True)
    params = cast_floats(st.params, jnp.float64)
    assert _jacfwd_error(st.fn, params, np.array([0.8, -1.7])) <= 1e-6


def test_gpt_preserve_against_a_hand_rescaled_residual(model, prompts, vectors):
    """One term at layer 1, every position: the logits are those of the residual h + alpha v
    rescaled by hand to |h|, and that residual has the unsteered norms."""
    m64 = cast_model(model, jnp.float64)
    graphdef, state = nnx.split(m64)
    forward = jax.jit(lambda s, toks, add: nnx.merge(graphdef, s)(toks, 1, add)[:, -1])
    h = np.asarray(m64.prefix(jnp.asarray(prompts), 1))
    v = vectors[0]
    alphas = np.array([-6.0, 0.5, 4.0])
    st = multi_steered_closure(model, prompts, v[None], [1], ["all"], preserve=True, dtype=jnp.float64)
    got = _sweep(st, alphas[:, None])[0]
    for a, y in zip(alphas, got):
        s = h + a * v
        r = s * (np.linalg.norm(h, axis=-1) / np.linalg.norm(s, axis=-1))[..., None]
        np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(h, axis=-1), rtol=1e-5)
        np.testing.assert_allclose(y, np.asarray(forward(state, jnp.asarray(prompts), jnp.asarray(r - h))),
                                   rtol=0, atol=1e-10)


def test_gpt_median_residual_norm(model, prompts):
    h = residual(model, prompts, 1)
    assert median_residual_norm(model, prompts, 1) == pytest.approx(
        float(np.median(np.linalg.norm(h.astype(np.float64), axis=-1))), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[0, 7]), r"layer 7 of term 1 is outside \[0, 2\]"),
    (dict(layers=[0, -1]), r"layer -1 of term 1 is outside \[0, 2\]"),
    (dict(layers=[0, 1.5]), r"layer 1.5 of term 1 must be an integer"),
    (dict(positions=["all", "first"]), r"positions 'first' of term 1 must be one of"),
    (dict(layers=[0, 1, 2]), r"vectors has 2 terms, layers 3, positions 2"),
    (dict(positions=["all"]), r"vectors has 2 terms, layers 2, positions 1"),
    (dict(vectors=[np.ones(16), np.ones(7)]), r"steering vector 1 must have width 16"),
    (dict(vectors=[]), r"at least one steering term"),
    (dict(rows="every"), r"rows must be"),
    (dict(rows="all"), r"rows='all'.*positions='all'"),
])
def test_gpt_bad_terms_are_named(model, prompts, kwargs, match):
    args = dict(vectors=[np.ones(16), np.ones(16)], layers=[0, 1], positions=["all", "last"])
    args.update(kwargs)
    rows = args.pop("rows", "last")
    with pytest.raises(ValueError, match=match):
        multi_steered_closure(model, prompts, args["vectors"], args["layers"], args["positions"], rows)


def test_gpt_reference_checks_the_alpha_shape(model, prompts, vectors):
    with pytest.raises(ValueError, match=r"alphas must be \[A, 2\]"):
        multi_steered_logits_full(model, prompts, vectors[:2], [0, 1], ["all", "all"], np.zeros((4, 3)))
