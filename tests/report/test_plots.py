"""Figures of the paper (ufmjax.report.plots, ufmjax.report.figures): valid PNGs, atomic saves, the
numbers each figure checks are those of a correct model, and legends that name only drawn curves
and cover none (Figs. 3, B.1, 4, 5, A.4 and the pretrained-model figures).

The model is an exactly trained UFM built in memory (W = I, H = log p^T, so softmax(W h_j)
= p(.|c_j): Assumption 2 holds exactly), swept in float64: no training, and every closed
form of docs/theory.md holds to rounding.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib.figure import Figure

from ufmjax import theory
from ufmjax.report import plots
from ufmjax.data import ConceptData, reference_config
from ufmjax.data import dirichlet_config
from ufmjax.report.figures import FIGURE_FILES, check_summary, default_contexts, token_peaks, ufm_figures
from ufmjax.report.gpt_figures import draw_fig_a4
from ufmjax.report.hf_figures import draw_hf_layer, draw_hf_layers
from ufmjax.runs import UFMRun, ufm_sweep
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
        sw, _ = ufm_sweep(run, np.linspace(-4, 4, 81), target=0, dtype=jnp.float64)
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


# ----------------------------------------------------------------------------- legends


def _legend_box(ax):
    """The legend's box on screen (display pixels)."""
    return ax.get_legend().get_window_extent(ax.get_figure().canvas.get_renderer())


def test_legend_overlap_finds_covered_lines_and_place_legends_clears_them():
    """A line through the legend's box is reported; place_legends moves the legend to the
    first free corner, or outside the axes when none is free."""
    fig = plots.new_figure((4, 3))
    ax = fig.subplots()
    x = np.linspace(0, 1, 50)
    ax.plot(x, np.full_like(x, 0.97), label="top")  # crosses every upper location
    ax.plot(x, x, label="diagonal")  # crosses lower left (and upper right)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    assert "top" in " ".join(plots.legend_overlap(ax))
    plots.place_legends(fig)
    assert plots.legend_overlap(ax) == []
    box, frame = _legend_box(ax), ax.bbox
    assert box.x0 > frame.x0 + 0.5 * frame.width and box.y1 < frame.y0 + 0.5 * frame.height, \
        "expected the one free corner, lower right"
    # A text inside the axes counts as data too.
    ax.text(0.98, 0.02, "note", transform=ax.transAxes, ha="right", va="bottom")
    assert any("note" in hit for hit in plots.legend_overlap(ax))

    dense = plots.new_figure((4, 3))
    ax = dense.subplots()
    for k in range(12):  # waves that fill the whole panel: no corner is free
        ax.plot(x, 0.5 + 0.5 * np.sin(2 * np.pi * (3 * x + k / 12)), label=f"w{k}")
    ax.legend(loc="best")
    assert plots.legend_overlap(ax), "matplotlib's best location still covers data on a dense panel"
    plots.place_legends(dense)
    assert plots.legend_overlap(ax) == []
    assert _legend_box(ax).x0 >= ax.bbox.x1, "with no free corner the legend goes outside the axes"


def test_legend_orphans_names_entries_that_match_nothing_drawn():
    from matplotlib.lines import Line2D

    fig = plots.new_figure((4, 3))
    ax = fig.subplots()
    line, = ax.plot([0, 1], [0, 1], color="tab:red")
    ax.plot([0, 1], [5, 6], color="tab:blue")  # drawn, but outside the view limits below
    ax.set_ylim(-1, 2)
    ax.legend([line, Line2D([], [], color="0.3"), Line2D([], [], color="tab:blue")],
              ["drawn", "style key", "out of view"])
    assert plots.legend_orphans(fig) == ["style key", "out of view"]


def _bumps(run, dtype, step=0.02, reach=6.0):
    """A sweep of `run` toward concept 0 with the theory peaks Fig. 3 marks (as ufm_figures)."""
    alphas = np.linspace(-reach, reach, int(round(2 * reach / step)) + 1)
    sw, _ = ufm_sweep(run, alphas, target=0, dtype=dtype)
    p = np.asarray(sw["probs_base"], np.float64)
    peaks = token_peaks(p, theory.log_odds(p, sw["P"], sw["N"]))
    return sw, peaks, default_contexts(run.data, sw["P"], sw["N"], 0)


def _peak_markers(ax):
    """The peak markers Fig. 3 drew in one panel."""
    return [ln for ln in ax.lines if ln.get_marker() == "o"]


