"""The paper's UFM figures (Figs. 3, B.1, 4, 5) from a trained run, with the numbers checked.

Source: Taimeskhanov, Vaiter, Garreau, "Towards Understanding Steering Strength"
(arXiv 2602.02712). `ufm_figures` sweeps a UFM run with the alpha-sweep kernel, evaluates
the closed forms of `ufmjax.theory` on the model's OWN unsteered probabilities (Lemma B.3
makes them exact for any UFM, trained perfectly or not), draws the figures with
`ufmjax.report.plots` and returns what each figure checked.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ufmjax import theory
from ufmjax.data import ConceptData, DataConfig
from ufmjax.report import plots
from ufmjax.runs import load_run, train_ufm_run, ufm_sweep

FIGURE_FILES = {
    "fig3": "fig3_token_bumps.png",
    "figB1": "figB1_token_bumps_negative.png",
    "fig4": "fig4_concept_curves.png",
    "fig5": "fig5_delta_ce.png",
}

# Float32 training breaks the exact ties of M (e.g. all target tokens of a uniform profile
# share M_max) by ~1e-5 relative; within this tolerance tokens count as extremal (Thm 3.3's
# monotone tokens) instead of "bumps" peaking at alpha ~ 1e4 with heights of ~1e-9.
TIE_RTOL = 1e-3
# Fig. 3's kernel peaks (slope zeros interpolated on the grid) must lie within this
# fraction of a grid step of theory.peak_strengths.
PEAK_RTOL_OF_STEP = 0.01
# Fig. 5's "quadratic law holds near 0" check: relative gap at |alpha| <= 0.1 below this.
DEPARTURE_NEAR = 0.1


def default_contexts(data: ConceptData, P, N, target: int) -> list[int]:
    """One context per concept: the first context of each, target concept first."""
    G = data.num_concepts
    order = [target] + [g for g in range(G) if g != target]
    return [int(data.contexts_of(g)[0]) for g in order]


def describe(run, sweep: dict, target: int, negatives: str, dtype: str) -> str:
    """One line naming the model, data and steering setup, for figure subtitles."""
    d = run.config.get("data", {})
    profiles = "uniform" if d.get("gamma") is None and d.get("omega") is None else "non-uniform (Dirichlet)"
    neg = sorted(set(np.asarray(sweep["context_concept"])[np.asarray(sweep["N"])].tolist()))
    neg_txt = f"N from concept {neg[0]}" if len(neg) == 1 else f"N from concepts {neg}"
    return (f"trained UFM, V={d.get('vocab')}, G={d.get('concepts')}, \u03b5={d.get('eps')}, {profiles} profiles; "
            f"target concept {target}, {negatives} {neg_txt}, |P|=|N|={np.asarray(sweep['P']).size}; {dtype}")


def token_peaks(probs_MxV, M_V, tie_rtol: float = TIE_RTOL) -> np.ndarray:
    """theory.peak_strengths, with tokens within tie_rtol of an extreme of M made extremal."""
    peaks = theory.peak_strengths(probs_MxV, M_V)
    is_max, is_min = theory.extremal_tokens(M_V, rtol=tie_rtol)
    peaks[:, is_max & ~is_min] = np.inf
    peaks[:, is_min & ~is_max] = -np.inf
    return peaks


def ufm_figures(run, out_dir, target: int = 0, *, negatives: str = "contrastive",
                dtype=jnp.float32, contexts=None, token_alpha: float = 6.0,
                concept_alpha: float = 6.0, ce_near: float = 1.0, ce_wide: float = 30.0,
                alpha_step: float = 0.02, ce_against: str = "data", tie_rtol: float = TIE_RTOL,
                dpi: int = 150) -> dict:
    """Sweep a UFM run and write Figs. 3, B.1, 4 and 5 as PNGs into out_dir.

    Args:
      run: a loaded UFM run (ufmjax.runs.load_run).
      out_dir: folder for the PNGs (created).
      target: target concept T; negatives: "contrastive" or "random" (Eq. 3).
      dtype: sweep precision, jnp.float32 or jnp.float64 (the latter needs x64 enabled).
      contexts: contexts to draw (default: the first context of each concept).
      token_alpha: Figs. 3 / B.1 draw alpha in [0, token_alpha] / [-token_alpha, 0].
      concept_alpha: Fig. 4 draws alpha in [-concept_alpha, concept_alpha].
      ce_near, ce_wide: Fig. 5's panels span [-ce_near, ce_near] and [-ce_wide, ce_wide].
      alpha_step: grid step of every sweep (the near ΔCE grid uses a tenth of it).
      ce_against: "data" (the paper's ΔCE against p(z|c_j)) or "model" (Assumption 2).
      tie_rtol: see TIE_RTOL.
      dpi: PNG resolution.
    Returns:
      dict: `files` (figure key -> path), `figures` (the paths, in figure order), one
      numbers dict per figure (`fig3`, `figB1`, `fig4`, `fig5`), `theory`
      (log-odds, peaks of the drawn contexts), `setup` and `seconds`.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if not alpha_step > 0:
        raise ValueError(f"alpha_step must be positive, got {alpha_step!r}")
    reach = max(token_alpha, concept_alpha, ce_wide)
    n_main = int(round(2 * reach / alpha_step)) + 1
    main_alphas = np.linspace(-reach, reach, n_main)
    near_alphas = np.linspace(-ce_near, ce_near, int(round(2 * ce_near / (alpha_step / 10))) + 1)
    kw = dict(target=target, negatives=negatives, dtype=dtype, ce_against=ce_against)
    main, meta = ufm_sweep(run, main_alphas, **kw)
    near, _ = ufm_sweep(run, near_alphas, **kw)
    t_sweep = time.perf_counter() - t0

    # Theory on the model's own unsteered probabilities (Lemma B.3: exact for this UFM).
    p = np.asarray(main["probs_base"], np.float64)
    P, N = main["P"], main["N"]
    M = theory.log_odds(p, P, N)
    peaks = token_peaks(p, M, tie_rtol)
    concept_of = np.asarray(main["concept_of"])
    pi = np.asarray(main["weights"], np.float64)
    q = np.asarray(main["p_data"], np.float64) if ce_against == "data" else None
    dp_theory = theory.steered_probs(p, M, main_alphas)[:, :, main["tokens"]] - p[None][:, :, main["tokens"]]
    tanh = theory.tanh_representation(p, M, concept_of, main_alphas)
    c = theory.ce_curvature(p, M, pi)
    dce_near = theory.delta_ce(p, M, near_alphas, pi, q)
    dce_wide = theory.delta_ce(p, M, main_alphas, pi, q)
    t_theory = time.perf_counter() - t0 - t_sweep

    if contexts is None:
        contexts = default_contexts(run.data, P, N, target)
    contexts = [int(j) for j in contexts]
    subtitle = describe(run, main, target, negatives, meta["dtype"])
    files, result = {}, {}

    def emit(key, fig_numbers):
        fig, numbers = fig_numbers
        files[key] = str(plots.save_figure(fig, out_dir / FIGURE_FILES[key], dpi=dpi))
        result[key] = numbers

    emit("fig3", plots.fig_token_bumps(main, peaks, target=target, contexts=contexts, sign=1,
                                       alpha_max=token_alpha, delta_p_theory_AxMxK=dp_theory,
                                       subtitle=subtitle))
    emit("figB1", plots.fig_token_bumps(main, peaks, target=target, contexts=contexts, sign=-1,
                                        alpha_max=token_alpha, delta_p_theory_AxMxK=dp_theory,
                                       subtitle=subtitle))
    emit("fig4", plots.fig_concept_curves(main, tanh, target=target, contexts=contexts,
                                          alpha_max=concept_alpha, subtitle=subtitle))
    sel = np.abs(main_alphas) <= ce_wide + 1e-9
    wide = {"alphas": main_alphas[sel], "delta_ce": np.asarray(main["delta_ce"])[sel]}
    emit("fig5", plots.fig_delta_ce(near, wide, c, delta_ce_theory_near=dce_near,
                                    delta_ce_theory_wide=dce_wide[sel], subtitle=subtitle + f", ΔCE against the {ce_against}"))

    is_max, is_min = theory.extremal_tokens(M, rtol=tie_rtol)
    result.update(
        files=files,
        figures=list(files.values()),
        theory={"log_odds": M, "M_max_tokens": np.flatnonzero(is_max), "M_min_tokens": np.flatnonzero(is_min),
                "peaks_of_contexts_shown": {str(j): peaks[j] for j in contexts},
                "tie_rtol": tie_rtol},
        setup={"run": str(run.path), "target": int(target), "negatives": negatives, "P": P, "N": N,
               "ce_against": ce_against, "dtype": meta["dtype"], "contexts": contexts,
               "main_grid": [float(main_alphas[0]), float(main_alphas[-1]), int(main_alphas.size)],
               "near_grid": [float(near_alphas[0]), float(near_alphas[-1]), int(near_alphas.size)],
               "data": run.config.get("data"), "train_metrics": run.metrics},
        seconds={"sweeps": t_sweep, "theory": t_theory, "total": time.perf_counter() - t0},
    )
    return result


def check_summary(result: dict, float64: bool) -> dict[str, bool]:
    """Pass/fail of every number ufm_figures checked, at tolerances fit for the dtype.

    Float32 tolerances allow the kernel's rounding (about 1e-7 relative per quantity);
    float64 ones are what the closed forms promise (docs/theory.md) up to rounding.
    """
    f3, fb, f4, f5 = result["fig3"], result["figB1"], result["fig4"], result["fig5"]
    tight = 1e-9 if float64 else 1e-5
    return {
        "fig3_off_target_peaks_before_target_peaks": f3["off_target_before_target"] is not False
        and fb["off_target_before_target"] is not False,
        "fig3_bumps_rise_then_fall": f3["slope_sign_violations"] == 0 and fb["slope_sign_violations"] == 0,
        "fig3_kernel_equals_lemma_b3": max(f3["max_abs_err_vs_lemma_b3"], fb["max_abs_err_vs_lemma_b3"]) < tight,
        # Interpolating the slope's zero between grid points costs O(h^3): judge against h.
        "fig3_kernel_peaks_at_theory_peaks": max(f3["kernel_peak_max_err"], fb["kernel_peak_max_err"])
        < PEAK_RTOL_OF_STEP * f3["grid_step"],
        "fig4_kernel_equals_tanh_form": f4["max_abs_err_vs_tanh"] < tight,
        "fig4_target_concept_increasing": bool(f4.get("target_increasing", True)),
        "fig5_kernel_curvature_equals_theory": f5.get("kernel_curvature_rel_err", 0.0) < tight,
        "fig5_kernel_equals_theory": f5["max_abs_err_vs_theory_near"] < tight
        and f5["max_abs_err_vs_theory_wide"] < tight * max(1.0, f5["max_delta_ce"]),
        "fig5_quadratic_within_10pct_near_0": (f5["max_rel_err_quadratic_within_0.1"] or 0.0) < DEPARTURE_NEAR,
    }


def train_or_load(out, data_config: DataConfig, *, progress: bool = False):
    """Train a UFM run at `out` on `data_config`, or reuse it if it is finished; load it."""
    train_ufm_run(out, data_config, progress=progress)
    return load_run(out)