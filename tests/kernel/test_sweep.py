"""The sweep kernel against the closed forms of docs/theory.md (float64) and against itself."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_data_config
from ufmjax import kernel as sweep_mod
from ufmjax import theory
from ufmjax.data import select_steering_sets
from ufmjax.runs import UFMRun, load_run, train_ufm_run
from ufmjax.models.ufm import ufm_steered, ufm_steering_vector
from ufmjax.steering import linear_steered
from ufmjax.analysis import find_peaks
from ufmjax.kernel import sweep
from ufmjax.runs.train import TrainConfig


def own_probs64(model) -> np.ndarray:
    """The model's own unsteered probabilities, in float64 numpy (independent of the kernel)."""
    logits = np.asarray(model.W[...], np.float64) @ np.asarray(model.H[...], np.float64)
    logits = logits.T - logits.T.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def close_rel(a, b, rtol):
    """max |a - b| <= rtol * max |b| (relative to the curve's scale, so zeros do not blow up)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-12)
    err = np.abs(a - b).max() / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"
    return err


@pytest.fixture(scope="module")
def random_runs(tmp_path_factory):
    """Several trained UFMs on random Assumption-1 datasets (V, G, eps, profiles, d)."""
    rng = np.random.default_rng(7)
    runs = []
    for k in range(4):
        cfg = random_data_config(rng)
        out = tmp_path_factory.mktemp("rand") / f"ufm{k}"
        train_ufm_run(out, cfg, dim=int(rng.integers(4, 20)), seed=k,
                      train_config=TrainConfig(steps=800, lr=0.05, clip=0.0), progress=False)
        runs.append(load_run(out))
    return runs


def steer(run: UFMRun, target, negatives, seed=0):
    P, N = select_steering_sets(run.data.context_concept, target, negatives, seed=seed)
    return ufm_steered(run.model, ufm_steering_vector(run.model, P, N)), P, N


@pytest.mark.parametrize("negatives", ["contrastive", "random"])
def test_kernel_equals_lemma_b3_and_derivative_laws(random_runs, negatives, x64):
    """Kernel == Lemma B.3 to 1e-6 on [-60, 60]; its derivatives == Lemma B.5, Eq. 12, Thm 3.8."""
    alphas = np.linspace(-60, 60, 241)
    for k, run in enumerate(random_runs):
        target = k % run.data.num_concepts
        steered, P, N = steer(run, target, negatives, seed=k)
        out = sweep(steered, alphas, concept_of=run.data.concept_of, ce_target=run.data.p_MxV,
                    weights=run.data.pi, dtype=jnp.float64)
        p0 = own_probs64(run.model)
        M = theory.log_odds(p0, P, N)
        probs = out["probs_base"][None] + out["delta_p"]
        np.testing.assert_allclose(probs, theory.steered_probs(p0, M, alphas), atol=1e-6, rtol=0)
        # Lemma B.5 and its derivative.
        close_rel(out["d_delta_p"], theory.token_derivative(p0, M, alphas), 1e-6)
        close_rel(out["d2_delta_p"], theory.token_second_derivative(p0, M, alphas), 1e-6)
        # Eq. 12 (Thm 3.6), normalised by |C| as Def. 3.5.
        co = run.data.concept_of
        close_rel(out["delta_p_concept"], theory.concept_delta(p0, M, co, alphas), 1e-6)
        close_rel(out["d_delta_p_concept"], theory.concept_derivative(p0, M, co, alphas), 1e-6)
        # Thm 3.8, with CE measured against the data table.
        d1, d2 = theory.delta_ce_derivatives(p0, M, alphas, run.data.pi, run.data.p_MxV)
        close_rel(out["delta_ce"], theory.delta_ce(p0, M, alphas, run.data.pi, run.data.p_MxV), 1e-6)
        close_rel(out["d_delta_ce"], d1, 1e-6)
        close_rel(out["d2_delta_ce"], d2, 1e-6)
        close_rel(out["kl"], theory.kl_steered_base(p0, M, alphas), 1e-6)


def test_ce_curvature_at_zero(reference_run, x64):
    """ΔCE''(0) = sum_j pi_j Var_j(M) (Thm 3.8); ΔCE'(0) = 0 when CE is against the model."""
    run = reference_run
    steered, P, N = steer(run, 0, "contrastive")
    out = sweep(steered, [0.0], concept_of=run.data.concept_of, weights=run.data.pi, dtype=jnp.float64)
    p0 = own_probs64(run.model)
    c = theory.ce_curvature(p0, theory.log_odds(p0, P, N), run.data.pi)
    assert c > 0
    assert abs(out["d2_delta_ce"][0] - c) <= 1e-9 * c
    assert abs(out["d_delta_ce"][0]) < 1e-12
    # alpha = 0 is the unsteered model (up to rounding between two compiled programs).
    for key in ("delta_ce", "kl", "delta_p", "delta_p_concept"):
        assert np.abs(out[key][0]).max() < 1e-14, key