@pytest.fixture(scope="module")
def exact_sweeps(tmp_path_factory):
    """Exact UFMs (uniform and Dirichlet profiles) swept in float64 on [-12, 12] and [-1, 1]."""
    out = {}
    with jax.enable_x64(True):
        for name, cfg in (("uniform", reference_config()),
                          ("dirichlet", dirichlet_config(vocab=9, concepts=3, eps=0.1, seed=0))):
            run = exact_run(cfg, tmp_path_factory.mktemp(name))
            sw, peaks, contexts = _bumps(run, jnp.float64, step=0.1, reach=12.0)
            near, _ = ufm_sweep(run, np.linspace(-1, 1, 201), target=0, dtype=jnp.float64)
            out[name] = sw, near, peaks, contexts
    return out


def test_fig3_uniform_profiles_one_entry_per_visible_curve_and_no_edge_peak(exact_sweeps):
    """Uniform profiles (the reference point): the three tokens of each concept have one curve,
    so one legend entry each. Tokens of the third concept are largest at alpha = 0 in their own
    context, the end of both halves, which is a peak of neither: float32 training moves that
    peak to about +-1e-6, and it must not be marked (nor titled "peaks at 0.000") either way."""
    sw, _, peaks, contexts = exact_sweeps["uniform"]
    labels = {}
    for sign in (1, -1):
        fig, numbers = plots.fig_token_bumps(sw, peaks + sign * 1e-6, target=0, contexts=contexts, sign=sign,
                                             alpha_max=6.0)
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert texts[:3] == ["z=0, 1, 2 (concept 0, target, identical curves)",
                             "z=3, 4, 5 (concept 1, identical curves)", "z=6, 7, 8 (concept 2, identical curves)"]
        assert len(texts) == 4 and "Thm 3.3" in texts[3]
        assert numbers["curves_shown"] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        axes = fig.axes
        assert all(sum(not ln.get_label().startswith("_") for ln in ax.lines) == 3 for ax in axes)
        # Golden peaks (test_reference_point_golden_peaks): third-concept tokens peak at -1/2 in
        # the target's context, +1/2 in N's, and at 0 in their own context (balanced).
        xs = [[float(m.get_xdata()[0]) for m in _peak_markers(ax)] for ax in axes]
        half = pytest.approx(0.5 * sign, abs=1e-5)
        assert xs == ([[], [half], []] if sign > 0 else [[half], [], []])
        assert numbers["n_bumps_shown"] == 1
        assert "no peak in this range (3 tokens largest at \u03b1 = 0)" in axes[2].get_title()
        assert "0.000" not in " ".join(ax.get_title() for ax in axes)
        assert plots.legend_problems(fig) == []
        labels[sign] = texts
    assert labels[1] == labels[-1]


def test_fig3_non_uniform_profiles_marks_every_interior_bump(exact_sweeps):
    sw, _, peaks, contexts = exact_sweeps["dirichlet"]
    fig, numbers = plots.fig_token_bumps(sw, peaks, target=0, contexts=contexts, sign=1, alpha_max=6.0)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:9] == [f"z={z} (concept {z // 3}{', target' if z < 3 else ''})" for z in range(9)]
    assert len(texts) == 10 and numbers["curves_shown"] == [[z] for z in range(9)]
    step = 0.1
    for ax, j in zip(fig.axes, contexts):
        want = np.sort(peaks[j][np.isfinite(peaks[j]) & (peaks[j] > step / 2) & (peaks[j] < 6 - step / 2)])
        got = np.sort([float(m.get_xdata()[0]) for m in _peak_markers(ax)])
        np.testing.assert_allclose(got, want, atol=1e-12, err_msg=f"peaks marked in context {j}")
    assert numbers["n_bumps_shown"] > 3
    assert plots.legend_problems(fig) == []


@pytest.mark.parametrize("profiles", ["uniform", "dirichlet"])
def test_fig4_and_fig5_legend_entries_are_drawn_and_cover_nothing(profiles, exact_sweeps):
    sw, near, _, contexts = exact_sweeps[profiles]
    p = sw["probs_base"]
    M = theory.log_odds(p, sw["P"], sw["N"])
    tanh = theory.tanh_representation(p, M, sw["concept_of"], sw["alphas"])
    fig, _ = plots.fig_concept_curves(sw, tanh, target=0, contexts=contexts, alpha_max=6.0)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["concept 0 (target), sweep kernel", "concept 1, sweep kernel", "concept 2, sweep kernel",
                     "tanh form (Thm 3.6)"]
    assert plots.legend_problems(fig) == []
    fig5, _ = plots.fig_delta_ce(near, sw, theory.ce_curvature(p, M, sw["weights"]))
    assert plots.legend_problems(fig5) == []


