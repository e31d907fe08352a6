"""The optimiser over alpha in R^k on the reference UFM with two difference-of-means vectors:
Newton against a dense, zoomed 2-D grid and the float64 closed forms of `theory.several`, the
constrained objectives' KKT conditions, k = 1 against the scalar optimiser, optax against
Newton, the slope's sign, and the refusals."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.data import select_steering_sets
from ufmjax.models.ufm import ufm_multi_steered, ufm_steered, ufm_steering_vector
from ufmjax.optimize import (MultiProblem, Objective, Problem, grid_optimum, optimize, optimize_vector, slope_sign,
                             vector_landscape)
from ufmjax.theory import several

AXIS = np.linspace(-4.0, 4.0, 101)   # spacing 0.08: a 101 x 101 = 10,201-point dense grid
TARGETS = [(0, 1.0), (1, 0.5)]       # concept 0, and concept 1 at half weight


@pytest.fixture
def ufm2(reference_run, x64):
    """(run, the two vectors [2, D]): v_0 steers 0 against 1, v_1 steers 1 against 2."""
    run = reference_run
    V = np.stack([ufm_steering_vector(run.model, *select_steering_sets(run.data.context_concept, T)) for T in (0, 1)])
    return run, V


def multi(run, V, targets=TARGETS, **kw):
    d = run.data
    return MultiProblem(ufm_multi_steered(run.model, V), k=len(V), concept_of=d.concept_of, targets=targets,
                        ce_target=d.p_MxV, weights=d.pi, **kw)


def closed(run, V, alpha, targets=TARGETS):
    """dp, ΔCE, KL (values and gradients) at alpha from the exponential tilt (float64 numpy)."""
    d, m = run.data, run.model
    W, H = np.asarray(m.W[...], np.float64), np.asarray(m.H[...], np.float64)
    logits = (W @ H).T
    p0 = np.exp(logits - logits.max(1, keepdims=True))
    p0 /= p0.sum(1, keepdims=True)
    Mk = np.asarray(V, np.float64) @ W.T                       # [k, V]: W v_i
    w = d.pi / d.pi.sum()
    size = np.bincount(d.concept_of)
    F, dF, _ = several.concept_grad_hess(p0, Mk, alpha, d.concept_of)
    F0, _, _ = several.concept_grad_hess(p0, Mk, np.zeros(len(Mk)), d.concept_of)
    dp = sum(wt * w @ (F[:, T] - F0[:, T]) / size[T] for T, wt in targets)
    ddp = sum(wt * w @ dF[:, T] / size[T] for T, wt in targets)
    ce, dce, _ = several.delta_ce_grad_hess(p0, Mk, alpha, targets_MxV=d.p_MxV)
    kl, dkl, _ = several.kl_grad_hess(p0, Mk, alpha)
    return {"dp": dp, "ddp": ddp, "ce": w @ ce, "dce": w @ dce, "kl": w @ kl, "dkl": w @ dkl,
            "F": w @ F[:, targets[0][0]], "dF": w @ dF[:, targets[0][0]]}


def parallel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return abs(a[0] * b[1] - a[1] * b[0]) / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.mark.parametrize("metric", ["ce", "kl"])
def test_newton_equals_the_refined_grid_with_20x_fewer_evaluations(ufm2, metric):
    run, V = ufm2
    pb = multi(run, V)
    obj = Objective("penalised", lam=0.1, metric=metric)
    res = optimize_vector(pb, obj)
    grid = grid_optimum(pb, obj, [AXIS, AXIS])
    diff = float(np.max(np.abs(np.subtract(res.alpha, grid["alpha"]))))
    print(f"\n{metric}: newton {res.alpha} in {res.evaluations} evaluations ({res.iterations} steps); grid "
          f"{grid['alpha']} in {grid['evaluations']} ({grid['grid_evaluations']} dense + {grid['rounds']} zooms); "
          f"|diff| {diff:.2e}, ratio {grid['evaluations'] / res.evaluations:.0f}x")
    assert res.converged, res.message
    assert not grid["on_grid_edge"]
    assert diff <= 1e-4
    assert res.objective >= grid["objective"] - 1e-12           # no grid point beats it
    assert grid["grid_evaluations"] >= 20 * res.evaluations
    assert grid["evaluations"] >= 20 * res.evaluations
    assert np.linalg.eigvalsh(res.hessian).max() < 0            # a strict maximum
    # The reported numbers are the closed forms', and the first-order condition holds there.
    c = closed(run, V, res.alpha)
    assert res.objective == pytest.approx(c["dp"] - 0.1 * c[metric], abs=1e-10)
    assert res.delta_ce == pytest.approx(c["ce"], abs=1e-10) and res.kl == pytest.approx(c["kl"], abs=1e-10)
    np.testing.assert_allclose(c["ddp"] - 0.1 * c["d" + metric], 0.0, atol=1e-9)
    np.testing.assert_allclose(res.grad, c["ddp"] - 0.1 * c["d" + metric], atol=1e-9)
    assert res.path[-1] == res.alpha and len(res.path) == res.iterations + 1
    # Newton from a far start, against a non-symmetric landscape: the same answer.
    far = optimize_vector(pb, obj, alpha0=[2.0, -1.5])
    assert far.converged and far.iterations >= 3, far.message
    np.testing.assert_allclose(far.alpha, res.alpha, atol=1e-8)
    json.dumps(res.to_dict())


def test_budget_holds_with_kkt_and_beats_the_feasible_grid(ufm2):
    run, V = ufm2
    pb = multi(run, V)
    for obj in (Objective("budget", budget=0.05), Objective("budget", lam=0.05, budget=0.05, metric="kl")):
        res = optimize_vector(pb, obj)
        assert res.converged, res.message
        c = closed(run, V, res.alpha)
        assert abs(c[obj.metric] - 0.05) < 1e-6 and abs(res.constraint) < 1e-6
        (mu,) = res.multiplier
        assert mu > 0
        # KKT: grad (dp - lam D) = mu grad D, from the closed forms.
        np.testing.assert_allclose(c["ddp"] - obj.lam * c["d" + obj.metric], mu * c["d" + obj.metric], atol=1e-8)
        assert parallel(res.grad, res.constraint_grad) < 1e-8
        grid = grid_optimum(pb, obj, [AXIS, AXIS])          # the best FEASIBLE grid point, zoomed
        assert res.objective >= grid["objective"] - 1e-12
        assert np.max(np.abs(np.subtract(res.alpha, grid["alpha"]))) < 1e-2
        polished = grid_optimum(pb, obj, [AXIS, AXIS], refine="newton")
        np.testing.assert_allclose(polished["alpha"], res.alpha, atol=1e-8)
        assert polished["evaluations"] >= 20 * res.evaluations


def test_level_is_reached_with_the_smallest_alpha_and_kkt(ufm2):
    run, V = ufm2
    pb = multi(run, V, targets=0)
    obj = Objective("level", level=0.8)
    res = optimize_vector(pb, obj)
    assert res.converged, res.message
    c = closed(run, V, res.alpha, targets=[(0, 1.0)])
    assert abs(c["F"] - 0.8) < 1e-9 and abs(res.target_prob - 0.8) < 1e-9
    # KKT of min |alpha|^2 / 2 s.t. F >= level: alpha = nu grad F, nu > 0.
    assert parallel(res.alpha, c["dF"]) < 1e-8 and np.dot(res.alpha, c["dF"]) > 0
    assert res.objective == pytest.approx(np.linalg.norm(res.alpha))
    grid = grid_optimum(pb, obj, [AXIS, AXIS])
    assert res.objective <= grid["objective"] + 1e-12           # no feasible grid point is shorter
    assert np.max(np.abs(np.subtract(res.alpha, grid["alpha"]))) < 1e-2
    land = vector_landscape(pb, obj, [np.multiply(res.alpha, 1 - 1e-6)])
    assert not land["feasible"][0]                              # a shorter alpha along it misses the level


def test_one_term_is_the_scalar_optimiser(ufm2):
    """k = 1: the same answers as `optimize(Problem(...))` to 1e-8."""
    run, V = ufm2
    d = run.data
    one = Problem(ufm_steered(run.model, V[0]), concept_of=d.concept_of, target=0, ce_target=d.p_MxV, weights=d.pi)
    pb = multi(run, V[:1], targets=0)
    for obj in (Objective("penalised", lam=0.1), Objective("penalised", lam=0.05, metric="kl"),
                Objective("budget", budget=0.05), Objective("budget", lam=0.1, budget=0.02, metric="kl"),
                Objective("level", level=0.9)):
        ref, res = optimize(one, obj), optimize_vector(pb, obj)
        assert ref.converged and res.converged, (ref.message, res.message)
        assert res.alpha[0] == pytest.approx(ref.alpha, abs=1e-8), obj
        assert res.objective == pytest.approx(ref.objective, abs=1e-10)
        assert res.delta_ce == pytest.approx(ref.delta_ce, abs=1e-10)
        assert res.alpha_start[0] == pytest.approx(ref.alpha_start, rel=1e-9)   # the same closed-form start


def test_optax_reaches_the_newton_answer(ufm2):
    run, V = ufm2
    pb = multi(run, V)
    obj = Objective("penalised", lam=0.1)
    newton = optimize_vector(pb, obj)
    for method in ("gd", "lbfgs"):
        other = optimize_vector(pb, obj, method=method, tol=1e-8)
        assert other.converged, (method, other.message)
        np.testing.assert_allclose(other.alpha, newton.alpha, atol=1e-6, err_msg=method)
    budget = optimize_vector(pb, Objective("budget", budget=0.05), method="gd", tol=1e-8, ftol=1e-8)
    assert budget.converged, budget.message
    assert abs(budget.constraint) < 1e-8
    np.testing.assert_allclose(budget.alpha, optimize_vector(pb, Objective("budget", budget=0.05)).alpha, atol=1e-6)


def test_slope_sign_follows_the_vector(ufm2):
    run, V = ufm2
    up, down = multi(run, V[:1], targets=0), multi(run, -V[:1], targets=0)
    (s_up, slope_up), (s_down, slope_down) = slope_sign(up), slope_sign(down)
    assert (s_up, s_down) == (1, -1) and slope_down == pytest.approx(-slope_up, rel=1e-12) and slope_up > 0
    obj = Objective("budget", budget=0.05)
    a, b = optimize_vector(up, obj, sign="auto"), optimize_vector(down, obj, sign="auto")
    assert a.converged and b.converged
    assert (a.sign, b.sign) == (1, -1) and b.slope_at_0 == pytest.approx(slope_down)
    assert a.alpha[0] > 0 and b.alpha[0] == pytest.approx(-a.alpha[0], abs=1e-8)
    assert all(x[0] < 0 for x in b.path)                        # started, and stayed, on the raising side
    assert a.to_dict()["sign"] == 1
    d = run.data
    assert slope_sign(ufm_multi_steered(run.model, -V[:1]), concept_of=d.concept_of, targets=0,
                      ce_target=d.p_MxV, weights=d.pi)[0] == -1


def test_refusals(ufm2):
    run, V = ufm2
    pb = multi(run, V)
    for targets in ([], [(7, 1.0)], [(0, -1.0)], [(0, float("nan"))], [(0, 1.0), (0, 2.0)], [(0, 0.0)], "x"):
        with pytest.raises(ValueError, match="targets"):
            multi(run, V, targets=targets)
    with pytest.raises(ValueError, match="targets"):
        optimize_vector(pb, Objective("level", level=0.8))      # several targets: no probability
    with pytest.raises(ValueError, match="alpha0"):
        optimize_vector(pb, Objective("penalised"), alpha0=[1.0])
    with pytest.raises(ValueError, match="alpha0"):
        optimize_vector(pb, Objective("penalised"), alpha0=[1.0, np.inf])
    with pytest.raises(ValueError, match="k = 3"):
        MultiProblem(ufm_multi_steered(run.model, V), k=3, concept_of=run.data.concept_of, targets=0)
    with pytest.raises(ValueError, match="sign"):
        optimize_vector(pb, Objective("penalised"), sign="auto")
    with pytest.raises(ValueError, match="k = 1"):
        slope_sign(pb)
    with pytest.raises(ValueError, match="sign"):
        optimize_vector(multi(run, V[:1], targets=0), Objective("penalised"), sign=2)
    with pytest.raises(ValueError, match="sign.*zero to rounding"):
        slope_sign(multi(run, np.zeros_like(V[:1]), targets=0))
    with pytest.raises(ValueError, match="method"):
        optimize_vector(pb, Objective("penalised"), method="sgd")
    with pytest.raises(ValueError, match="axes"):
        grid_optimum(pb, Objective("penalised"), [AXIS])
    with pytest.raises(ValueError, match="problem"):
        optimize_vector(object(), Objective("penalised"))
    # Collinear vectors: the objective is flat along v_0 - v_1, reported, not called an optimum.
    flat = optimize_vector(multi(run, np.stack([V[0], V[0]]), dtype=jnp.float64), Objective("penalised", lam=0.1))
    assert not flat.converged and "flat" in flat.message
