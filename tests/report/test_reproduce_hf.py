"""`ufmjax reproduce --hf`: Sec. 4's law table and figures on a pretrained model (a fixture)."""

import json
from pathlib import Path

import numpy as np
import pytest

from ufmjax.cli import main
from ufmjax.data.concept_tokens import concept_files

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "gpt2"


@pytest.mark.slow
def test_reproduce_hf_writes_the_law_table_figures_and_sweeps(tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("river\nwater\nstones\nvalley\n")  # words of the fixture tokenizer's prose
    files = concept_files("evil")
    out = tmp_path / "rep"
    code = main(["reproduce", "--hf", str(FIXTURE), "--positive", str(files["positive"]), "--negative",
                 str(files["negative"]), "--prompts", str(files["prompts"]), "--concept-words", str(words),
                 "--quick", "--quiet", "--layers", "1", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["model_type"] == "gpt2" and summary["layers"] == [1] and summary["all_ran"]
    laws = {law["law"]: law for law in summary["laws"]}
    assert len(laws) == 6
    cache = laws["prefix- and key/value-cached steering = full forward pass per alpha"]
    assert cache["passed"] and cache["value"] < 1e-5
    md = (out / "report.md").read_text()
    assert "gpt2" in md and "| law | measured |" in md and "figures/hf_layer1.png" in md
    assert "issue " not in md.lower() and "THEORY.md" not in md and "[docs/theory.md](" in md
    for name in ("hf_layer1.png", "hf_layers.png"):
        assert (out / "figures" / name).stat().st_size > 10_000
    with np.load(out / "sweeps" / "layer1.npz") as f:
        assert f["alphas"].size == 121 and f["token_strs"].shape == f["tokens"].shape
        assert np.all(np.isfinite(f["text_delta_ce"]))
    assert "laws hold at layers 1" in capsys.readouterr().out


def test_reproduce_hf_refuses_a_layer_out_of_range_before_writing(tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["reproduce", "--hf", str(FIXTURE), "--concept", "evil", "--layers", "0,9", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers" in err[0]
    assert not out.exists()


def test_hf_options_are_refused_without_hf(tmp_path, capsys):
    assert main(["reproduce", "--layers", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--layers" in capsys.readouterr().err


def test_reproduce_hf_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    """A user error is refused before any layer runs (not reported as a layer that failed)."""
    v = tmp_path / "v.npy"
    np.save(v, np.ones(7))  # the model's width is 32
    out = tmp_path / "rep"
    code = main(["reproduce", "--hf", str(FIXTURE), "--concept", "evil", "--concept-regex", "river",
                 "--vector", str(v), "--layers", "1", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vector" in err[0]
    assert not out.exists()
