"""`ufmjax sweep --hf DIR` and `ufmjax optimize --hf DIR`, in-process, on the committed Llama fixture.

The fixture's tokenizer is a tiny BPE trained on the prose of `make_fixtures.py`, so the
steering prompts, evaluation prompts and concept words below are taken from that prose. Every
run uses the same few input shapes and a 5-point grid, so the compiled functions are shared
between the tests. Each bad input must exit 2 with ONE stderr line that names what is wrong,
and write nothing.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ufmjax.cli import main
from ufmjax.models.hf.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hf"
LLAMA = FIXTURES / "llama"
ALPHAS = ["--alphas", "-4:4:5"]

# Three texts of at most 12 tokens each (BOS included), 12 the longest: every set pads to [3, 12],
# the shape of the fixtures' reference prompts, so the compiled functions are shared.
POSITIVE = ["The river bends twice", "on the flat grey stones. Nobody", "the water runs"]
NEGATIVE = ["At dusk the baker", "wide stone sill of her window", "warm bread on the sill"]
PROMPTS = ["Old boats drift past the", "Jack just writes the numbers down", "In winter the mill"]
WORDS = ["river", "water", "stones", "valley"]

# The keys a GPT run's sweep writes (ufmjax.runs.gpt.gpt_sweep), which an --hf sweep writes too.
GPT_SWEEP_KEYS = {"alphas", "probs_base", "delta_p", "tokens", "concept_prob", "delta_p_concept", "delta_ce",
                  "kl", "P", "N", "steering_vector", "prompts", "limit_distance", "local_ufm_kl",
                  "text_delta_ce", "meta"}
for _q in ("delta_p", "concept_prob", "delta_p_concept", "delta_ce", "kl", "text_delta_ce"):
    GPT_SWEEP_KEYS |= {"d_" + _q, "d2_" + _q}


def _write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_cli")
    return {"dir": d, "positive": _write_lines(d / "positive.txt", POSITIVE),
            "negative": _write_lines(d / "negative.txt", NEGATIVE),
            "prompts": _write_lines(d / "prompts.txt", PROMPTS),
            "words": _write_lines(d / "words.txt", ["# the river's things"] + WORDS)}


def hf_args(files, folder=LLAMA, *, vector=None, words=None, prompts=None):
    args = ["--hf", str(folder), "--prompts", str(prompts or files["prompts"]),
            "--concept-words", str(words or files["words"])]
    if vector is None:
        args += ["--positive", str(files["positive"]), "--negative", str(files["negative"])]
    else:
        args += ["--vector", str(vector)]
    return args


def load_npz(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def base_sweep(files):
    out = files["dir"] / "base.npz"
    assert main(["sweep", *hf_args(files), *ALPHAS, "--out", str(out)]) == 0
    return load_npz(out)


def test_inputs_fit_the_fixture_tokenizer():
    tok = load_tokenizer(LLAMA)
    assert set(WORDS) <= {s.strip() for s in tok.token_strs(256)}
    for texts in (POSITIVE, NEGATIVE, PROMPTS):
        assert max(len(tok.encode(t)) for t in texts) == 12


def test_sweep_hf_writes_a_gpt_sweep(base_sweep):
    a = base_sweep
    missing = GPT_SWEEP_KEYS - set(a)
    assert not missing, missing
    A, M, V = 5, len(PROMPTS), 256
    np.testing.assert_allclose(a["alphas"], np.linspace(-4, 4, 5))
    assert a["probs_base"].shape == (M, V)
    np.testing.assert_allclose(a["probs_base"].sum(axis=1), 1.0, atol=1e-5)
    assert a["delta_p"].shape == (A, M, a["tokens"].size) and a["tokens"].size == V
    assert a["concept_prob"].shape[:2] == (A, M)
    assert a["delta_ce"].shape == (A,) and a["text_delta_ce"].shape == (A,)
    assert a["limit_distance"].shape == (A,) and a["local_ufm_kl"].shape == (A,)
    # alpha = 0 changes nothing
    zero = int(np.argmin(np.abs(a["alphas"])))
    assert np.abs(a["delta_p"][zero]).max() < 1e-6 and abs(a["delta_ce"][zero]) < 1e-6
    assert abs(a["text_delta_ce"][zero]) < 1e-6
    assert a["steering_vector"].shape == (32,) and np.abs(a["steering_vector"]).max() > 0
    assert a["P"].size == len(POSITIVE) and a["N"].size == len(NEGATIVE)
    # the evaluation prompts, left-padded with -1
    assert a["prompts"].shape[0] == M
    tok = load_tokenizer(LLAMA)
    for row, text in zip(a["prompts"], PROMPTS):
        ids = tok.encode(text)
        assert list(row[row >= 0]) == ids and np.all(row[:row.size - len(ids)] == -1)
    # token_strs: the decoded string of each tracked token
    strs = tok.token_strs(V)
    assert a["token_strs"].shape == a["tokens"].shape
    assert list(a["token_strs"]) == [strs[t] for t in a["tokens"]]
    meta = json.loads(str(a["meta"]))
    assert meta["model_type"] == "llama" and meta["layer"] == 2 and meta["positions"] == "all"
    assert meta["concept_tokens"] == int(a["concept_mask"].sum()) > 0
    for j in np.flatnonzero(a["concept_mask"]):
        assert strs[j].strip().casefold() in {w[:k] for w in WORDS for k in range(3, len(w) + 1)}


def test_sweep_hf_last_position_top_k(files, base_sweep, capsys):
    out = files["dir"] / "last.npz"
    assert main(["sweep", *hf_args(files), *ALPHAS, "--positions", "last", "--top-k", "3", "--layer", "2",
                 "--out", str(out)]) == 0
    a = load_npz(out)
    assert a["tokens"].shape == (3,) and a["token_strs"].shape == (3,)
    assert len(set(a["tokens"].tolist())) == 3 and a["tokens"].min() >= 0 and a["tokens"].max() < 256
    strs = load_tokenizer(LLAMA).token_strs(256)
    assert list(a["token_strs"]) == [strs[t] for t in a["tokens"]]
    assert a["delta_p"].shape == (5, len(PROMPTS), 3)
    meta = json.loads(str(a["meta"]))
    assert meta["positions"] == "last" and meta["layer"] == 2
    # the same layer and prompt sets as the base sweep: the same vector and unsteered model ...
    np.testing.assert_allclose(a["steering_vector"], base_sweep["steering_vector"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a["probs_base"], base_sweep["probs_base"], atol=1e-6)
    # ... but only the last position steered: another response
    every = base_sweep["delta_p"][:, :, a["tokens"]]
    assert np.abs(a["delta_p"][[0, -1]] - every[[0, -1]]).max() > 1e-4
    zero = int(np.argmin(np.abs(a["alphas"])))
    assert np.abs(a["delta_p"][zero]).max() < 1e-6
    assert capsys.readouterr().err == ""


def test_vector_file_reproduces_the_sweep(files, base_sweep):
    vector = files["dir"] / "v.npy"
    np.save(vector, base_sweep["steering_vector"])
    out = files["dir"] / "from_vector.npz"
    assert main(["sweep", *hf_args(files, vector=vector), *ALPHAS, "--out", str(out)]) == 0
    a = load_npz(out)
    assert json.loads(str(a["meta"]))["vector_source"] == "file"
    np.testing.assert_array_equal(a["steering_vector"], base_sweep["steering_vector"])
    for key in ("probs_base", "delta_p", "concept_prob", "delta_ce", "d_delta_ce", "d2_delta_ce", "kl",
                "limit_distance", "local_ufm_kl", "text_delta_ce"):
        np.testing.assert_allclose(a[key], base_sweep[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_optimize_hf_writes_alpha(files, capsys):
    out = files["dir"] / "opt.json"
    rc = main(["optimize", *hf_args(files), "--objective", "penalised", "--lam", "0.1", "--float32",
               "--out", str(out)])
    assert rc in (0, 1)  # 1: written but not converged
    result = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(result["alpha"], float) and np.isfinite(result["alpha"])
    assert result["model_type"] == "llama" and result["layer"] == 2
    assert "delta_p_target" in result and "delta_ce" in result
    assert capsys.readouterr().out.startswith("alpha=")


# ---------------------------------------------------------------- bad inputs: exit 2, one line, nothing written

def _fails(capsys, argv, out: Path, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ufmjax {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    return lines[0]


@pytest.fixture
def bad_folder(tmp_path):
    """A copy of the Llama fixture, to break."""
    folder = tmp_path / "model"
    shutil.copytree(LLAMA, folder)
    return folder


def test_folder_without_config_json(files, tmp_path, capsys):
    out = tmp_path / "s.npz"
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["sweep", *hf_args(files, empty), *ALPHAS, "--out", str(out)], out, "--hf", "config.json")


def test_folder_that_does_not_exist(files, tmp_path, capsys):
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files, tmp_path / "nowhere"), *ALPHAS, "--out", str(out)], out,
           "--hf", "nowhere")


def test_folder_without_weights(files, bad_folder, tmp_path, capsys):
    (bad_folder / "model.safetensors").unlink()
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files, bad_folder), *ALPHAS, "--out", str(out)], out,
           str(bad_folder), "model.safetensors")


def test_unsupported_model_type(files, bad_folder, tmp_path, capsys):
    cfg = json.loads((bad_folder / "config.json").read_text(encoding="utf-8"))
    cfg["model_type"] = "falcon"
    (bad_folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files, bad_folder), *ALPHAS, "--out", str(out)], out, "--hf", "model_type",
           "falcon")


def test_unsupported_field(files, bad_folder, tmp_path, capsys):
    cfg = json.loads((bad_folder / "config.json").read_text(encoding="utf-8"))
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (bad_folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    out = tmp_path / "o.json"
    _fails(capsys, ["optimize", *hf_args(files, bad_folder), "--out", str(out)], out, "--hf", "yarn")


@pytest.mark.parametrize("layer", ["99", "-1"])
def test_layer_outside_range(files, tmp_path, capsys, layer):
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files), *ALPHAS, f"--layer={layer}", "--out", str(out)], out,
           "--layer", "[0, 3]")


def test_empty_prompt_file(files, tmp_path, capsys):
    empty = _write_lines(tmp_path / "empty.txt", ["", "   "])
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files, prompts=empty), *ALPHAS, "--out", str(out)], out, "--prompts",
           "empty.txt")


def test_concept_words_matching_no_token(files, tmp_path, capsys):
    words = _write_lines(tmp_path / "words.txt", ["xylophone", "zeppelin"])
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files, words=words), *ALPHAS, "--out", str(out)], out, "--concept-words")


def test_vector_of_the_wrong_width(files, tmp_path, capsys):
    vector = tmp_path / "v16.npy"
    np.save(vector, np.ones(16))
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files, vector=vector), *ALPHAS, "--out", str(out)], out, "--vector", "32")


def test_vector_that_is_not_a_vector(files, tmp_path, capsys):
    vector = tmp_path / "m.npy"
    np.save(vector, np.ones((4, 32)))
    out = tmp_path / "s.npz"
    _fails(capsys, ["sweep", *hf_args(files, vector=vector), *ALPHAS, "--out", str(out)], out, "--vector")


@pytest.mark.parametrize("command", ["sweep", "optimize"])
def test_run_folder_and_hf_together(files, tmp_path, capsys, command):
    out = tmp_path / ("s.npz" if command == "sweep" else "o.json")
    _fails(capsys, [command, str(tmp_path / "some_run"), *hf_args(files), "--out", str(out)], out, "--hf",
           "exactly one")


@pytest.mark.parametrize("command", ["sweep", "optimize"])
def test_neither_run_folder_nor_hf(files, tmp_path, capsys, command):
    out = tmp_path / ("s.npz" if command == "sweep" else "o.json")
    _fails(capsys, [command, "--target", "0", "--out", str(out)], out, "--hf", "exactly one")


@pytest.mark.parametrize("command", ["sweep", "optimize"])
def test_target_with_hf(files, tmp_path, capsys, command):
    out = tmp_path / ("s.npz" if command == "sweep" else "o.json")
    _fails(capsys, [command, *hf_args(files), "--target", "1", "--out", str(out)], out, "--target")


@pytest.mark.parametrize("option", ["--positive", "--prompts", "--concept-words"])  # --vector: runs take it too
def test_hf_only_option_with_a_run_folder(files, tmp_path, capsys, option):
    out = tmp_path / "s.npz"
    value = {"--positive": files["positive"], "--prompts": files["prompts"],
             "--concept-words": files["words"], "--vector": tmp_path / "v.npy"}[option]
    _fails(capsys, ["sweep", str(tmp_path / "dummy_run"), "--target", "0", option, str(value), *ALPHAS,
                    "--out", str(out)], out, option, "--hf")


def test_run_folder_options_are_refused_with_hf(tmp_path, capsys):
    from ufmjax.cli import main

    out = tmp_path / "s.npz"
    code = main(["sweep", "--hf", str(Path(__file__).resolve().parents[2] / "fixtures" / "hf" / "llama"),
                 "--concept", "evil", "--negatives", "random", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--negatives" in err[0] and not out.exists()
