"""GPT runs end to end: training to the entropy bound, exact resume, `ufmjax train gpt` and
`ufmjax sweep` on GPT runs, text runs against the bigram baseline. Small configs throughout."""

import json

import numpy as np
import pytest
from flax import nnx

from ufmjax import cli
from ufmjax.runs import io
from ufmjax.analysis import summarize_sweep, tanh_fit
from ufmjax.runs.gpt import gpt_sweep, load_gpt_run, train_gpt_run
from ufmjax.runs.train import TrainConfig
from ufmjax.runs import load_run, load_sweep
from ufmjax.data.text import TextConfig

# The concept model of the tests: V=9, G=3, eps=0.05 (the reference point), a 1-layer GPT of
# width 16; 100 steps of 128 fresh sequences reach the entropy bound within ~0.002 nats.
CONCEPT_ARGS = ["train", "gpt", "--corpus", "concept", "--width", "16", "--heads", "2", "--mlp-ratio", "2",
                "--steps", "100", "--lr", "1e-2", "--warmup", "10", "--batch", "128", "--ckpt-every", "40",
                "--quiet"]
UFM_KEYS = {"alphas", "probs_base", "delta_p", "tokens", "delta_p_concept", "delta_ce", "kl", "d_delta_p",
            "d_delta_p_concept", "d_delta_ce", "d2_delta_ce", "P", "N", "steering_vector", "concept_of"}


@pytest.fixture(scope="module")
def concept_runs(tmp_path_factory):
    """The same run twice: uninterrupted (through the CLI), and interrupted at step 40 then resumed."""
    root = tmp_path_factory.mktemp("gpt")
    whole, resumed = root / "whole", root / "resumed"
    assert cli.main(CONCEPT_ARGS + ["--out", str(whole)]) == 0
    cfg = io.read_json(whole / io.CONFIG_FILE)
    kw = {"gpt": {"width": 16, "heads": 2, "mlp_ratio": 2}, "batch": 128, "progress": False,
          "train_config": TrainConfig(**cfg["train"])}
    assert train_gpt_run(resumed, "concept", stop_after=50, **kw) == {}
    assert not io.run_finished(resumed) and io.verified_steps(resumed) == [40]
    metrics = train_gpt_run(resumed, "concept", **kw)
    return whole, resumed, metrics


def test_concept_training_reaches_the_entropy_bound(concept_runs):
    whole, _, metrics = concept_runs
    m = io.read_json(whole / io.METRICS_FILE)
    assert abs(m["entropy"] - 1.33178) < 1e-5
    # Both the training distribution's loss and the steered contexts' loss (Assumption 2).
    assert 0 <= m["gap"] < 0.01, f"GPT next-token loss is {m['gap']:.4f} nats above the entropy bound"
    assert 0 <= m["gap_fixed"] < 0.01
    assert metrics["resumed_from"] == 40


def test_resume_gives_the_parameters_of_an_uninterrupted_run(concept_runs):
    whole, resumed, _ = concept_runs
    a, b = load_gpt_run(whole), load_gpt_run(resumed)
    leaves_a = [np.asarray(x) for x in __import__("jax").tree.leaves(nnx.state(a.model))]
    leaves_b = [np.asarray(x) for x in __import__("jax").tree.leaves(nnx.state(b.model))]
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y, err_msg="a resumed run drifted from the uninterrupted one")
    # load_run dispatches GPT runs; a finished run is not retrained.
    assert isinstance(load_run(whole).model, type(a.model))


