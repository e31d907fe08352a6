"""Optimal steering strength: the optimiser against dense grids, bisection and the
closed forms of docs/theory.md, on the paper's reference UFM (float64)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax import optimize as opt
from ufmjax import theory
from ufmjax.cli import main
from ufmjax.data import select_steering_sets
from ufmjax.kernel import sweep as uj_sweep
from ufmjax.optimize import Objective, Problem, optimize
from ufmjax.models.ufm import ufm_steered, ufm_steering_vector
from ufmjax.common import cast_floats
from ufmjax.steering import Steered, diagonal_rowwise, linear_steered, rowwise_of

GRID = np.linspace(-4.0, 4.0, 4001)   # spacing 0.002
PAPER_GRID = 1025                     # the paper's sweeps


def own_probs64(model) -> np.ndarray:
    logits = (np.asarray(model.W[...], np.float64) @ np.asarray(model.H[...], np.float64)).T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture
def ref(reference_run, x64):
    """(problem, closed-form pieces) for target 0, contrastive negatives, CE against the data."""
    run = reference_run
    P, N = select_steering_sets(run.data.context_concept, 0)
    steered = ufm_steered(run.model, ufm_steering_vector(run.model, P, N))
    problem = Problem(steered, concept_of=run.data.concept_of, target=0, ce_target=run.data.p_MxV,
                      weights=run.data.pi)
    p0 = own_probs64(run.model)
    return problem, {"p0": p0, "M": theory.log_odds(p0, P, N), "data": run.data}


def closed(cf, alpha, contexts=None):
    """The closed forms at alpha: weighted dp (Def. 3.5), ΔCE (Def. 3.7), KL, F_T and dp', ΔCE'."""
    d = cf["data"]
    rows = np.arange(d.num_contexts) if contexts is None else np.asarray(contexts)
    w = d.pi[rows] / d.pi[rows].sum()
    a = np.atleast_1d(alpha)
    dp = theory.concept_delta(cf["p0"], cf["M"], d.concept_of, a)[:, rows, 0] @ w
    ddp = theory.concept_derivative(cf["p0"], cf["M"], d.concept_of, a)[:, rows, 0] @ w
    F = theory.concept_probs(cf["p0"], cf["M"], d.concept_of, a)[:, rows, 0] @ w
    sub = dict(pi_M=w, q_MxV=d.p_MxV[rows])
    dce = theory.delta_ce(cf["p0"][rows], cf["M"], a, **sub)
    d1, _ = theory.delta_ce_derivatives(cf["p0"][rows], cf["M"], a, **sub)
    kl = theory.kl_steered_base(cf["p0"], cf["M"], a)[:, rows] @ w
    return {"dp": dp[0], "ddp": ddp[0], "ce": dce[0], "dce": d1[0], "kl": kl[0], "F": F[0]}


@pytest.mark.parametrize("lam", [0.1, 0.03])
def test_penalised_optimum_beats_dense_grid_with_20x_fewer_evaluations(ref, lam):
    problem, cf = ref
    obj = Objective("penalised", lam=lam)
    res = optimize(problem, obj)
    grid = opt.grid_search(problem, obj, GRID)
    assert res.converged, res.message
    assert abs(res.alpha - grid["alpha"]) <= grid["spacing"], (res.alpha, grid["alpha"])
    # The optimiser is at least as good as every grid point, and within 1e-6 of the best one.
    assert -1e-12 <= res.objective - grid["objective"] <= 1e-6
    assert 20 * res.evaluations <= PAPER_GRID, f"{res.evaluations} evaluations vs the paper's {PAPER_GRID}"
    assert 20 * res.evaluations <= grid["evaluations"]
    # The reported numbers are the closed forms at the reported alpha (independent float64 numpy).
    c = closed(cf, res.alpha)
    assert res.objective == pytest.approx(c["dp"] - lam * c["ce"], abs=1e-10)
    assert res.delta_ce == pytest.approx(c["ce"], abs=1e-10)
    assert res.kl == pytest.approx(c["kl"], abs=1e-10)


def test_first_order_conditions_hold_with_closed_form_derivatives(ref):
    """Penalised: dp'(a*) = lam ΔCE'(a*). Budget (binding): dp'(a*) = mu ΔCE'(a*), ΔCE(a*) = budget.
    Derivatives from Thm 3.6 (Eq. 12) and Thm 3.8, not from the kernel."""
    problem, cf = ref
    res = optimize(problem, Objective("penalised", lam=0.1))
    c = closed(cf, res.alpha)
    assert abs(c["ddp"] - 0.1 * c["dce"]) < 1e-9, "penalised first-order condition fails"
    res = optimize(problem, Objective("budget", budget=0.05))
    c = closed(cf, res.alpha)
    (mu,) = res.multiplier
    assert mu > 0
    assert abs(c["ddp"] - mu * c["dce"]) < 1e-9, "budget KKT stationarity fails"
    assert abs(c["ce"] - 0.05) < 1e-9


@pytest.mark.parametrize("metric", ["ce", "kl"])
def test_budget_binds_on_the_budget_and_bisection_agrees(ref, metric):
    problem, cf = ref
    budget = 0.05
    res = optimize(problem, Objective("budget", budget=budget, metric=metric))
    assert res.converged, res.message
    assert abs(closed(cf, res.alpha)[metric] - budget) < 1e-6
    assert abs((res.delta_ce if metric == "ce" else res.kl) - budget) < 1e-6
    bis = opt.bisect_budget(problem, budget, metric)
    assert abs(bis["alpha"] - res.alpha) < 1e-8
    assert res.evaluations < bis["evaluations"]
    grid = opt.grid_search(problem, Objective("budget", budget=budget, metric=metric), GRID)
    assert 0 <= res.alpha - grid["alpha"] <= grid["spacing"]


def test_slack_budget_returns_the_penalised_optimum(ref):
    problem, _ = ref
    pen = optimize(problem, Objective("penalised", lam=0.1))
    slack = optimize(problem, Objective("budget", lam=0.1, budget=5.0))
    assert slack.converged and slack.constraint < 0
    assert slack.multiplier == [0.0]
    assert abs(slack.alpha - pen.alpha) < 1e-9
    assert abs(slack.objective - pen.objective) < 1e-12
    # Tight budget with the same lam: it binds, and costs objective.
    tight = optimize(problem, Objective("budget", lam=0.1, budget=0.1))
    assert abs(tight.delta_ce - 0.1) < 1e-9 and tight.objective < pen.objective


def test_closed_form_start_is_the_quadratic_law(ref):
    """c = sum_j pi_j Var_j(M) (Thm 3.8) from one jvp; small budgets start next to the optimum."""
    problem, cf = ref
    start, c = opt.closed_form_start(problem, Objective("budget", budget=1e-4))
    assert c == pytest.approx(theory.ce_curvature(cf["p0"], cf["M"], cf["data"].pi), rel=1e-9)
    res = optimize(problem, Objective("budget", budget=1e-4))
    assert res.alpha_start == pytest.approx(start)
    assert abs(start / res.alpha - 1) < 0.02, (start, res.alpha)
    kstart, kc = opt.closed_form_start(problem, Objective("budget", budget=1e-4, metric="kl"))
    assert kc == pytest.approx(c, rel=1e-12) and kstart == pytest.approx(np.sqrt(2e-4 / c), rel=1e-9)


@pytest.mark.parametrize("kind", ["penalised", "budget"])
def test_per_context_never_scores_below_the_best_shared_alpha(ref, kind):
    problem, _ = ref
    obj = Objective(kind, lam=0.1) if kind == "penalised" else Objective("budget", budget=0.05)
    res = optimize(problem, obj, per_context=True)
    assert res.converged, res.message
    grid = opt.grid_search(problem, obj, GRID)
    assert res.objective >= grid["objective"] - 1e-12
    assert res.objective >= res.shared["objective"] - 1e-12
    assert res.gain == pytest.approx(res.objective - res.shared["objective"])
    assert res.gain > 1e-4, "prompt-adaptive alpha should pay on the reference UFM"
    if kind == "budget":
        assert abs(res.delta_ce - 0.05) < 1e-6
    alpha = np.asarray(res.alpha)
    assert alpha.shape == (problem.contexts.size,)
    if kind == "penalised":
        # Separable: each context's alpha is that context's own shared-alpha optimum.
        for j in (0, 5, 9):
            pj = Problem(problem.steered, concept_of=problem.concept_of, target=0,
                         ce_target=np.asarray(problem.measure.targets), contexts=[j])
            assert optimize(pj, obj).alpha == pytest.approx(alpha[j], abs=1e-8)


def test_level_is_reached_with_the_smallest_alpha(ref):
    problem, cf = ref
    for level in (0.6, 0.9999):
        res = optimize(problem, Objective("level", level=level))
        assert res.converged, res.message
        assert abs(closed(cf, res.alpha)["F"] - level) < 1e-9
        assert closed(cf, res.alpha - 1e-6)["F"] < level  # F_T increases (Thm 3.6): nothing smaller works
    per = optimize(problem, Objective("level", level=0.6), per_context=True)
    F0 = theory.concept_probs(cf["p0"], cf["M"], cf["data"].concept_of, [0.0])[0, :, 0]
    alpha = np.asarray(per.alpha)
    Fj = theory.concept_probs(cf["p0"], cf["M"], cf["data"].concept_of, alpha)[np.arange(alpha.size), np.arange(alpha.size), 0]
    assert np.all(np.where(F0 >= 0.6, alpha == 0, np.abs(Fj - 0.6) < 1e-9))
    # Already there: alpha = 0.
    low = optimize(problem, Objective("level", level=0.3))
    assert low.alpha == 0.0 and low.converged


def test_methods_agree(ref):
    problem, _ = ref
    newton = optimize(problem, Objective("budget", budget=0.05))
    for method in ("lbfgs", "gd"):
        other = optimize(problem, Objective("budget", budget=0.05), method=method)
        assert other.converged, (method, other.message)
        assert other.alpha == pytest.approx(newton.alpha, abs=1e-7), method


def test_newton_and_autodiff_lagrangians_agree(ref):
    """The Newton path (kernel values and jvp derivatives) and the optax path (a jax merit under
    reverse-mode autodiff) optimise the same function.

    This test reads the solver's private pieces (`solvers._Solver`, `_merit_fn`, `_logit_level`)
    on purpose: the two Lagrangians are internal, and their agreement is what it checks."""
    from ufmjax.optimize import solvers

    problem, _ = ref
    rng = np.random.default_rng(0)
    for obj, per_context in ((Objective("penalised", lam=0.2), False),
                             (Objective("budget", budget=0.05, metric="kl"), True),
                             (Objective("level", level=0.7), True)):
        if True:
            s = solvers._Solver(problem, obj, per_context, 1e3)
            x = rng.uniform(-1.0, 2.0, s.n)
            pt = s.point(x)
            K = pt.g.size
            mu, rho = rng.uniform(0, 1, K), 7.0
            L, grad, _ = s.lagrangian(pt, mu, rho)
            merit = solvers._merit_fn(problem.steered.fn, problem.rowwise, obj.kind, obj.metric, per_context)
            hyper = {"lam": obj.lam or 0.0, "budget": obj.budget or 0.0,
                     "level": solvers._logit_level(obj.level) if obj.level else 0.0, "mu": jnp.asarray(mu),
                     "rho": rho}
            v, g = jax.value_and_grad(merit)(jnp.asarray(x), problem.params, problem.reference, problem.measure,
                                              problem.target_G, problem.rows_E, hyper)
            assert float(v) == pytest.approx(L, abs=1e-12), (obj.kind, per_context)
            np.testing.assert_allclose(np.asarray(g), grad, atol=1e-10)


def test_rowwise_ufm_equals_one_model_evaluation_per_row(ref):
    problem, _ = ref
    a_M = jnp.linspace(-3.0, 5.0, problem.num_rows)
    rowwise, one_pass = rowwise_of(problem.steered.fn)
    assert one_pass
    fast = rowwise(problem.params, a_M)
    slow = diagonal_rowwise(problem.steered.fn)(problem.params, a_M)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=1e-12)


# ---------------------------------------------------------------- any Steered; honest failure

def toy_problem(**kw):
    """Any Steered, here V=4, G=2 (tokens {0,1} | {2,3}), whose target-concept probability is NOT
    monotone: M_max = {0, 2} mixes concepts, so F_0 rises from 0.4, peaks at 0.43973 (alpha 0.78)
    and falls to 0.375; row 0 never exceeds 1/3, row 1 peaks at 0.54692."""
    base = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    direction = jnp.asarray([1.0, 0.0, 1.0, -1.0])
    return Problem(linear_steered(base, direction), concept_of=np.array([0, 0, 1, 1]), target=0, **kw)


def toy_F(alpha):
    base = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    p = base * np.exp(alpha * np.array([1.0, 0.0, 1.0, -1.0]))
    return (p[:, :2].sum(1) / p.sum(1)).mean()


def plateau_logits(params, alpha):
    """Logits saturating in alpha like a normalised transformer's (Prop. 4.1): ΔCE plateaus."""
    return params["base"] + jnp.tanh(alpha) * params["direction"]


