"""The k-term kernel (alpha in R^k) against the tilt's closed forms, central differences, the
scalar kernel (k = 1) and itself (bootstrap batch == separate sweeps, chunked == unchunked)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.kernel import MULTI_PREFIXES, multi_sweep, parse_product_grid, sweep
from ufmjax.kernel.multi import MultiEvaluator, scalar_view
from ufmjax.kernel.measure import make_measure
from ufmjax.steering import Steered, linear_steered
from ufmjax.theory import several


def affine_k(params, alpha_k):
    """Logits l + sum_i alpha_i M_i: the UFM with k vectors (M_i = W v_i shared by the rows)."""
    return params["l"] + jnp.tensordot(alpha_k, params["M"], axes=1)[None, :]


def nonlinear_k(params, alpha_k):
    """A closure that is not affine in alpha (cross terms and curvature), for the chain rule."""
    s = jnp.tensordot(alpha_k, params["M"], axes=1)
    return params["l"] + 2.0 * jnp.tanh(s)[None, :] + 0.3 * (alpha_k[0] * alpha_k[-1]) * params["l"] ** 2


def problem(rng, k, M=4, V=7, G=3):
    p = rng.dirichlet(np.ones(V), size=M)
    Mk = rng.normal(size=(k, V))
    concept_of = np.arange(V) % G
    return p, Mk, concept_of


@pytest.mark.parametrize("k", [2, 3])
def test_ufm_gradients_and_hessians_equal_the_tilt(x64, rng, k):
    """UFM, k = 2, 3: grad and Hessian of every quantity == E[M], Cov(M) closed forms, 1e-8."""
    p, Mk, concept_of = problem(rng, k)
    st = Steered(affine_k, {"l": jnp.asarray(np.log(p)), "M": jnp.asarray(Mk)})
    points = rng.normal(scale=1.5, size=(9, k))
    out = multi_sweep(st, points, k=k, concept_of=concept_of, dtype=jnp.float64)
    for a, alpha in enumerate(points):
        pa, dp, d2p = several.token_grad_hess(p, Mk, alpha)
        np.testing.assert_allclose(out["delta_p"][a], pa - p, atol=1e-10)
        np.testing.assert_allclose(out["grad_delta_p"][a], dp, atol=1e-8)
        np.testing.assert_allclose(out["hess_delta_p"][a], d2p, atol=1e-8)
        F, dF, d2F = several.concept_grad_hess(p, Mk, alpha, concept_of)
        np.testing.assert_allclose(out["grad_concept_prob"][a], dF, atol=1e-8)
        np.testing.assert_allclose(out["hess_concept_prob"][a], d2F, atol=1e-8)
        ce, dce, d2ce = several.delta_ce_grad_hess(p, Mk, alpha)
        np.testing.assert_allclose(out["delta_ce_ctx"][a], ce, atol=1e-9)
        np.testing.assert_allclose(out["grad_delta_ce_ctx"][a], dce, atol=1e-8)
        np.testing.assert_allclose(out["hess_delta_ce_ctx"][a], d2ce, atol=1e-8)
        # With t = p_0 the CE gradient is E_alpha[M] - E_0[M] and the Hessian Cov_alpha(M).
        E, cov, _ = several.moments(p, Mk, alpha)
        E0, _, _ = several.moments(p, Mk, np.zeros(k))
        np.testing.assert_allclose(out["grad_delta_ce_ctx"][a], E - E0, atol=1e-8)
        np.testing.assert_allclose(out["hess_delta_ce"][a], cov.mean(axis=0), atol=1e-8)
        kl, dkl, d2kl = several.kl_grad_hess(p, Mk, alpha)
        np.testing.assert_allclose(out["kl"][a], kl, atol=1e-9)
        np.testing.assert_allclose(out["grad_kl"][a], dkl, atol=1e-8)
        np.testing.assert_allclose(out["hess_kl"][a], d2kl, atol=1e-8)
        H, dH, d2H = several.entropy_grad_hess(p, Mk, alpha)
        np.testing.assert_allclose(out["entropy"][a], H, atol=1e-9)
        np.testing.assert_allclose(out["grad_entropy"][a], dH, atol=1e-8)
        np.testing.assert_allclose(out["hess_entropy"][a], d2H, atol=1e-8)
    for name in ("delta_p", "concept_prob", "delta_ce", "kl", "entropy"):
        h = out["hess_" + name]
        np.testing.assert_allclose(h, np.swapaxes(h, -1, -2), rtol=1e-13, atol=1e-16)  # symmetric


def test_nonlinear_closure_equals_central_differences(x64, rng):
    """A closure with cross terms: grad == central differences of the values, Hessian ==
    central differences of the gradient (float64)."""
    k = 3
    p, Mk, concept_of = problem(rng, k)
    st = Steered(nonlinear_k, {"l": jnp.asarray(np.log(p)), "M": jnp.asarray(Mk)})
    alpha = rng.normal(size=k)
    h = 1e-5
    pts = [alpha] + [alpha + s * h * e for e in np.eye(k) for s in (1, -1)]
    out = multi_sweep(st, np.stack(pts), k=k, concept_of=concept_of, dtype=jnp.float64)
    for name in ("delta_p", "concept_prob", "delta_ce", "delta_ce_ctx", "kl", "entropy"):
        fd = np.stack([(out[name][1 + 2 * i] - out[name][2 + 2 * i]) / (2 * h) for i in range(k)], axis=-1)
        np.testing.assert_allclose(out["grad_" + name][0], fd, rtol=1e-6, atol=1e-8)
        fd2 = np.stack([(out["grad_" + name][1 + 2 * i] - out["grad_" + name][2 + 2 * i]) / (2 * h)
                        for i in range(k)], axis=-1)
        np.testing.assert_allclose(out["hess_" + name][0], fd2, rtol=1e-5, atol=1e-7)


def test_one_term_reproduces_the_scalar_kernel(x64, rng):
    """k = 1: values, grad[..., 0] and hess[..., 0, 0] == the scalar sweep (affine and taylor
    paths) to 1e-12."""
    p, Mk, concept_of = problem(rng, 1)
    alphas = np.linspace(-6, 6, 25)
    multi = multi_sweep(Steered(affine_k, {"l": jnp.asarray(np.log(p)), "M": jnp.asarray(Mk)}), alphas[:, None],
                        k=1, concept_of=concept_of, dtype=jnp.float64)
    for method in ("affine", "taylor"):
        one = sweep(linear_steered(np.log(p), Mk[0]), alphas, concept_of=concept_of, dtype=jnp.float64,
                    method=method)
        for name in ("delta_p", "concept_prob", "delta_p_concept", "delta_ce", "delta_ce_ctx", "kl", "entropy"):
            np.testing.assert_allclose(multi[name], one[name], atol=1e-12, rtol=0)
            np.testing.assert_allclose(multi["grad_" + name][..., 0], one["d_" + name], atol=1e-12, rtol=0)
            np.testing.assert_allclose(multi["hess_" + name][..., 0, 0], one["d2_" + name], atol=1e-12, rtol=0)
    np.testing.assert_array_equal(multi["alphas"], alphas[:, None])


def test_product_grid_chunked_equals_unchunked(rng):
    """A 2-D product grid: point order ('ij'), and chunks of any size give the same results."""
    grid = parse_product_grid("-2:2:5,-1:3:3", k=2)
    pts = grid.values()
    assert pts.shape == (15, 2) and grid.shape == (5, 3)
    np.testing.assert_array_equal(pts[:4], [[-2, -1], [-2, 1], [-2, 3], [-1, -1]])  # the last term varies fastest
    p, Mk, concept_of = problem(rng, 2)
    st = Steered(nonlinear_k, {"l": jnp.asarray(np.log(p), jnp.float32), "M": jnp.asarray(Mk, jnp.float32)})
    whole = multi_sweep(st, pts, k=2, concept_of=concept_of, chunk_size=64)
    for c in (1, 4):
        part = multi_sweep(st, pts, k=2, concept_of=concept_of, chunk_size=c)
        for key in whole:
            np.testing.assert_allclose(part[key], whole[key], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="alphas gives 2 grid"):
        parse_product_grid("-2:2:5,-1:3:3", k=3)
    with pytest.raises(ValueError, match="one column per steering term"):
        multi_sweep(st, pts, k=3, concept_of=concept_of)


def test_bootstrap_batch_equals_separate_sweeps(x64, rng):
    """B resampled vectors in one pass == B separate sweeps (float64, to 1e-10)."""
    k, B = 2, 5
    p, Mk, concept_of = problem(rng, k)
    l = jnp.asarray(np.log(p))
    M_B = rng.normal(size=(B, k, p.shape[1]))
    pts = rng.normal(size=(6, k))
    batch = multi_sweep(Steered(nonlinear_k, {"l": l, "M": jnp.asarray(M_B)}), pts, k=k, concept_of=concept_of,
                        batched=("M",), dtype=jnp.float64)
    assert batch["grad_kl"].shape == (6, B, p.shape[0], k)
    for b in range(B):
        one = multi_sweep(Steered(nonlinear_k, {"l": l, "M": jnp.asarray(M_B[b])}), pts, k=k, concept_of=concept_of,
                          dtype=jnp.float64)
        for name in ("delta_p", "concept_prob", "delta_ce", "kl", "entropy"):
            for prefix in MULTI_PREFIXES:
                np.testing.assert_allclose(batch[prefix + name][:, b], one[prefix + name], rtol=1e-10, atol=1e-12)


def test_evaluator_at_and_bad_points(x64, rng):
    p, Mk, concept_of = problem(rng, 2)
    st = Steered(affine_k, {"l": jnp.asarray(np.log(p)), "M": jnp.asarray(Mk)})
    ms = make_measure(scalar_view(st, 2), concept_of=concept_of, dtype=jnp.float64)
    ev = MultiEvaluator(st, ms, k=2, dtype=jnp.float64)
    out = ev.at([[0.0, 0.0]])
    np.testing.assert_allclose(out["kl"], 0.0, atol=1e-15)
    np.testing.assert_allclose(out["grad_kl"], 0.0, atol=1e-15)   # KL is flat at alpha = 0
    _, cov, _ = several.moments(p, Mk, np.zeros(2))
    np.testing.assert_allclose(out["hess_kl"][0], cov, atol=1e-12)  # the Fisher information
    for bad, match in (([[np.nan, 0.0]], "finite"), (np.zeros((0, 2)), "non-empty"), ([[1.0, 2.0, 3.0]], "column")):
        with pytest.raises(ValueError, match=match):
            ev.at(bad)


def test_gpt_two_terms_equal_central_differences(x64, rng):
    """A GPT with terms at two layers (one last-position): grad and Hessian of every quantity
    == central differences to 1e-3 relative (float64); the Hessian is symmetric."""
    from ufmjax.models.gpt import GPTConfig, cast_model, init_gpt, multi_steered_closure

    model = cast_model(init_gpt(GPTConfig(vocab=11, context=8, layers=2, width=16, heads=2, mlp_ratio=2,
                                          init_scale=0.3), seed=3), jnp.float64)
    prompts = rng.integers(0, 11, size=(3, 6))
    vectors = rng.normal(size=(2, 16))
    st = multi_steered_closure(model, prompts, vectors, [0, 1], ["all", "last"], dtype=jnp.float64)
    alpha, h = np.array([0.7, -0.4]), 1e-4
    pts = np.stack([alpha] + [alpha + s * h * e for e in np.eye(2) for s in (1, -1)])
    out = multi_sweep(st, pts, k=2, concept_of=np.arange(11) % 3, dtype=jnp.float64)
    for name in ("delta_p", "concept_prob", "delta_ce", "kl", "entropy"):
        fd = np.stack([(out[name][1 + 2 * i] - out[name][2 + 2 * i]) / (2 * h) for i in range(2)], axis=-1)
        close = np.abs(out["grad_" + name][0] - fd).max() / max(np.abs(fd).max(), 1e-12)
        assert close < 1e-3, (name, close)
        fd2 = np.stack([(out["grad_" + name][1 + 2 * i] - out["grad_" + name][2 + 2 * i]) / (2 * h)
                        for i in range(2)], axis=-1)
        close2 = np.abs(out["hess_" + name][0] - fd2).max() / max(np.abs(fd2).max(), 1e-12)
        assert close2 < 1e-3, (name, close2)
        hs = out["hess_" + name]
        np.testing.assert_allclose(hs, np.swapaxes(hs, -1, -2), rtol=1e-10, atol=1e-14)