def _a4_inputs(A=161):
    """Arrays shaped like a text GPT's scaled_sweep (two identical prompts): ten uppercase
    tokens rising to different levels, four unsteered tokens spread over the panel's height
    at both ends, as in the real Fig. A.4 panel (a)."""
    a = np.sinh(np.linspace(-5.3, 5.3, A))
    chars = list("AFHIORSTW#") + [" ", "-", "e", "t"]
    concept_of = np.array([0] * 9 + [1] * 5)
    V = len(chars)

    def step(x, c, w=1.5):
        return 0.5 * (1 + np.tanh((np.arcsinh(x) - np.arcsinh(c)) / (w / 3)))

    dp = np.zeros((A, V))
    for k, lvl in enumerate(np.linspace(0.02, 0.12, 10)):
        dp[:, k] = lvl * step(a, 2.0 + k / 3)
    for k, (neg, pos) in enumerate([(-0.25, -0.27), (-0.06, -0.06), (0.1, -0.05), (0.14, -0.04)]):
        dp[:, 10 + k] = neg * step(-a, 1.0 + k) + pos * step(a, 1.0 + k)
    probs = np.full((2, V), 0.02)
    probs[:, 10:] = 0.1  # the most likely unsteered tokens, drawn dashed beside the top ones
    F = 0.7 * step(a, 1.5)
    arrays = {"alphas": a, "probs_base": probs, "delta_p": np.repeat(dp[:, None, :], 2, axis=1),
              "concept_prob": np.repeat(np.stack([F, 1 - F], -1)[:, None, :], 2, axis=1),
              "delta_ce": 8 * step(a, 3.0) + 1.7 * step(-a, 5.0), "text_delta_ce": 7.8 * step(a, 3.2),
              "limit_distance": 12 / (1 + np.abs(a) / 10), "local_ufm_kl": 1e-3 * a ** 2,
              "weights": np.full(2, 0.5), "tokens": np.arange(V), "token_strs": np.array(chars),
              "concept_of": np.where(concept_of == 0, 1, 0), "text_concept_prob": 0.9 * F,
              "d_delta_ce": np.gradient(8 * step(a, 3.0), a), "d2_delta_ce": np.zeros(A),
              "limit_logits": np.ones((2, V)), "presence_alphas": a[::20], "concept_presence": F[::20]}
    run = SimpleNamespace(source=SimpleNamespace(chars=chars, concept_of=concept_of),
                          model=SimpleNamespace(config=SimpleNamespace(layers=1)),
                          metrics={"val_loss": 2.1, "bigram_val_loss": 2.3})
    summary = {"top_tokens": list(range(10)), "local_ufm_range": [-0.9, 0.7], "quad_window": 0.7}
    return run, arrays, summary


def test_fig_a4_panel_a_legend_covers_no_curve():
    run, arrays, summary = _a4_inputs()
    fig = draw_fig_a4(run, arrays, summary, layer=1, positions="all")
    assert plots.legend_problems(fig) == []
    panel = fig.axes[0]
    assert len(panel.get_legend().get_texts()) == 14
    # The data are as dense as the real panel: its former legend (inside, upper left) covered curves.
    handles, labels = panel.get_legend_handles_labels()
    panel.legend(handles, labels, fontsize=7, ncol=3, loc="upper left")
    assert plots.legend_overlap(panel)


def test_hf_figures_legends_cover_no_curve_and_name_drawn_lines():
    _, arrays, summary = _a4_inputs()
    summary = {**summary, "top_tokens": list(range(10))}
    fig = draw_hf_layer(arrays, summary, title="test")
    assert plots.legend_problems(fig) == []
    layers = draw_hf_layers([{"layer": 1, "arrays": arrays, "scale": 1.0},
                             {"layer": 2, "arrays": {**arrays, "text_delta_ce": arrays["text_delta_ce"] / 2},
                              "scale": 0.5}], title="test")
    assert plots.legend_problems(layers) == []


def test_hf_token_labels_never_look_empty():
    from ufmjax.report.hf_figures import _label

    assert [_label(t) for t in (" ", " the", "the", "", "\n")] == ["' '", "' the'", "the", "''", "\\n"]