def test_refusals(ref, x64):
    problem, _ = ref
    for kw, msg in ((dict(kind="budget", budget=-0.1), "budget must be positive"),
                    (dict(kind="budget", budget=0.0), "budget must be positive"),
                    (dict(kind="budget"), "needs a budget"),
                    (dict(kind="level", level=1.0), r"level must be a probability in \(0, 1\)"),
                    (dict(kind="level", level=0.5, lam=0.1), "lam applies"),
                    (dict(kind="penalised", lam=0.0), "lam > 0"),
                    (dict(kind="penalised", budget=0.1), "budget applies"),
                    (dict(kind="minimax"), "objective must be one of")):
        with pytest.raises(ValueError, match=msg):
            Objective(**kw)
    with pytest.raises(ValueError, match="unknown target concept 3"):
        Problem(problem.steered, concept_of=problem.concept_of, target=3)
    with pytest.raises(ValueError, match="method must be one of"):
        optimize(problem, Objective(), method="bfgs")
    with pytest.raises(ValueError, match="objective must be one of"):
        optimize(problem, "minimax")  # a name is an Objective's kind (once an AttributeError)
    with pytest.raises(ValueError, match="objective must be an Objective"):
        optimize(problem, 0.1)
    with pytest.raises(ValueError, match="problem must be a Problem"):
        optimize("penalised", Objective())
    toy = toy_problem()
    with pytest.raises(ValueError, match="above what any alpha reaches: .* peaks at 0.43"):
        optimize(toy, Objective("level", level=0.445))
    res = optimize(toy, Objective("level", level=0.43))
    assert res.converged and abs(toy_F(res.alpha) - 0.43) < 1e-9
    assert toy_F(res.alpha - 1e-6) < 0.43 < toy_F(res.alpha + 1e-6)  # the first crossing
    with pytest.raises(ValueError, match=r"for contexts \[0\]"):
        optimize(toy, Objective("level", level=0.4), per_context=True)


