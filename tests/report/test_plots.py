"""Figures of the paper (ufmjax.report.plots, ufmjax.report.figures): valid PNGs, atomic saves, and the
numbers each figure checks are those of a correct model.

The model is an exactly trained UFM built in memory (W = I, H = log p^T, so softmax(W h_j)
= p(.|c_j): Assumption 2 holds exactly), swept in float64: no training, and every closed
form of docs/theory.md holds to rounding.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib.figure import Figure

from ufmjax.report import plots
from ufmjax.data import ConceptData, reference_config
from ufmjax.data import dirichlet_config
from ufmjax.report.figures import FIGURE_FILES, check_summary, ufm_figures
from ufmjax.runs import UFMRun
from ufmjax.models.ufm import UFM, UFMConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = dict(alpha_step=0.1, ce_wide=12.0)  # coarse grids: the checks do not need fine ones


def exact_run(data_config, tmp_path) -> UFMRun:
    """A UFM whose logits are log p(z|c_j) exactly (call with x64 enabled)."""
    data = ConceptData(data_config)
    V, m = data.vocab, data.num_contexts
    model = UFM(UFMConfig(vocab=V, contexts=m, dim=V), rngs=nnx.Rngs(0))
    # New float64 parameters (the UFM initialises in float32; assigning in place would cast).
    model.W = nnx.Param(jnp.eye(V, dtype=jnp.float64))
    model.H = nnx.Param(jnp.asarray(np.log(data.p_MxV).T, jnp.float64))
    return UFMRun(Path(tmp_path), {"model": "ufm", "data": data_config.to_dict()}, data, model,
                  {"final_ce": data.entropy(), "entropy": data.entropy(), "gap": 0.0})


def assert_png(path):
    path = Path(path)
    head = path.read_bytes()[:8]
    assert head == PNG_SIGNATURE, f"{path.name} is not a PNG (starts with {head!r})"
    assert path.stat().st_size > 20_000, f"{path.name} is only {path.stat().st_size} bytes: an empty figure?"


@pytest.fixture(scope="module")
def dirichlet_figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    with jax.enable_x64(True):
        run = exact_run(dirichlet_config(vocab=9, concepts=3, eps=0.1, seed=0), out)
        return out, ufm_figures(run, out / "dirichlet", target=0, dtype=jnp.float64, **FAST)


def test_figures_are_written_as_pngs(dirichlet_figures):
    out, result = dirichlet_figures
    assert set(result["files"]) == set(FIGURE_FILES)
    for key, name in FIGURE_FILES.items():
        assert Path(result["files"][key]) == out / "dirichlet" / name
        assert_png(result["files"][key])
    assert result["figures"] == [result["files"][k] for k in FIGURE_FILES]
    assert not list((out / "dirichlet").glob(".*.tmp")), "a temporary file was left behind"


def test_numbers_of_a_correct_model(dirichlet_figures):
    _, r = dirichlet_figures
    f3, fb, f4, f5 = r["fig3"], r["figB1"], r["fig4"], r["fig5"]
    # Thm 3.3: bumps exist on both sides, rise then fall, and off-target ones peak first.
    assert f3["n_bumps"] > 0 and fb["n_bumps"] > 0 and f3["n_bumps_target"] > 0
    for f in (f3, fb):
        assert f["off_target_before_target"] is True, "Thm 3.3's peak order fails"
        assert f["contexts_checked_for_order"] == 12 and f["order_margin"] > 0
        assert f["slope_sign_violations"] == 0, "a bump does not rise then fall (Lemma B.5)"
        assert f["max_abs_err_vs_lemma_b3"] < 1e-12, "kernel delta_p differs from Lemma B.3"
        assert f["kernel_peak_max_err"] < 0.01 * f["grid_step"], \
            "the kernel's bump peaks (slope zeros) are not at theory.peak_strengths"
    # Thm 3.6: the kernel's concept curves are the tanh form.
    assert f4["max_abs_err_vs_tanh"] < 1e-6
    assert f4["target_increasing"] is True
    # Thm 3.8: curvature at 0, no slope at 0 (exact model), quadratic law only near 0.
    assert f5["kernel_curvature_rel_err"] < 1e-10
    assert abs(f5["kernel_slope_at_0"]) < 1e-12
    assert f5["max_rel_err_quadratic_within_0.1"] < 0.1
    assert f5["max_rel_err_quadratic_within_3"] > 0.1, "ΔCE should leave its quadratic law by |alpha| = 3"
    assert f5["departure_alpha_neg"] < 0 < f5["departure_alpha_pos"]
    assert f5["max_abs_err_vs_theory_near"] < 1e-12 and f5["max_abs_err_vs_theory_wide"] < 1e-9
    assert all(check_summary(r, float64=True).values())


def test_reference_point_golden_peaks(tmp_path):
    """Uniform profiles: third-concept tokens peak at alpha = -1/2, +1/2, 0 exactly.

    In a context of concept g, E_alpha[M] = 0 where the mass on M = +L and M = -L balances:
    a e^{aL} = b e^{-aL} (g = target) gives alpha = -1/2, b e^{aL} = a e^{-aL} (g = N's
    concept) +1/2, and the third concept's own contexts are balanced at alpha = 0. Every
    target token ties at M_max, so no target token has a bump.
    """
    with jax.enable_x64(True):
        run = exact_run(reference_config(), tmp_path)
        r = ufm_figures(run, tmp_path / "ref", target=0, dtype=jnp.float64, **FAST)
    peaks = {int(j): np.asarray(v, dtype=object) for j, v in r["theory"]["peaks_of_contexts_shown"].items()}
    for j, want in zip(r["setup"]["contexts"], (-0.5, 0.5, 0.0)):
        third = np.asarray(peaks[j][6:], float)
        np.testing.assert_allclose(third, want, atol=1e-12, err_msg=f"third-concept peaks of context {j}")
    assert r["fig3"]["n_bumps_target"] == 0 and r["figB1"]["n_bumps_target"] == 0
    assert r["fig3"]["off_target_before_target"] is True
    assert r["fig3"]["kernel_peak_max_err"] < 1e-9
    assert r["fig4"]["max_abs_err_vs_tanh"] < 1e-6


def test_checks_detect_wrong_curves():
    """The numbers are not vacuous: perturbed theory arrays or a wrong order are reported."""
    with jax.enable_x64(True):
        run = exact_run(dirichlet_config(vocab=9, concepts=3, eps=0.1, seed=0), "unused")
        from ufmjax.runs import ufm_sweep

        sw, _ = ufm_sweep(run, np.linspace(-4, 4, 81), target=0, dtype=jnp.float64)
    from ufmjax import theory

    p = sw["probs_base"]
    M = theory.log_odds(p, sw["P"], sw["N"])
    tanh = theory.tanh_representation(p, M, sw["concept_of"], sw["alphas"])
    assert plots.check_concept_curves(sw, tanh, target=0)["max_abs_err_vs_tanh"] < 1e-12
    assert plots.check_concept_curves(sw, tanh * 1.01, target=0)["max_abs_err_vs_tanh"] > 1e-4
    peaks = theory.peak_strengths(p, M)
    good = plots.check_token_bumps(sw, peaks, target=0)
    assert good["off_target_before_target"] and good["slope_sign_violations"] == 0
    # Claiming the target concept is concept 1 breaks the order Thm 3.3 proves for concept 0.
    assert plots.check_token_bumps(sw, peaks, target=1)["off_target_before_target"] is False
    # Peaks moved away from where the kernel's bumps are: wrong slope signs, large error.
    shifted = plots.check_token_bumps(sw, peaks + 0.5, target=0)
    assert shifted["slope_sign_violations"] > 0 or shifted["kernel_peak_max_err"] > 0.1


def _small_figure() -> Figure:
    fig = plots.new_figure((3, 2))
    fig.subplots().plot([0, 1], [0, 1])
    return fig


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    plots.save_figure(_small_figure(), path)
    before = path.read_bytes()
    assert before[:8] == PNG_SIGNATURE

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_SIGNATURE + b"truncated")  # half-written, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(_small_figure(), path)
    assert path.read_bytes() == before, "a failed save replaced the previous figure"
    with pytest.raises(OSError):
        plots.save_figure(_small_figure(), tmp_path / "new.png")
    assert not (tmp_path / "new.png").exists(), "a failed save left a partial file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"], "temporary files were left behind"


def test_save_figure_needs_png_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plots.save_figure(_small_figure(), tmp_path / "fig.pdf")
