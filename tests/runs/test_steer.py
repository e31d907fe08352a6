"""`run.steer(...)` builds exactly what the sweep and the optimiser built by hand before it
existed (the same closure, sets, vector and rows), for a UFM run and a GPT run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.data import reference_config, select_steering_sets
from ufmjax.models.gpt import steered_closure
from ufmjax.models.ufm import ufm_steered, ufm_steering_vector
from ufmjax.runs import Steering, load_run, train_gpt_run
from ufmjax.runs.gpt import gpt_steering_vector, steering_sets, sweep_rows
from ufmjax.runs.train import TrainConfig


def assert_same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("negatives", ["contrastive", "random"])
def test_ufm_steer_equals_the_hand_built_steering(reference_run, negatives):
    run = reference_run
    st = run.steer(1, negatives, seed=3)
    assert isinstance(st, Steering)
    P, N = select_steering_sets(run.data.context_concept, 1, negatives, None, None, 3)
    v = ufm_steering_vector(run.model, P, N)
    old = ufm_steered(run.model, v)
    np.testing.assert_array_equal(st.P, P)
    np.testing.assert_array_equal(st.N, N)
    np.testing.assert_array_equal(st.vector, v)
    assert st.steered.fn is old.fn
    assert_same_tree(st.steered.params, old.params)
    np.testing.assert_array_equal(st.ce_target, run.data.p_MxV)
    np.testing.assert_array_equal(st.weights, run.data.pi)
    assert run.steer(1, ce_against="model").ce_target is None
    # The sweep and the optimiser measure these rows: the same alpha = 0 CE reference.
    with jax.enable_x64(True):
        pb = run.steer(1, negatives, seed=3, dtype=jnp.float64).problem()
        out = run.steer(1, negatives, seed=3, dtype=jnp.float64).sweep([0.0, 0.7])
        at = pb.shared([0.7], order=0)
        np.testing.assert_allclose(at["ce"][0][0] @ pb.w_E, out["delta_ce"][1], rtol=1e-12)


def test_ufm_steer_refuses_gpt_options(reference_run):
    with pytest.raises(ValueError, match="layer"):
        reference_run.steer(0, layer=1)
    with pytest.raises(ValueError, match="positions"):
        reference_run.steer(0, positions="last")
    with pytest.raises(ValueError, match="target"):
        reference_run.steer(7)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt") / "concept"
    train_gpt_run(out, "concept", data_config=reference_config(), gpt={"layers": 2, "width": 16},
                  train_config=TrainConfig(steps=20, lr=3e-3, warmup=2, clip=1.0), batch=16, progress=False)
    return load_run(out)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_gpt_steer_equals_the_hand_built_steering(gpt_run, positions):
    run = gpt_run
    st = run.steer(0, layer=1, positions=positions)
    prompts, P, N = steering_sets(run, 0)
    v = gpt_steering_vector(run.model, prompts, P, N, 1)
    rows = sweep_rows(run)
    old = steered_closure(run.model, rows.prompts, v, 1, positions)
    np.testing.assert_array_equal(st.P, P)
    np.testing.assert_array_equal(st.N, N)
    np.testing.assert_array_equal(st.vector, v)
    assert st.steered.fn is old.fn
    assert_same_tree(st.steered.params, old.params)
    np.testing.assert_array_equal(st.arrays["prompts"], rows.prompts)
    np.testing.assert_array_equal(st.ce_target, rows.ce_target)
    np.testing.assert_array_equal(st.weights, rows.weights)
    assert st.meta["layer"] == 1 and st.meta["positions"] == positions
    # The default layer is ceil(L / 2) and the default positions "all", as `ufmjax sweep`.
    assert run.steer(0).meta["layer"] == 1 and run.steer(0).meta["positions"] == "all"
    with pytest.raises(ValueError, match="layer"):
        run.steer(0, layer=3)