def test_peaks_from_kernel_match_theory(random_runs, x64):
    """Newton on the kernel's dΔp/dα finds the theory's peaks to 1e-5; peak order of Thm 3.3."""
    grid = np.linspace(-80, 80, 321)
    checked = 0
    for k, run in enumerate(random_runs):
        steered, P, N = steer(run, k % run.data.num_concepts, "contrastive")
        p0 = own_probs64(run.model)
        M = theory.log_odds(p0, P, N)
        want = theory.peak_strengths(p0, M)
        got = find_peaks(steered, grid, concept_of=run.data.concept_of, dtype=jnp.float64)
        is_max, is_min = theory.extremal_tokens(M)
        interior = np.isfinite(want) & (want > grid[0]) & (want < grid[-1])
        np.testing.assert_allclose(got[interior], want[interior], atol=1e-5, rtol=0)
        assert np.all(np.isnan(got[:, is_max | is_min])), "extremal tokens must have no interior peak"
        checked += interior.sum()
        # Every off-target peak precedes every target peak, in each context.
        target = run.data.concept_of == (k % run.data.num_concepts)
        tgt, off = want[:, target & ~is_max], want[:, ~target & ~is_min]
        if tgt.size and off.size:
            assert np.all(off.max(axis=1) < tgt.min(axis=1))
        # M_max tokens increase and M_min tokens decrease on the whole grid.
        out = sweep(steered, grid, concept_of=run.data.concept_of, dtype=jnp.float64, derivatives=1)
        assert np.all(out["d_delta_p"][:, :, is_max] >= 0)
        assert np.all(out["d_delta_p"][:, :, is_min] <= 0)
    assert checked >= 20


def numpy_loop(steered, alphas, concept_of, weights):
    """A plain per-alpha NumPy loop: the reference the vmapped, chunked kernel must equal."""
    W = np.asarray(steered.params["W"], np.float64)
    base = (W @ np.asarray(steered.params["H"], np.float64)).T
    direction = W @ np.asarray(steered.params["v"], np.float64)
    G = concept_of.max() + 1
    onehot = np.eye(G)[concept_of]
    sizes = onehot.sum(axis=0)

    def logsoftmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp0 = logsoftmax(base)
    p0 = np.exp(lp0)
    rows = []
    for a in alphas:
        lp = logsoftmax(base + a * direction)
        p = np.exp(lp)
        rows.append({
            "delta_p": p - p0,
            "delta_p_concept": (p @ onehot - p0 @ onehot) / sizes,
            "delta_ce": float(np.dot(weights, -np.sum(p0 * lp, 1) + np.sum(p0 * lp0, 1))),
            "kl": np.sum(p * (lp - lp0), 1),
            "entropy": -np.sum(p * lp, 1),
        })
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_chunked_sweep_equals_python_loop(reference_run, x64):
    run = reference_run
    steered, _, _ = steer(run, 1, "random")
    alphas = np.linspace(-30, 45, 97)
    ref = numpy_loop(steered, alphas, run.data.concept_of, run.data.pi)
    outs = [sweep(steered, alphas, concept_of=run.data.concept_of, weights=run.data.pi,
                  chunk_size=c, dtype=jnp.float64) for c in (1, 7, 32, 500, None)]
    for out in outs:
        for key, want in ref.items():
            np.testing.assert_allclose(out[key], want, atol=1e-6, rtol=0, err_msg=key)
        for key in out:
            np.testing.assert_allclose(out[key], outs[0][key], atol=1e-12, rtol=0, err_msg=key)


def test_float32_default_within_documented_tolerance(reference_run, x64):
    """float32 (the default) stays within 1e-5 of float64 for probabilities on [-60, 60]."""
    run = reference_run
    steered, _, _ = steer(run, 0, "contrastive")
    alphas = np.linspace(-60, 60, 121)
    kw = dict(concept_of=run.data.concept_of, weights=run.data.pi)
    o32 = sweep(steered, alphas, **kw)
    o64 = sweep(steered, alphas, dtype=jnp.float64, **kw)
    assert o32["delta_p"].dtype == np.float32
    assert np.abs(o32["delta_p"] - o64["delta_p"]).max() < 1e-5
    assert np.abs(o32["delta_p_concept"] - o64["delta_p_concept"]).max() < 1e-5


