"""The shared training loop on the UFM: the paper's reference optimum, resume, checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufmjax.runs import io
from ufmjax.data import ConceptData, reference_config
from ufmjax.runs import load_run, train_ufm_run
from ufmjax.runs.train import TrainConfig, train
from ufmjax.models.ufm import UFM, UFMConfig, ufm_loss


def test_reference_ufm_reaches_entropy(reference_run):
    m = reference_run.metrics
    # The paper (Sec. 2.1): entropy 1.33178; the paper's gradient-descent UFM reaches about 1.3318.
    assert abs(m["entropy"] - 1.3317849) < 1e-6
    assert 0 <= m["gap"] < 1e-4, f"UFM failed to reach the data entropy: gap {m['gap']:.2e} nats"
    assert abs(m["final_ce"] - m["entropy"] - m["gap"]) < 1e-12


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _fresh(data):
    return UFM(UFMConfig(vocab=data.vocab, contexts=data.num_contexts, dim=8), rngs=nnx.Rngs(3))


def test_resume_gives_the_uninterrupted_parameters(tmp_path):
    data = ConceptData(reference_config())
    batch = (jnp.asarray(data.p_MxV, jnp.float32), jnp.asarray(data.pi, jnp.float32))
    cfg = TrainConfig(steps=300, lr=0.05, warmup=20, ckpt_every=50, clip=1.0)
    whole = _fresh(data)
    train(whole, ufm_loss, cfg, batch_fn=lambda k: batch, progress=False)

    run = tmp_path / "run"
    first = _fresh(data)
    r1 = train(first, ufm_loss, cfg, batch_fn=lambda k: batch, run_dir=run, progress=False, stop_after=170)
    assert r1.steps == 170 and io.verified_steps(run) == [150, 100]
    resumed = _fresh(data)  # a new process would start from fresh parameters
    r2 = train(resumed, ufm_loss, cfg, batch_fn=lambda k: batch, run_dir=run, progress=False)
    assert r2.resumed_from == 150
    for a, b in zip(_params(whole), _params(resumed)):
        np.testing.assert_array_equal(a, b)


def test_truncated_checkpoint_is_detected(tmp_path):
    out = tmp_path / "run"
    train_ufm_run(out, reference_config(), train_config=TrainConfig(steps=50, lr=0.05, clip=0.0), progress=False)
    load_run(out)  # fine before the damage
    step_dir = out / io.CKPT_DIR / "50"
    victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(io.CheckpointError, match="SHA-256"):
        load_run(out)


def test_unknown_run_folders_are_refused(tmp_path):
    with pytest.raises(io.RunError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.RunError, match="not a ufmjax run"):
        load_run(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / io.CONFIG_FILE).write_text("{not json")
    with pytest.raises(io.RunError, match="unreadable"):
        load_run(tmp_path / "bad")


def test_rerun_reuses_finished_run(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(steps=30, lr=0.05, clip=0.0)
    m1 = train_ufm_run(out, reference_config(), train_config=cfg, progress=False)
    m2 = train_ufm_run(out, reference_config(), train_config=cfg, progress=False)
    assert m1 == m2
    with pytest.raises(io.RunError, match="another configuration"):
        train_ufm_run(out, reference_config(), train_config=TrainConfig(steps=31, lr=0.05), progress=False)


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(steps=10, warmup=10)
    with pytest.raises(ValueError, match="dim"):
        UFMConfig(dim=0)


def test_rerun_with_profiles_reuses_the_run(tmp_path):
    """A config holding tuples (gamma, omega) equals its JSON copy (lists) on re-runs."""
    from ufmjax.data import dirichlet_config
    from ufmjax.runs.gpt import train_gpt_run

    cfg = dirichlet_config(vocab=6, concepts=2, eps=0.1, seed=1)
    m1 = train_ufm_run(tmp_path / "u", cfg, train_config=TrainConfig(steps=20, lr=0.05), progress=False)
    assert train_ufm_run(tmp_path / "u", cfg, train_config=TrainConfig(steps=20, lr=0.05), progress=False) == m1
    small = dict(layers=1, width=8, heads=1, mlp_ratio=2)
    tc = TrainConfig(steps=5, lr=1e-3)
    g1 = train_gpt_run(tmp_path / "g", "concept", data_config=cfg, gpt=small, train_config=tc, batch=8,
                       progress=False)
    g2 = train_gpt_run(tmp_path / "g", "concept", data_config=cfg, gpt=small, train_config=tc, batch=8,
                       progress=False)
    assert g1 == g2


def test_step_compiles_once_per_model_shape(tmp_path):
    """A GPT trained, interrupted, resumed and trained again from scratch in one process (with
    another checkpoint cadence): the step is traced once; another width traces it again."""
    from ufmjax.models import gpt
    from ufmjax.runs import train as train_mod

    def model(width):
        return gpt.init_gpt(gpt.GPTConfig(vocab=11, context=6, layers=1, width=width, heads=2), seed=0)

    toks = (jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 6))), jnp.ones((4, 5), jnp.float32))
    cfg = TrainConfig(steps=30, lr=1e-2, ckpt_every=10)
    before = train_mod.STEP_TRACES
    train(model(8), gpt.next_token_loss, cfg, batch_fn=lambda k: toks, run_dir=tmp_path / "a", progress=False,
          stop_after=15)
    r = train(model(8), gpt.next_token_loss, cfg, batch_fn=lambda k: toks, run_dir=tmp_path / "a", progress=False)
    assert r.resumed_from == 10
    train(model(8), gpt.next_token_loss, dataclasses.replace(cfg, ckpt_every=0), batch_fn=lambda k: toks,
          progress=False)
    assert train_mod.STEP_TRACES - before == 1
    train(model(12), gpt.next_token_loss, cfg, batch_fn=lambda k: toks, progress=False)
    assert train_mod.STEP_TRACES - before == 2
