"""Several --vector terms, norm conventions and bootstrap bands through runs and the CLI."""

import json

import numpy as np
import pytest

from ufmjax.cli import main
from ufmjax.runs import several
from ufmjax.runs.terms import parse_term


def sweep(tmp_path, reference_run, name, *extra):
    out = tmp_path / f"{name}.npz"
    assert main(["sweep", str(reference_run.path), *extra, "--float64", "--quiet", "--out", str(out)]) == 0
    return np.load(out)


def test_one_vector_term_keeps_todays_keys_and_values(tmp_path, reference_run):
    a = sweep(tmp_path, reference_run, "a", "--target", "0", "--alphas", "-4:4:9")
    b = sweep(tmp_path, reference_run, "b", "--vector", "target=0", "--alphas", "-4:4:9")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if key != "meta":
            np.testing.assert_array_equal(a[key], b[key])


def test_two_terms_product_grid_keys(tmp_path, reference_run):
    z = sweep(tmp_path, reference_run, "m", "--vector", "target=0", "--vector", "target=1,negative=2",
              "--alphas", "-4:4:5,-2:2:3")
    assert z["alphas"].shape == (15, 2) and list(z["alphas_shape"]) == [5, 3]
    assert z["steering_vectors"].shape == (2, 16) and z["P"].shape[0] == 2 and z["N"].shape[0] == 2
    assert z["grad_kl"].shape == (15, 12, 2) and z["hess_kl"].shape == (15, 12, 2, 2)
    assert "d_kl" not in z.files
    # A point on the first axis equals the one-term sweep of the first vector.
    one = sweep(tmp_path, reference_run, "one", "--target", "0", "--alphas", "-4:4:5")
    on_axis = z["alphas"][:, 1] == 0
    np.testing.assert_allclose(z["kl"][on_axis], one["kl"], atol=1e-12)
    np.testing.assert_allclose(z["grad_kl"][on_axis][..., 0], one["d_kl"], atol=1e-12)
    np.testing.assert_allclose(z["hess_kl"][on_axis][..., 0, 0], one["d2_kl"], atol=1e-12)


def test_bootstrap_of_the_full_sets_collapses_to_the_curve(x64, reference_run):
    st = several.normalized(reference_run, reference_run.steer(0, dtype=np.float64), "raw")
    alphas = np.linspace(-3, 3, 7)
    main_sweep = st.sweep(alphas)
    full = (np.arange(len(st.P)), np.arange(len(st.N)))
    bands = several.bootstrap_bands(reference_run, st, alphas, 1, resamples=[full])
    for key in ("kl", "d_kl", "d2_delta_ce", "concept_prob"):
        np.testing.assert_allclose(bands[key + "_lo"], main_sweep[key], atol=1e-10)
        np.testing.assert_allclose(bands[key + "_hi"], main_sweep[key], atol=1e-10)
    # B resamples in one pass == each resample swept on its own.
    sets = several.bootstrap_sets([len(st.P), len(st.N)], 3, seed=5)
    batch = several.bootstrap_bands(reference_run, st, alphas, 3, resamples=sets, interval=0.5)
    curves = []
    for idx in sets:
        v = st.features[0][idx[0]].mean(0) - st.features[1][idx[1]].mean(0)
        curves.append(several.with_vector(st, v).sweep(alphas)["kl"])
    lo, hi = np.quantile(np.stack(curves, 1), [0.25, 0.75], axis=1)
    np.testing.assert_allclose(batch["kl_lo"], lo, atol=1e-10)
    np.testing.assert_allclose(batch["kl_hi"], hi, atol=1e-10)


def test_norm_conventions(x64, reference_run):
    st = reference_run.steer(0, dtype=np.float64)
    unit = several.normalized(reference_run, st, "unit")
    np.testing.assert_allclose(np.linalg.norm(unit.vector), 1.0, rtol=1e-12)
    res = several.normalized(reference_run, st, "residual")
    np.testing.assert_allclose(np.linalg.norm(res.vector), res.meta["residual_norm"], rtol=1e-12)
    pre = several.normalized(reference_run, st, "preserve")
    out = pre.sweep(np.linspace(-2, 2, 5))
    assert np.all(np.isfinite(out["kl"])) and np.allclose(out["kl"][2], 0.0, atol=1e-12)


def test_optimize_two_terms_writes_a_vector_alpha(tmp_path, reference_run):
    out = tmp_path / "o.json"
    assert main(["optimize", str(reference_run.path), "--vector", "target=0", "--vector", "target=1,weight=0.5",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["alpha"]) == 2 and r["k"] == 2 and r["converged"]


@pytest.mark.parametrize("argv, match", [
    (["--vector", "target=0", "--vector", "target=1", "--alphas", "-1:1:3"], "1 grid"),
    (["--vector", "target=0", "--vector", "target=1", "--target", "0"], "--target applies to one"),
    (["--vector", "target=0,layer=1"], "layer"),
    (["--vector", "target=0,colour=red"], "unknown key"),
    (["--target", "0", "--bootstrap", "0"], "--bootstrap"),
    (["--target", "0", "--normalize", "sideways"], None),
])
def test_bad_terms_exit_2(tmp_path, reference_run, capsys, argv, match):
    with pytest.raises(SystemExit) if match is None else _nullcontext():
        rc = main(["sweep", str(reference_run.path), *argv, "--out", str(tmp_path / "x.npz")])
        assert rc == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_parse_term():
    t = parse_term("target=uppercase,negatives=random,layer=2,positions=last,weight=0.5")
    assert (t.target, t.negatives, t.layer, t.positions, t.weight) == ("uppercase", "random", 2, "last", 0.5)
    assert parse_term("v.npy").file == "v.npy"
    for bad in ("target=0,layer=x", "target=0,positions=middle", "file=v.npy,negatives=random", "target=0,weight=-1"):
        with pytest.raises(ValueError, match="--vector 1"):
            parse_term(bad)