def test_cli_sweep_on_a_gpt_run(concept_runs, tmp_path, capsys):
    whole, _, _ = concept_runs
    out = tmp_path / "s.npz"
    rc = cli.main(["sweep", str(whole), "--target", "0", "--layer", "1", "--positions", "last",
                   "--alphas", "-30:30:61", "--top-k", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    arrays, meta = load_sweep(out)
    assert UFM_KEYS <= set(arrays)
    assert meta["model"] == "gpt" and meta["layer"] == 1 and meta["positions"] == "last"
    i0 = 30
    assert np.abs(arrays["delta_p"][i0]).max() < 1e-6 and abs(arrays["delta_ce"][i0]) < 1e-6
    # Steering toward concept 0 raises its probability (sigmoid, Thm 3.6) ...
    F = arrays["concept_prob"][:, :, 0] @ arrays["weights"]
    # (the +alpha end is the Prop. 4.1 limit softmax(LN(v) W^T), not a point mass).
    assert F[-1] > 0.8 and F[0] < 0.05 and np.all(np.diff(F) > -1e-4)
    # ... sampled presence follows it, ΔCE costs and plateaus, the local UFM holds near 0.
    assert arrays["concept_presence"][-1] > 0.9 and arrays["concept_presence"][0] < 0.1
    assert arrays["d2_delta_ce"][i0] > 0
    lo, hi = arrays["local_ufm_range"]
    assert lo < 0 < hi and arrays["local_ufm_kl"][i0] < 1e-6
    assert arrays["limit_distance"][-1] < arrays["limit_distance"][i0]
    summary = summarize_sweep(arrays, 0)
    assert summary["tanh_r2"] > 0.95 and summary["plateau_slope"] < 0.1
    # P and N are the concept-0 and concept-1 contexts, as for the UFM.
    cc = arrays["context_concept"]
    assert np.all(cc[arrays["P"]] == 0) and np.all(cc[arrays["N"]] == 1)


def test_cli_refuses_bad_layer_target_and_reuses_finished_runs(concept_runs, tmp_path, capsys):
    whole, _, _ = concept_runs
    out = str(tmp_path / "bad.npz")
    assert cli.main(["sweep", str(whole), "--target", "0", "--layer", "2", "--out", out]) == 2
    assert "layer must be an integer in [0, 1]" in capsys.readouterr().err
    assert cli.main(["sweep", str(whole), "--target", "3", "--out", out]) == 2
    assert "target" in capsys.readouterr().err
    # A finished run with the same configuration is returned, not retrained; another is refused.
    assert cli.main(CONCEPT_ARGS + ["--out", str(whole)]) == 0
    assert "final_ce=" in capsys.readouterr().out
    assert cli.main(CONCEPT_ARGS[:-1] + ["--width", "8", "--quiet", "--out", str(whole)]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert cli.main(["train", "gpt", "--corpus", "concept", "--heads", "3", "--out", str(tmp_path / "x")]) == 2
    assert "heads" in capsys.readouterr().err


def test_text_run_beats_the_bigram_baseline_and_sweeps(tmp_path):
    """A 1-layer GPT on the first 150k characters of the docs: 300 steps beat the bigram
    baseline on the held-out end; then a text sweep toward uppercase."""
    metrics = train_gpt_run(tmp_path / "text", "text", text_config=TextConfig(max_chars=150_000),
                            gpt={"layers": 1, "width": 32, "heads": 2, "context": 16, "mlp_ratio": 2},
                            train_config=TrainConfig(steps=300, lr=1e-2, warmup=30), batch=32, progress=False)
    assert metrics["val_loss"] < metrics["bigram_val_loss"] < metrics["unigram_val_loss"]
    run = load_gpt_run(tmp_path / "text")
    # (presence sampling and derivatives are covered on the concept run and in test_gpt)
    arrays, meta = gpt_sweep(run, np.linspace(-40, 40, 21), target="uppercase", layer=1, top_k=5,
                             derivatives=0, limits=True, local_ufm=True, text_ce=True)
    assert meta["target_name"] == "uppercase" and meta["corpus"] == "text"
    assert arrays["text_delta_ce"][10] == pytest.approx(0, abs=1e-6)
    assert arrays["text_delta_ce"][0] > 0 and arrays["text_delta_ce"][-1] > 0
    F = arrays["concept_prob"][:, :, 0].mean(axis=1)
    assert F[-1] > F[10] > F[0]
    assert np.all(run.source.concept_of[arrays["tokens"]] == 0), "top tokens at +alpha are uppercase"
    # P is the uppercased spans, N the same spans lowercased.
    P, N = arrays["steer_prompts"][arrays["P"]], arrays["steer_prompts"][arrays["N"]]
    assert run.source.decode(P[0]) == run.source.decode(N[0]).upper()
    json.dumps(meta)


def test_tanh_fit_recovers_a_sigmoid():
    x = np.linspace(-10, 10, 101)
    r2, (_, b, c, _) = tanh_fit(x, 0.3 + 0.2 * np.tanh((x - 1.5) / 2.0))
    assert r2 > 0.9999 and abs(c - 1.5) < 0.3 and abs(b - 0.2) < 0.02