def test_no_recompile_for_new_grids(reference_run):
    run = reference_run
    steered, _, _ = steer(run, 0, "contrastive")
    kw = dict(concept_of=run.data.concept_of, chunk_size=16)
    sweep(steered, np.linspace(-5, 5, 40), **kw)
    before = sweep_mod.trace_count()
    sweep(steered, np.linspace(-9, 3, 40), **kw)       # other values, same length
    sweep(steered, np.linspace(0, 1, 23), **kw)        # other length: padded to whole chunks
    steered2, _, _ = steer(run, 2, "random")           # other model of the same shapes
    sweep(steered2, np.linspace(-1, 1, 40), **kw)
    assert sweep_mod.trace_count() == before


def test_extreme_alphas_are_finite(reference_run):
    run = reference_run
    steered, _, _ = steer(run, 0, "contrastive")
    out = sweep(steered, [-1e6, -1e3, 0.0, 1e3, 1e6], concept_of=run.data.concept_of,
                ce_target=run.data.p_MxV, weights=run.data.pi)
    for key, value in out.items():
        assert np.all(np.isfinite(value)), key
    # At +1e6 all mass sits on the target concept (Prop. B.1).
    np.testing.assert_allclose(out["concept_prob"][-1, :, 0], 1.0, atol=1e-6)


def test_label_targets_equal_one_hot_table(reference_run):
    run = reference_run
    steered, _, _ = steer(run, 0, "contrastive")
    labels = np.arange(run.data.num_contexts) % run.data.vocab
    kw = dict(concept_of=run.data.concept_of, derivatives=2)
    a = sweep(steered, np.linspace(-4, 4, 9), ce_target=labels, **kw)
    b = sweep(steered, np.linspace(-4, 4, 9), ce_target=np.eye(run.data.vocab)[labels], **kw)
    for key in ("delta_ce", "d_delta_ce", "d2_delta_ce", "delta_ce_ctx"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)


def test_top_tokens_and_subset(reference_run):
    run = reference_run
    steered, _, _ = steer(run, 2, "contrastive")
    alphas = np.linspace(-10, 40, 11)
    tok = sweep_mod.top_tokens(steered, alphas, 3)
    assert set(tok.tolist()) == set(np.flatnonzero(run.data.concept_of == 2).tolist())
    full = sweep(steered, alphas, concept_of=run.data.concept_of)
    sub = sweep(steered, alphas, concept_of=run.data.concept_of, tokens=tok)
    np.testing.assert_allclose(sub["delta_p"], full["delta_p"][:, :, tok], atol=1e-7)


@pytest.mark.parametrize("alphas, match", [([], "alphas"), ([0.0, np.nan], "alphas"),
                                           ([1.0, np.inf], "alphas"), (np.zeros((2, 2)), "alphas")])
def test_bad_alpha_grid(reference_run, alphas, match):
    steered, _, _ = steer(reference_run, 0, "contrastive")
    with pytest.raises(ValueError, match=match):
        sweep(steered, alphas, concept_of=reference_run.data.concept_of)


def test_bad_kernel_arguments():
    steered = linear_steered(np.zeros((2, 4)), np.arange(4.0))
    with pytest.raises(ValueError, match="concept_of"):
        sweep(steered, [0.0], concept_of=np.array([0, 0, 2, 2]))
    with pytest.raises(ValueError, match="tokens"):
        sweep(steered, [0.0], concept_of=np.array([0, 0, 1, 1]), tokens=[4])
    with pytest.raises(ValueError, match="ce_target"):
        sweep(steered, [0.0], concept_of=np.array([0, 0, 1, 1]), ce_target=np.array([0, 7]))
    with pytest.raises(ValueError, match="float64"):
        sweep(steered, [0.0], concept_of=np.array([0, 0, 1, 1]), dtype=jnp.float64)
    with pytest.raises(ValueError, match="alphas"):
        sweep_mod.parse_alphas("1:0:5")
    np.testing.assert_allclose(sweep_mod.parse_alphas("-2:2:5"), [-2, -1, 0, 1, 2])


def test_a_measure_of_another_dtype_is_refused(x64):
    """A Measure is built in one dtype: a sweep in another names it instead of silently
    rounding the CE targets and weights (or promoting everything)."""
    steered = linear_steered(np.zeros((2, 5)), np.arange(5.0))
    m32 = sweep_mod.make_measure(steered, concept_of=np.arange(5) % 2)
    with pytest.raises(ValueError, match="measure was built in float32"):
        sweep(steered, [0.0, 1.0], measure=m32, dtype=jnp.float64)
    m64 = sweep_mod.make_measure(steered, concept_of=np.arange(5) % 2, dtype=jnp.float64)
    with pytest.raises(ValueError, match="measure"):
        sweep(steered, [0.0, 1.0], measure=m64)
    out = sweep(steered, [0.0, 1.0], measure=m64, dtype=jnp.float64)
    assert out["delta_ce"].dtype == np.float64 and out["delta_ce"][0] == 0.0