def test_an_objective_by_name_is_that_objective(ref):
    problem, _ = ref
    by_name, full = optimize(problem, "penalised"), optimize(problem, Objective("penalised"))
    assert by_name.converged and by_name.alpha == full.alpha and by_name.objective == full.objective


def test_non_convergence_is_reported(ref):
    problem, _ = ref
    res = optimize(problem, Objective("penalised", lam=0.1), max_iter=1)
    assert not res.converged and "no convergence in 1 iterations" in res.message
    res = optimize(problem, Objective("penalised", lam=0.1), method="adam", max_iter=5)
    assert not res.converged and "no convergence" in res.message
    # A plateau (Prop. 4.1): the steering effect keeps growing faster than the saturating
    # penalty, so no finite alpha is optimal; the solver must say so, not return alpha_max.
    base = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.2, 0.2]]))
    plateau = Problem(Steered(plateau_logits, {"base": base, "direction": jnp.asarray([2.0, 2.0, -2.0, -2.0])}),
                      concept_of=np.array([0, 0, 1, 1]), target=0)
    res = optimize(plateau, Objective("penalised", lam=1e-3), alpha_max=50.0)
    assert not res.converged and "not attained" in res.message


# ---------------------------------------------------------------- CLI

def test_cli_writes_json_and_refuses_bad_requests(reference_run, tmp_path, capsys):
    out = tmp_path / "o.json"
    run = str(reference_run.path)
    rc = main(["optimize", run, "--target", "0", "--objective", "budget", "--budget", "0.05", "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    for key in ("alpha", "objective", "delta_p_target", "delta_ce", "kl", "iterations", "evaluations", "converged"):
        assert key in d, key
    assert d["converged"] and abs(d["delta_ce"] - 0.05) < 1e-9 and d["model"] == "ufm"
    rc = main(["optimize", run, "--target", "0", "--per-context", "--out", str(out)])
    assert rc == 0 and len(json.loads(out.read_text())["alpha"]) == 12
    for argv, msg in ((["--objective", "budget", "--budget", "-1"], "budget must be positive"),
                      (["--objective", "level", "--level", "1.5"], "level must be a probability"),
                      (["--target", "7"], "unknown target concept 7")):
        argv = ["optimize", run, "--target", "0", *argv, "--out", str(out)]
        if "--target" in argv[4:]:
            del argv[3:5]
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
    rc = main(["optimize", run, "--target", "0", "--max-iter", "1", "--out", str(out)])
    assert rc == 1 and "NOT CONVERGED" in capsys.readouterr().err
    assert json.loads(out.read_text())["converged"] is False
    assert not jax.config.jax_enable_x64, "the CLI must not leave float64 switched on"


# ---------------------------------------------------------------- GPT closures

@pytest.mark.parametrize("positions", ["all", "last"])
def test_gpt_one_pass_rowwise_and_optimum(positions, x64):
    """An (untrained) GPT: per-prompt alphas in one pass equal one evaluation per prompt, and the
    optimiser's penalised optimum matches a dense grid on it."""
    from flax import nnx

    from ufmjax.models.gpt import GPT, GPTConfig, steered_closure

    model = GPT(GPTConfig(vocab=9, context=5, layers=1, width=16, heads=2), rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(0, 9, size=(6, 4))
    v = np.random.default_rng(1).normal(size=16)
    steered = steered_closure(model, prompts, v, 1, positions)
    params = cast_floats(steered.params, jnp.float64)
    gpt_rowwise, one_pass = rowwise_of(steered.fn)
    assert one_pass
    a_M = jnp.linspace(-4.0, 6.0, 6)
    np.testing.assert_allclose(np.asarray(jax.jit(gpt_rowwise)(params, a_M)),
                               np.asarray(jax.jit(diagonal_rowwise(steered.fn))(params, a_M)), atol=1e-10)
    if positions == "last":
        return
    problem = Problem(steered, concept_of=np.arange(9) // 3, target=0)
    res = optimize(problem, Objective("penalised", lam=0.05))
    assert res.converged, res.message
    # A strict local maximum: zero slope and negative curvature by the kernel, and no better
    # neighbour (one alpha per call: the compiled shape the solver already uses).
    lam = 0.05
    at = {k: [v[0] @ problem.w_E for v in vs] for k, vs in problem.shared([res.alpha]).items()}
    assert abs(at["dp"][1] - lam * at["ce"][1]) < 1e-9
    assert at["dp"][2] - lam * at["ce"][2] < 0
    for da in (-1e-2, 1e-2, -1.0, 1.0):
        v = problem.shared([res.alpha + da], order=2)
        assert v["dp"][0] @ problem.w_E - lam * v["ce"][0] @ problem.w_E < res.objective


def test_the_optimisers_kernel_paths_agree(reference_run, x64):
    """On the UFM the optimiser can evaluate through the kernel's affine path (point form) or
    its generic taylor path (the default, faster at one alpha per call): the same optimum to
    1e-10, with the same evaluation count."""
    st = reference_run.steer(0, dtype=jnp.float64)
    fast, slow = st.problem(method="affine"), st.problem()
    assert fast.method == "affine" and slow.method == "taylor"
    for obj in (Objective("penalised", lam=0.1), Objective("budget", budget=0.05), Objective("level", level=0.6)):
        a, b = optimize(fast, obj), optimize(slow, obj)
        assert a.converged and b.converged
        assert abs(a.alpha - b.alpha) <= 1e-10, (obj.kind, a.alpha, b.alpha)
        assert abs(a.objective - b.objective) <= 1e-10
        assert a.evaluations == b.evaluations
    # The point form of the affine path equals its sweep form (moment matrix B) at any alpha.
    alphas = [-40.0, -1.3, 0.0, 0.4, 7.0, 300.0]
    point = fast.evaluator
    swept = uj_sweep(st.steered, alphas, measure=fast.measure, dtype=jnp.float64, method="affine")
    for k in range(len(alphas)):
        at = point.at([alphas[k]])
        for key in ("delta_p_concept", "d_delta_p_concept", "d2_delta_ce_ctx", "kl", "d2_kl"):
            scale = np.abs(swept[key]).max()  # to rounding of each curve's scale
            np.testing.assert_allclose(at[key][0], swept[key][k], rtol=0, atol=1e-11 * scale, err_msg=key)
