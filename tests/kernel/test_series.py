"""The one-pass Taylor series (kernel.series) against nested forward mode and closed forms,
and its cost: three streams of products, not nested jvp's four."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.kernel.series import direction_jets, series_jets
from ufmjax.kernel.taylor import closure_jets, nested_jets
from ufmjax.models import gpt
from ufmjax.models.hf import load_decoder
from ufmjax.models.hf import steered_closure as hf_closure

GEMMA = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "gemma3"


def _both(fn, params, alphas, order=2):
    """(series, nested jvp) jets at every alpha, vmapped and jitted."""
    f = jax.jit(jax.vmap(lambda a: (series_jets(fn, params, a, order), nested_jets(fn, params, a, order))))
    return f(jnp.asarray(alphas))


def _assert_equal(ser, ref, rtol):
    assert len(ser) == len(ref)
    for a, b in zip(ser, ref):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0
        assert float(jnp.max(jnp.abs(a - b))) <= rtol * scale


def test_closed_forms_of_products_and_nonlinearities(x64):
    """f(a) = sum(exp(a w) * (c + a u)^2) / (1 + a^2): every rule (bilinear cross terms,
    an exponential, a quotient of two moving factors, a constant weight) against the
    derivatives written by hand."""
    rng = np.random.default_rng(0)
    w, u, c = (jnp.asarray(rng.normal(size=5)) for _ in range(3))
    W = jnp.asarray(rng.normal(size=(5, 4)))

    def fn(p, a):
        return ((jnp.exp(a * p["w"]) * (p["c"] + a * p["u"]) ** 2) @ p["W"]) / (1 + a * a)

    params = {"w": w, "u": u, "c": c, "W": W}
    for a in (-0.7, 0.0, 1.3):
        e, s = jnp.exp(a * w), c + a * u
        g, h = e * s * s, 1 + a * a
        g1 = e * (w * s * s + 2 * u * s)
        g2 = e * (w * w * s * s + 4 * w * u * s + 2 * u * u)
        G, G1, G2 = g @ W, g1 @ W, g2 @ W
        want = (G / h, G1 / h - G * 2 * a / h**2, G2 / h - 2 * G1 * 2 * a / h**2 + G * (8 * a * a / h**3 - 2 / h**2))
        got = series_jets(fn, params, jnp.asarray(a), 2)
        for x, y in zip(got, want):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)


def test_first_order_and_constant_outputs(x64):
    fn = lambda p, a: jnp.tanh(p * a)  # noqa: E731
    p = jnp.asarray([0.5, -2.0])
    x, d1 = series_jets(fn, p, jnp.asarray(0.3), 1)
    np.testing.assert_allclose(np.asarray(d1), np.asarray(p / jnp.cosh(p * 0.3) ** 2), rtol=1e-13)
    x, d1, d2 = series_jets(lambda q, a: q * 2.0, p, jnp.asarray(0.3), 2)
    assert float(jnp.max(jnp.abs(d1))) == 0.0 and float(jnp.max(jnp.abs(d2))) == 0.0
    np.testing.assert_array_equal(np.asarray(x), np.asarray(p * 2.0))


@pytest.mark.parametrize("positions,rows", [("all", "last"), ("last", "last"), ("all", "all")])
def test_gpt_equals_nested_forward_mode(x64, positions, rows):
    model = gpt.init_gpt(gpt.GPTConfig(vocab=23, context=8, layers=3, width=24, heads=2), seed=1)
    rng = np.random.default_rng(2)
    prompts = rng.integers(0, 23, (3, 8))
    v = rng.normal(size=24)
    st = gpt.steered_closure(model, prompts, v, 1, positions, rows=rows, dtype=jnp.float64)
    ser, ref = _both(st.fn, st.params, np.linspace(-4, 4, 5))
    _assert_equal(ser, ref, 1e-12)


def test_pretrained_gemma3_equals_nested_forward_mode(x64):
    """Gemma 3: RMSNorm (1 + w), sliding windows, RoPE, GeGLU, soft caps where configured."""
    model = load_decoder(GEMMA, "float64")
    ref_npz = np.load(GEMMA / "reference.npz")
    prompts = [ref_npz[f"prompt_{i}"] for i in range(int(ref_npz["num_prompts"]))]
    for positions in ("all", "last"):
        st = hf_closure(model, prompts, ref_npz["vector"], 1, positions, dtype=jnp.float64)
        ser, ref = _both(st.fn, st.params, [-3.0, 0.0, 2.5])
        _assert_equal(ser, ref, 1e-11)


def _flops(f, *args) -> float:
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("positions", ["all", "last"])
def test_both_derivatives_cost_at_most_3_2_values(positions):
    """XLA's flop count of the compiled program (deterministic, not a timing): values,
    value + both derivatives by the series pass (<= 3.2x: three streams of products, cross
    terms only where two factors move) and by nested jvp (more: a fourth stream). The kernel's
    generic path (closure_jets) is the series pass; multi_jets is direction_jets (k terms)."""
    D = 192
    model = gpt.init_gpt(gpt.GPTConfig(vocab=500, context=32, layers=4, width=D, heads=4), seed=0)
    prompts = np.random.default_rng(0).integers(0, 500, (4, 32))
    st = gpt.steered_closure(model, prompts, np.ones(D, np.float32), 2, positions)
    A = jnp.linspace(-1.0, 1.0, 8)
    values = _flops(jax.vmap(lambda a: st.fn(st.params, a)), A)
    series = _flops(jax.vmap(lambda a: series_jets(st.fn, st.params, a, 2)), A)
    nested = _flops(jax.vmap(lambda a: nested_jets(st.fn, st.params, a, 2)), A)
    kernel = _flops(jax.vmap(lambda a: closure_jets(st.fn, st.params, a, 2)), A)
    assert series <= 3.2 * values, (series / values, nested / values)
    assert nested > 1.1 * series
    assert kernel == series  # the kernel's generic path takes the series pass
    print(f"{positions}: series {series / values:.3f}x, nested {nested / values:.3f}x the values' flops")


def test_integer_and_boolean_intermediates(x64):
    """A comparison and an argmax of moving values (norm-preserving steering guards its division
    with one) carry no series; the result equals nested forward mode."""
    def fn(p, a):
        h = p + a * jnp.arange(1.0, 4.0)
        n = jnp.linalg.norm(h)
        safe = jnp.where(n > 0, h / jnp.where(n > 0, n, 1.0), 0.0)
        return jnp.tanh(safe) * h[jnp.argmax(h)]

    p = jnp.asarray([0.3, -1.2, 2.0])
    for a in (-0.4, 0.7):
        for x, y in zip(series_jets(fn, p, jnp.asarray(a), 2), nested_jets(fn, p, jnp.asarray(a), 2)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_k_directions_equal_nested_forward_mode(x64, positions):
    """Gradients [k] and Hessians [k, k] of a 3-term GPT closure (terms at two layers) by the
    series pass along k directions equal nested forward mode; the Hessian is symmetric; its
    flop count is below nested forward mode's."""
    from ufmjax.kernel.multi import nested_multi_jets

    model = gpt.init_gpt(gpt.GPTConfig(vocab=19, context=6, layers=3, width=16, heads=2), seed=3)
    rng = np.random.default_rng(4)
    prompts = rng.integers(0, 19, (2, 6))
    vectors = rng.normal(size=(3, 16))
    st = gpt.multi_steered_closure(model, prompts, vectors, [1, 2, 1], [positions] * 3, dtype=jnp.float64)
    pts = jnp.asarray(rng.normal(size=(4, 3)))
    ser = jax.jit(jax.vmap(lambda a: direction_jets(st.fn, st.params, a, 2)))(pts)
    ref = jax.jit(jax.vmap(lambda a: nested_multi_jets(st.fn, st.params, a, 2)))(pts)
    _assert_equal(ser, ref, 1e-11)
    np.testing.assert_array_equal(np.asarray(ser[2]), np.asarray(jnp.swapaxes(ser[2], 1, 2)))
    with jax.enable_x64(False):
        st32 = gpt.multi_steered_closure(model, prompts, vectors, [1, 2, 1], [positions] * 3)
        a32 = jnp.zeros((4, 3), jnp.float32)
        f_ser = _flops(jax.vmap(lambda a: direction_jets(st32.fn, st32.params, a, 2)), a32)
        f_nest = _flops(jax.vmap(lambda a: nested_multi_jets(st32.fn, st32.params, a, 2)), a32)
    assert f_ser < f_nest, (f_ser, f_nest)
    print(f"{positions}: k = 3 series {f_ser:.3g} flops, nested {f_nest:.3g}")


def test_an_order_other_than_0_1_2_is_refused():
    for f, a in ((series_jets, jnp.asarray(0.5)), (direction_jets, jnp.zeros(2))):
        with pytest.raises(ValueError, match="must be 0, 1 or 2"):
            f(lambda p, x: p * jnp.sum(x), jnp.ones(2), a, 3)
