"""`ufmjax reproduce`: train, sweep, check every law of docs/theory.md, optimise alpha, report.

Each section trains (or reuses) its runs, measures one number per law and compares it with a
threshold; `report.md` lists, for each law, what was measured, the number and pass/fail, with
the figures inline. Sections are independent: one that fails is reported, the others still run.

Progress (`ufmjax.runs.progress`): one bar over the sections, one per section whose text names
the step running (a training, a law check, a sweep, a figure), and the trainings' own bars;
nothing at all with progress=False.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ufmjax import theory
from ufmjax.analysis import find_peaks, summarize_sweep
from ufmjax.common import log_softmax64
from ufmjax.data import dirichlet_config, reference_config
from ufmjax.kernel import sweep
from ufmjax.models.gpt import steered_closure, steered_logits_full
from ufmjax.optimize import Objective, bisect_budget, grid_search, optimize
from ufmjax.report.figures import check_summary, ufm_figures
from ufmjax.report.gpt_figures import fig_a4, landscape
from ufmjax.runs import io, load_gpt_run, load_run, scaled_sweep, text_run, train_gpt_run, train_ufm_run, versions
from ufmjax.runs.folders import check_run_out, clear_run_dirs
from ufmjax.runs.progress import Progress


@dataclass
class Law:
    """One checked statement: what was measured, the number, the bar it had to clear."""

    section: str
    law: str
    measured: str
    value: float
    threshold: str
    passed: bool


@dataclass
class Section:
    title: str
    laws: list[Law] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def check(self, law: str, measured: str, value, threshold: str, passed: bool) -> None:
        self.laws.append(Law(self.title, law, measured, float(value), threshold, bool(passed)))


def _own_probs64(model) -> np.ndarray:
    """The UFM's own unsteered probabilities, from its parameters in float64."""
    return np.exp(log_softmax64((np.asarray(model.W[...], np.float64) @ np.asarray(model.H[...], np.float64)).T))


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300))


def ufm_section(out: Path, quick: bool, progress: bool) -> Section:
    """Every UFM law of docs/theory.md, on the reference point and on a non-uniform dataset."""
    sec = Section("UFM (Sec. 3)")
    # 2 trainings, 4 law checks (2 runs x 2 kinds of negatives), 2 figure sets.
    with Progress(8, sec.title, enabled=progress) as bar:
        return _ufm_laws(sec, out, quick, progress, bar)


def _ufm_laws(sec: Section, out: Path, quick: bool, progress: bool, bar: Progress) -> Section:
    """ufm_section's work, each step named beside the section's progress bar."""
    bar.update(0, step="training the reference UFM")
    ref_metrics = train_ufm_run(out / "runs" / "ufm_ref", reference_config(), progress=progress)
    sec.check("Def. 2.2 / Assumption 2: the UFM reaches the data entropy",
              "CE - entropy on V=9, G=3, eps=0.05 (nats)", ref_metrics["gap"], "< 1e-4",
              0 <= ref_metrics["gap"] < 1e-4)
    sec.check("Reference entropy (paper: 1.33178; its UFM reaches about 1.3318)",
              "entropy of p(.|c) (nats)", ref_metrics["entropy"], "= 1.33178 +- 5e-6",
              abs(ref_metrics["entropy"] - 1.33178) < 5e-6)
    sec.notes.append(f"reference UFM: final CE {ref_metrics['final_ce']:.7f} nats, entropy "
                     f"{ref_metrics['entropy']:.7f} nats, trained in {ref_metrics['seconds']:.1f} s")
    bar.update(1, step="training the Dirichlet-profile UFM")
    train_ufm_run(out / "runs" / "ufm_profiled", dirichlet_config(), progress=progress)
    runs = {"reference": load_run(out / "runs" / "ufm_ref"), "profiled": load_run(out / "runs" / "ufm_profiled")}
    bar.update(1)

    alphas = np.linspace(-60, 60, 241 if quick else 1025)
    worst = {k: 0.0 for k in ("b3", "b5", "b5_2", "eq12", "tanh", "ce1", "ce2", "peaks", "limits")}
    separated = order_ok = monotone_ok = target_up = returns_ok = True
    returns_err, n_peaks, n_bumps, curv_err, quad_err, n_returning = 0.0, 0, 0, 0.0, 0.0, 0
    with jax.enable_x64(True):
        for name, run in runs.items():
            data = run.data
            for negatives in ("contrastive", "random"):
                bar.update(0, step=f"laws: {name} UFM, {negatives} N")
                target = 0
                st = run.steer(target, negatives, seed=1, dtype=jnp.float64)
                P, N, steered = st.P, st.N, st.steered
                res = sweep(steered, alphas, concept_of=data.concept_of, ce_target=data.p_MxV,
                            weights=data.pi, dtype=jnp.float64)
                p0 = _own_probs64(run.model)
                M = theory.log_odds(p0, P, N)
                in_t = data.concept_of == target
                # Lemma B.4 is a statement on the data (Assumption 1), so it is checked on the table.
                separated &= bool(np.all((theory.log_odds(data.p_MxV, P, N) > 0) == in_t))
                probs = res["probs_base"][None] + res["delta_p"]
                worst["b3"] = max(worst["b3"], float(np.abs(probs - theory.steered_probs(p0, M, alphas)).max()))
                worst["b5"] = max(worst["b5"], _rel(res["d_delta_p"], theory.token_derivative(p0, M, alphas)))
                worst["b5_2"] = max(worst["b5_2"], _rel(res["d2_delta_p"],
                                                        theory.token_second_derivative(p0, M, alphas)))
                worst["eq12"] = max(worst["eq12"], _rel(res["d_delta_p_concept"],
                                                        theory.concept_derivative(p0, M, data.concept_of, alphas)))
                tanh = theory.tanh_representation(p0, M, data.concept_of, alphas)
                worst["tanh"] = max(worst["tanh"], float(np.abs(res["delta_p_concept"] - tanh).max()))
                d1, d2 = theory.delta_ce_derivatives(p0, M, alphas, data.pi, data.p_MxV)
                worst["ce1"] = max(worst["ce1"], _rel(res["d_delta_ce"], d1))
                worst["ce2"] = max(worst["ce2"], _rel(res["d2_delta_ce"], d2))
                target_up &= bool(np.all(res["d_delta_p_concept"][:, :, target] >= -1e-12))
                # Token bumps: kernel peaks (Newton on its own derivative) vs the closed form.
                want = theory.peak_strengths(p0, M)
                got = find_peaks(steered, np.linspace(-200, 200, 401), concept_of=data.concept_of,
                                 dtype=jnp.float64)
                is_max, is_min = theory.extremal_tokens(M)
                inner = np.isfinite(want) & (np.abs(want) < 200)
                n_peaks += int(inner.sum())
                n_bumps += int(np.isfinite(got[inner]).sum())
                if inner.any():
                    worst["peaks"] = max(worst["peaks"], float(np.nanmax(np.abs(got[inner] - want[inner]))))
                tgt, off = want[:, in_t & ~is_max], want[:, ~in_t & ~is_min]
                if tgt.size and off.size:
                    order_ok &= bool(np.all(off.max(axis=1) < tgt.min(axis=1)))
                monotone_ok &= bool(np.all(res["d_delta_p"][:, :, is_max] >= 0)
                                    and np.all(res["d_delta_p"][:, :, is_min] <= 0))
                if name == "profiled":
                    # Prop. B.1 and the returning concepts of Thm 3.6 are limits: they need
                    # alpha * (gap of M below its max / above its min) >> 1. On the reference
                    # point, training noise (1e-6) is what breaks the ties of M, so only the
                    # profiled dataset (distinct log-odds) is checked here.
                    Ms = np.sort(M)
                    gap = min(Ms[-1] - Ms[Ms < Ms[-1]].max(), Ms[Ms > Ms[0]].min() - Ms[0])
                    a_far = max(1e4, 60.0 / gap)
                    far = sweep(steered, [-a_far, a_far], concept_of=data.concept_of, dtype=jnp.float64,
                                derivatives=0)
                    plus, minus = theory.limits(p0, M)
                    far_p = far["probs_base"][None] + far["delta_p"]
                    worst["limits"] = max(worst["limits"], float(np.abs(far_p[1] - plus).max()),
                                          float(np.abs(far_p[0] - minus).max()))
                    sizes = np.bincount(data.concept_of)
                    for g in range(data.num_concepts):
                        members = data.concept_of == g
                        if not np.any(members & (is_max | is_min)):
                            want_end = -p0[:, members].sum(axis=1) / sizes[g]
                            err = float(np.abs(far["delta_p_concept"][:, :, g] - want_end[None]).max())
                            returns_err = max(returns_err, err)
                            returns_ok &= err < 1e-6
                            n_returning += 1
                # Thm 3.8: curvature at 0 and the local quadratic law (CE against the model).
                at0 = sweep(steered, [0.0, 1e-2], concept_of=data.concept_of, weights=data.pi, dtype=jnp.float64)
                c = theory.ce_curvature(p0, M, data.pi)
                curv_err = max(curv_err, abs(at0["d2_delta_ce"][0] - c) / c)
                quad_err = max(quad_err, abs(at0["delta_ce"][1] - 0.5 * c * 1e-4) / (0.5 * c * 1e-4))
                bar.update(1)

    sec.check("Lemma B.4: sign separation", "M(z) > 0 exactly on the target concept (4 cases)",
              float(separated), "= 1", separated)
    sec.check("Lemma B.3: steered probabilities", "max |kernel - closed form| on alpha in [-60, 60]",
              worst["b3"], "< 1e-6", worst["b3"] < 1e-6)
    sec.check("Lemma B.5: token derivative", "max relative |kernel d/dalpha - closed form|",
              worst["b5"], "< 1e-6", worst["b5"] < 1e-6)
    sec.check("Lemma B.5 (derivative): second derivative", "max relative error of d2/dalpha2",
              worst["b5_2"], "< 1e-6", worst["b5_2"] < 1e-6)
    sec.check("Thm 3.3: bumps", "share of non-extremal tokens whose bump the kernel finds",
              n_bumps / max(n_peaks, 1), "= 1", n_peaks > 0 and n_bumps == n_peaks)
    sec.check("Thm 3.3: peak strengths", "max |kernel peak - root of E_alpha[M] = M(z)|",
              worst["peaks"], "< 1e-5", worst["peaks"] < 1e-5)
    sec.check("Thm 3.3: peak order", "every off-target peak precedes every target peak",
              float(order_ok), "= 1", order_ok)
    sec.check("Thm 3.3: monotone extremes", "M_max tokens rise and M_min tokens fall on the whole grid",
              float(monotone_ok), "= 1", monotone_ok)
    sec.check("Prop. B.1: limits", "max |p_alpha - limit| at alpha = +-max(1e4, 60/gap of M)", worst["limits"], "< 1e-6",
              worst["limits"] < 1e-6)
    sec.check("Eq. 12: concept derivative", "max relative |kernel - F(1-F)(mu_C - mu_notC)/|C||",
              worst["eq12"], "< 1e-6", worst["eq12"] < 1e-6)
    sec.check("Thm 3.6: tanh representation", "max |kernel delta_p_concept - tanh form|", worst["tanh"],
              "< 1e-6", worst["tanh"] < 1e-6)
    sec.check("Thm 3.6: target concept rises", "d delta_p(T)/d alpha >= 0 everywhere", float(target_up),
              "= 1", target_up)
    sec.check("Thm 3.6: non-extremal concepts return",
              f"max |delta_p(C, +-alpha_far) + F_C(0)/|C|| over {n_returning} such concepts",
              returns_err, "< 1e-6", returns_ok and n_returning > 0)
    sec.check("Thm 3.8: CE slope", "max relative |kernel dCE/dalpha - sum_j pi_j (E_alpha[M] - E_q[M])|",
              worst["ce1"], "< 1e-6", worst["ce1"] < 1e-6)
    sec.check("Thm 3.8: CE curvature", "max relative |kernel dCE2/dalpha2 - sum_j pi_j Var_alpha(M)|",
              worst["ce2"], "< 1e-6", worst["ce2"] < 1e-6)
    sec.check("Thm 3.8: curvature at 0", "relative |dCE''(0) - sum_j pi_j Var_j(M)|", curv_err, "< 1e-9",
              curv_err < 1e-9)
    sec.check("Thm 3.8: local quadratic law", "relative |dCE(0.01) - c/2 * 0.01^2|", quad_err, "< 1e-2",
              quad_err < 1e-2)

    # Figs. 3, B.1, 4, 5, and the numbers each figure checks (float32, as a user runs it).
    for name in ("reference", "profiled"):
        bar.update(0, step=f"figures: {name} UFM")
        info = ufm_figures(runs[name], out / "figures" / f"ufm_{name}", target=0)
        bar.update(1)
        sec.figures += [str(Path(p).relative_to(out)) for p in info["figures"]]
        checks = check_summary(info, float64=False)
        failed = [k for k, ok in checks.items() if not ok]
        sec.check(f"Figs. 3, B.1, 4, 5 ({name} UFM): the numbers each figure checks",
                  f"checks failed of {len(checks)}: " + (", ".join(failed) if failed else "none"), len(failed),
                  "= 0", not failed)
    return sec


def optimize_section(out: Path, quick: bool, progress: bool) -> Section:
    """The best alpha by Newton on the kernel's derivatives, against a dense grid and bisection."""
    sec = Section("Optimal steering strength (Sec. 7 of docs/theory.md)")
    with Progress(3, sec.title, enabled=progress) as bar:
        return _optimize_laws(sec, out, quick, progress, bar)


def _optimize_laws(sec: Section, out: Path, quick: bool, progress: bool, bar: Progress) -> Section:
    """optimize_section's work, each step named beside the section's progress bar."""
    train_ufm_run(out / "runs" / "ufm_ref", reference_config(), progress=progress)
    run = load_run(out / "runs" / "ufm_ref")
    grid = np.linspace(-5, 5, 2001 if quick else 20001)
    spacing = grid[1] - grid[0]
    bar.update(0, step=f"penalised vs a {grid.size}-point grid")
    with jax.enable_x64(True):
        steering = run.steer(0, dtype=jnp.float64)
        problem = steering.problem()
        pen = Objective("penalised", lam=0.1)
        res = optimize(problem, pen)
        best = grid_search(problem, pen, grid)
        sec.check("Penalised optimum = dense grid", f"|alpha* - grid argmax| ({grid.size}-point grid, spacing "
                  f"{spacing:.1e})", abs(res.alpha - best["alpha"]), f"<= {spacing:.1e}",
                  res.converged and abs(res.alpha - best["alpha"]) <= spacing)
        sec.check("Penalised optimum: objective", "grid best - optimum objective", best["objective"] - res.objective,
                  "<= 1e-6", best["objective"] - res.objective <= 1e-6)
        sec.check("Penalised optimum: evaluations", "grid evaluations / optimiser evaluations",
                  best["evaluations"] / res.evaluations, ">= 20", best["evaluations"] >= 20 * res.evaluations)
        # First-order condition with the closed forms: d dp/d alpha = lam * d dCE/d alpha.
        p0 = _own_probs64(run.model)
        M = theory.log_odds(p0, steering.P, steering.N)
        a = np.asarray([res.alpha])
        ddp = float(run.data.pi @ theory.concept_derivative(p0, M, run.data.concept_of, a)[0, :, 0])
        dce = float(theory.delta_ce_derivatives(p0, M, a, run.data.pi, run.data.p_MxV)[0][0])
        foc = abs(ddp - 0.1 * dce)
        sec.check("First-order condition (closed forms of Thm 3.6, 3.8)", "|d dp/d alpha - lam d dCE/d alpha|",
                  foc, "< 1e-8", foc < 1e-8)
        budget = 0.05
        bar.update(1, step="budget vs bisection")
        bud = optimize(problem, Objective("budget", budget=budget))
        bis = bisect_budget(problem, budget)
        sec.check("Budget binds: optimum on the budget", "|dCE(alpha) - budget|", abs(bud.delta_ce - budget),
                  "< 1e-6", bud.converged and abs(bud.delta_ce - budget) < 1e-6)
        sec.check("Budget: bisection finds the same alpha", "|alpha - bisection alpha|",
                  abs(bud.alpha - bis["alpha"]), "< 1e-6", abs(bud.alpha - bis["alpha"]) < 1e-6)
        loose = optimize(problem, Objective("budget", lam=0.1, budget=10.0))
        sec.check("Budget that does not bind = penalised optimum", "|alpha_budget - alpha_penalised|",
                  abs(loose.alpha - res.alpha), "< 1e-6", abs(loose.alpha - res.alpha) < 1e-6)
        bar.update(1, step="prompt-adaptive alphas")
        adaptive = optimize(problem, pen, per_context=True)
        sec.check("Prompt-adaptive alpha never loses", "per-context objective - best shared objective",
                  adaptive.objective - res.objective, ">= -1e-9", adaptive.objective >= res.objective - 1e-9)
        bar.update(1)
    sec.notes.append(f"penalised (lam=0.1): alpha* = {res.alpha:.6f} in {res.evaluations} evaluations "
                     f"({res.iterations} iterations); the {grid.size}-point grid needed {best['evaluations']}")
    sec.notes.append(f"budget dCE <= {budget}: alpha = {bud.alpha:.6f} ({bud.evaluations} evaluations; "
                     f"bisection {bis['evaluations']})")
    sec.notes.append(f"prompt-adaptive alphas {np.round(np.asarray(adaptive.alpha), 3).tolist()} gain "
                     f"{100 * (adaptive.objective / res.objective - 1):.1f}% over the shared alpha")
    return sec


def _gpt_sweep_laws(sec: Section, run, layer: int, target, name: str, quick: bool, bar: Progress) -> dict:
    """Sec. 4's checks on one GPT sweep: prefix cache, concept sigmoid, local quadratic ΔCE,
    plateau and Prop. 4.1's limit; two steps of `bar`. Returns (arrays, summary)."""
    bar.update(0, step="prefix cache vs full forward")
    probe = np.asarray([-30.0, -1.0, 0.0, 0.5, 8.0])
    gap = 0.0
    st = run.steer(target, layer=layer)
    t, prompts = st.target, st.arrays["prompts"][:16]
    for positions in ("all", "last"):
        fn, params = steered_closure(run.model, prompts, st.vector, layer, positions)
        cached = np.stack([np.asarray(fn(params, jnp.float32(a))) for a in probe])
        full = np.asarray(steered_logits_full(run.model, prompts, st.vector, layer, probe, positions))[:, :, -1]
        gap = max(gap, float(np.abs(cached - full).max()))
    sec.check(f"{name}: prefix-cached sweep = full forward with alpha in the batch",
              "max |logits| difference, all and last positions", gap, "< 1e-5", gap < 1e-5)
    num = 201 if quick else 401
    bar.update(1, step=f"sweep, {num} alphas")
    arrays, meta, s = scaled_sweep(run, layer, target, num=num, presence=not quick)
    bar.update(1)
    F = arrays["concept_prob"][:, :, t] @ arrays["weights"]
    rise = float(F[-1] - F[np.argmin(np.abs(arrays["alphas"]))])
    sec.check(f"{name}: steering raises the target concept (Thm 3.6)", "F_T(alpha_max) - F_T(0)", rise,
              "> 0.3", rise > 0.3)
    sec.check(f"{name}: concept probability is a sigmoid (Thm 3.6)", "R^2 of a + b tanh((alpha - c)/d)",
              s["tanh_r2"], "> 0.9", s["tanh_r2"] > 0.9)
    sec.check(f"{name}: ΔCE locally quadratic (Thm 3.8)",
              f"R^2 of b alpha + k alpha^2 on |alpha| <= {s['quad_window']:.3g}", s["quad_r2"], "> 0.95",
              s["quad_r2"] > 0.95)
    sec.check(f"{name}: ΔCE plateaus at large |alpha| (Prop. 4.1)",
              "|ΔCE'| at the grid ends / its largest value", s["plateau_slope"], "< 0.05", s["plateau_slope"] < 0.05)
    d = arrays["limit_distance"]
    pos = arrays["alphas"] > 0
    shrinks = bool(np.all(np.diff(d[pos][len(d[pos]) // 2:]) <= 1e-6))
    sec.check(f"{name}: logits approach LN(±v) W^T (Prop. 4.1)",
              "max |y(alpha) - LN(±v) W^T| at alpha = ±1e4 (and shrinking along the grid)",
              s["limit_distance_1e4"], "< 2e-2, decreasing", shrinks and s["limit_distance_1e4"] < 2e-2)
    lo, hi = s["local_ufm_range"]
    sec.notes.append(f"{name} (layer {layer}): share of top tokens with a bump {s['bump_share']:.2f}, "
                     f"off-target peaks first in {s['precede']:.2f} of rows; local UFM law "
                     f"(KL < 0.01 nats) holds for alpha in [{lo:.3g}, {hi:.3g}]")
    return arrays, s


def gpt_concept_section(out: Path, quick: bool, progress: bool) -> Section:
    """A small GPT trained on the reference concept data, steered through the shared kernel."""
    sec = Section("GPT on concept data (Sec. 4)")
    with Progress(4, sec.title, enabled=progress) as bar:
        bar.update(0, step="training the concept GPT")
        m = train_gpt_run(out / "runs" / "gpt_concept", "concept", data_config=reference_config(),
                          progress=progress)
        bar.update(1)
        _gpt_concept_laws(sec, out, m, quick, bar)
    return sec


def _gpt_concept_laws(sec: Section, out: Path, m: dict, quick: bool, bar: Progress) -> None:
    """gpt_concept_section's checks of the trained run (metrics `m`)."""
    sec.check("GPT reaches the entropy bound on V=9, G=3, eps=0.05", "next-token CE - entropy (nats)",
              m["gap"], "< 0.01", 0 <= m["gap"] + 1e-9 and m["gap"] < 0.01)
    run = load_gpt_run(out / "runs" / "gpt_concept")
    _gpt_sweep_laws(sec, run, run.model.config.layers, 0, "concept GPT", quick, bar)
    bar.update(0, step="two vectors: 2-D landscape")
    fig = out / "figures" / "gpt_landscape.png"
    s = landscape(run, fig, targets=(0, 1), num=41 if quick else 61)
    sec.figures.append(str(fig.relative_to(out)))
    sec.check("concept GPT, two vectors (targets 0 and 1): Newton over alpha in R^2 reaches the optimum",
              f"Newton's objective - the best of a {s['grid_points']}-point grid (dp - 0.1 ΔCE)",
              s["objective_2d"] - s["grid_best"], ">= 0, converged", s["converged"] and s["objective_2d"] >= s["grid_best"] - 1e-9)
    sec.notes.append(f"two vectors: 2-D optimum alpha = ({s['alpha_2d'][0]:.3g}, {s['alpha_2d'][1]:.3g}) in "
                     f"{s['newton_steps']} Newton steps ({s['evaluations']} evaluations); each vector alone: "
                     f"{s['alpha_1d'][0]:.3g}, {s['alpha_1d'][1]:.3g}")
    bar.update(1)


def gpt_text_section(out: Path, quick: bool, progress: bool) -> Section:
    """A GPT trained on Python's bundled docs, steered toward uppercase (the paper's Fig. A.4)."""
    sec = Section("GPT on text, 'uppercase' (Fig. A.4)")
    with Progress(4, sec.title, enabled=progress) as bar:
        bar.update(0, step="training the text GPT")
        run = text_run(out / "runs", 1, steps=600 if quick else None, progress=progress)
        bar.update(1)
        _gpt_text_laws(sec, out, run, quick, bar)
    return sec


def _gpt_text_laws(sec: Section, out: Path, run, quick: bool, bar: Progress) -> None:
    """gpt_text_section's checks of the trained run, and Fig. A.4."""
    m = run.metrics
    sec.check("GPT beats the bigram baseline on held-out text", "bigram - GPT validation loss (nats/char)",
              m["bigram_val_loss"] - m["val_loss"], "> 0.1", m["bigram_val_loss"] - m["val_loss"] > 0.1)
    sec.notes.append(f"validation loss {m['val_loss']:.3f} nats/char, bigram {m['bigram_val_loss']:.3f}, "
                     f"unigram {m['unigram_val_loss']:.3f}")
    layer = run.model.config.layers
    arrays, s = _gpt_sweep_laws(sec, run, layer, "uppercase", "text GPT", quick, bar)
    bar.update(0, step="Fig. A.4")
    path = fig_a4(run, arrays, s, out / "figures" / "gpt_fig_a4.png", layer=layer, positions="all")
    sec.figures.append(str(path.relative_to(out)))
    bar.update(1)


SECTIONS = [ufm_section, optimize_section, gpt_concept_section, gpt_text_section]
# The folders under OUT/runs/ the sections train into (the text GPT's: `text_run`'s name).
RUN_NAMES = ("ufm_ref", "ufm_profiled", "gpt_concept", "text_L1")


# The definitions and laws the report checks, in this checkout (absent from an installed wheel).
THEORY = Path(__file__).resolve().parents[2] / "docs" / "theory.md"


def _theory_ref(out: Path | None) -> str:
    """docs/theory.md, as a link relative to the report where this checkout has the file."""
    if out is not None and THEORY.is_file():
        return f"[docs/theory.md]({Path(os.path.relpath(THEORY, Path(out).resolve())).as_posix()})"
    return "docs/theory.md of the ufmjax repository"


def _markdown(sections: list[Section], quick: bool, seconds: float, out: Path | None = None) -> str:
    """report.md: the summary line, versions, then per section its law table, notes, figures."""
    laws = [law for s in sections for law in s.laws]
    failed = [law for law in laws if not law.passed] + [s for s in sections if s.error]
    lines = [
        "# ufmjax reproduce report", "",
        f"Laws of \"Towards Understanding Steering Strength\" (Taimeskhanov, Vaiter, Garreau 2026, "
        f"arXiv 2602.02712; restated in {_theory_ref(out)}) checked "
        f"{'in quick mode ' if quick else ''}in {seconds:.0f} s: "
        f"**{sum(law.passed for law in laws)} of {len(laws)} pass**"
        + ("" if not failed else f", {len(failed)} fail") + ".", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", "",
    ]
    for s in sections:
        lines += [f"## {s.title}", "", f"({s.seconds:.1f} s)", ""]
        if s.error:
            lines += ["**Section failed:**", "", "```", s.error.strip(), "```", ""]
        if s.laws:
            lines += ["| law | measured | value | threshold | result |", "|---|---|---|---|---|"]
            for law in s.laws:
                cells = [law.law, law.measured, f"{law.value:.6g}", law.threshold]
                # A literal | (as in |x - y|) would split a markdown table cell.
                cells = [c.replace("|", "\\|") for c in cells]
                lines.append("| " + " | ".join(cells) + f" | {'pass' if law.passed else '**FAIL**'} |")
            lines.append("")
        lines += [f"- {n}" for n in s.notes] + ([""] if s.notes else [])
        lines += [f"![{Path(f).stem}]({f})" for f in s.figures] + ([""] if s.figures else [])
    return "\n".join(lines) + "\n"


def _section_done(sec: Section, t0: float, done: list, bar, progress: bool, verb: str) -> None:
    """Time a finished (or failed) section from `t0`, keep it, and say how many laws `verb`
    (pass on the paper's models, hold on a user's model) on the bar and, with progress, a line."""
    sec.seconds = time.perf_counter() - t0
    done.append(sec)
    n_ok = sum(law.passed for law in sec.laws)
    bar.update(1, last=f"{sec.title}: {n_ok}/{len(sec.laws)} {verb}")
    if progress:
        print(f"[reproduce] {sec.title}: {n_ok}/{len(sec.laws)} laws {verb}"
              + (" (section failed)" if sec.error else "") + f" in {sec.seconds:.1f}s", flush=True)


def reproduce(out, *, quick: bool = False, force: bool = False, progress: bool = True,
              sections=None) -> dict:
    """Run every section into `out`; write report.md and report.json. Returns the summary dict."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a folder")
    # The run folders the sections train into: one that is not a ufmjax run (a user's folder
    # of that name) is refused here, by name, before anything is removed or trained.
    for name in RUN_NAMES:
        check_run_out(out / "runs" / name, force)
    if force:  # only ufmjax's own run folders, and in them only what ufmjax wrote
        clear_run_dirs(out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    done: list[Section] = []
    t0 = time.perf_counter()
    fns = list(sections or SECTIONS)
    # One bar over the sections; each section adds its own bar (its steps) and trainings theirs.
    with Progress(len(fns), "reproduce", enabled=progress) as bar:
        for fn in fns:
            t = time.perf_counter()
            try:
                sec = fn(out, quick, progress)
            except Exception:  # noqa: BLE001 - a failing section is reported, the others still run
                sec = Section(fn.__name__.replace("_section", ""), error=traceback.format_exc(limit=4))
            _section_done(sec, t, done, bar, progress, "pass")
    seconds = time.perf_counter() - t0
    io.write_bytes_atomic(out / "report.md", _markdown(done, quick, seconds, out=out).encode())
    laws = [asdict(law) for s in done for law in s.laws]
    summary = {"quick": quick, "seconds": seconds, "laws": laws,
               "passed": sum(law["passed"] for law in laws), "total": len(laws),
               "failed_sections": [s.title for s in done if s.error],
               "all_passed": all(law["passed"] for law in laws) and not any(s.error for s in done)}
    io.write_json_atomic(out / "report.json", summary)
    return summary


# ---------------------------------------------------------------- Sec. 4 on the user's own model

HF_PROBE = np.asarray([-8.0, -1.0, 0.0, 0.5, 4.0])  # in units of median |h| / |v|


def default_hf_layers(num_layers: int) -> list[int]:
    """Early, middle and last cut points: max(1, L // 4), ceil(L / 2), L (duplicates merged)."""
    return sorted({max(1, num_layers // 4), -(-num_layers // 2), num_layers})


def hf_layer_section(out: Path, run, inputs, layer: int, quick: bool, ce_text: str,
                     st=None, progress: bool = False) -> tuple[Section, dict]:
    """Sec. 4's checks on one layer of a pretrained model; its figure. Returns (section, result)."""
    sec = Section(f"layer {layer} of {run.spec.layers}")
    with Progress(3, sec.title, enabled=progress) as bar:
        return _hf_layer_laws(sec, out, run, inputs, layer, quick, ce_text, st, bar)


def _hf_layer_laws(sec: Section, out: Path, run, inputs, layer: int, quick: bool, ce_text: str, st,
                   bar: Progress) -> tuple[Section, dict]:
    """hf_layer_section's work, each step named beside the layer's progress bar."""
    from ufmjax.models.hf import steered_closure as hf_closure
    from ufmjax.models.hf import steered_logits_full as hf_full
    from ufmjax.report.hf_figures import hf_layer_figure
    from ufmjax.runs.hf import hf_scaled_grid, hf_sweep, steer_inputs

    bar.update(0, step="prefix cache vs full forward")
    st = steer_inputs(run, inputs, layer=layer) if st is None else st
    alphas = hf_scaled_grid(run, st, num=121 if quick else 401)
    scale = float(np.abs(alphas).max() / 50.0)  # alpha of alpha |v| = median |h|
    rows = [r[r >= 0] for r in st.arrays["prompts"]][:8]
    gap, size = 0.0, 0.0
    for positions in ("all", "last"):
        fn, params = hf_closure(run.model, rows, st.vector, layer, positions)
        cached = np.stack([np.asarray(fn(params, jnp.float32(a))) for a in HF_PROBE * scale])
        full = hf_full(run.model, rows, st.vector, layer, HF_PROBE * scale, positions)
        gap, size = max(gap, float(np.abs(cached - full).max())), max(size, float(np.abs(full).max()))
    sec.check("prefix- and key/value-cached steering = full forward pass per alpha",
              "max |logits difference| / max |logits|, all and last positions", gap / size, "< 1e-5",
              gap / size < 1e-5)
    bar.update(1, step=f"sweep, {alphas.size} alphas")
    arrays, meta = hf_sweep(run, st, alphas, ce_text=ce_text)
    s = summarize_sweep(arrays, 1)
    bar.update(1, step="figure, sweep file")
    F = arrays["concept_prob"][:, :, 1] @ arrays["weights"]
    rise = float(F[-1] - F[np.argmin(np.abs(alphas))])
    sec.check("steering raises the concept (Thm 3.6)", "P(C | alpha_max) - P(C | 0)", rise, "> 0", rise > 0)
    sec.check("concept probability is a sigmoid (Thm 3.6)", "R^2 of a + b tanh((alpha - c)/d)", s["tanh_r2"],
              "> 0.9", s["tanh_r2"] > 0.9)
    sec.check("ΔCE locally quadratic (Thm 3.8)", f"R^2 of b alpha + k alpha^2 on |alpha| <= {s['quad_window']:.3g}",
              s["quad_r2"], "> 0.95", s["quad_r2"] > 0.95)
    sec.check("ΔCE plateaus at large |alpha| (Prop. 4.1)", "|ΔCE'| at the grid ends / its largest value",
              s["plateau_slope"], "< 0.05", s["plateau_slope"] < 0.05)
    rel = s["limit_distance_1e4"] / max(float(np.abs(arrays["limit_logits"]).max()), 1e-30)
    sec.check("logits approach their limit norm(±v) W^T (Prop. 4.1)",
              "max |y(±1e4) - limit| / max |limit|", rel, "< 1e-2", rel < 1e-2)
    lo, hi = s["local_ufm_range"]
    sec.notes.append(f"top tokens with a bump (Thm 3.3): {s['bump_share']:.2f}; rows whose off-target peaks "
                     f"all precede the concept's: {s['precede']:.2f} of {s['precede_rows']}; local UFM "
                     f"(KL < 0.01 nats) holds for alpha in [{lo:.3g}, {hi:.3g}] (alpha |v| = median |h| at "
                     f"alpha = {scale:.3g}); {int(arrays['concept_mask'].sum())} concept tokens")
    path = hf_layer_figure(arrays, s, out / "figures" / f"hf_layer{layer}.png",
                           title=f"Sec. 4 on {run.spec.model_type} ({run.path.name}), steered at layer {layer} "
                                 f"of {run.spec.layers} (all positions), concept '{st.meta['target_name']}'")
    sec.figures.append(str(path.relative_to(out)))
    from ufmjax.runs import save_sweep

    save_sweep(out / "sweeps" / f"layer{layer}.npz", arrays, meta)
    bar.update(1)
    return sec, {"layer": layer, "arrays": arrays, "scale": 1.0 / scale}


def reproduce_hf(out, folder, inputs, *, layers=None, quick: bool = False, progress: bool = True,
                 weights_dtype: str | None = None, put=None) -> dict:
    """Sec. 4 of the paper on a pretrained model: per layer the law table, the Figs. 6/7-style
    figure and the sweep; report.md and report.json in `out`. Returns the summary.

    A law that does not hold on a model is a finding about that model, reported as such; only a
    section that fails to run makes `all_ran` false.
    """
    from ufmjax.models.hf.config import load_spec
    from ufmjax.report.hf_figures import hf_layers_figure
    from ufmjax.runs.hf import default_ce_text, load_hf, steer_inputs, text_windows

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    L = load_spec(folder).layers  # the layers are checked before any weight is read
    layers = default_hf_layers(L) if layers is None else list(layers)
    bad = [x for x in layers if not (isinstance(x, int) and 0 <= x <= L)]
    if bad:
        raise ValueError(f"--layers must be integers in [0, {L}], got {bad[0]!r}")
    run = load_hf(folder, weights_dtype, put)
    ce_text = inputs.ce_text if inputs.ce_text is not None else default_ce_text()
    # Every input is checked on the first layer before anything is written: a bad input is a
    # usage error (exit 2), not a layer that "failed to run".
    first = steer_inputs(run, inputs, layer=layers[0])  # reused by the first layer's section
    text_windows(run, ce_text)
    out.mkdir(parents=True, exist_ok=True)
    done, results = [], []
    t0 = time.perf_counter()
    # One bar over the layers (and the across-layer figure); each layer adds its own bar.
    with Progress(len(layers) + 1, f"reproduce {run.spec.model_type}", enabled=progress) as bar:
        for layer in layers:
            t = time.perf_counter()
            try:
                sec, res = hf_layer_section(out, run, inputs, layer, quick, ce_text,
                                            first if layer == layers[0] else None, progress=progress)
                results.append(res)
            except Exception:  # noqa: BLE001 - a failing layer is reported, the others still run
                sec = Section(f"layer {layer} of {L}", error=traceback.format_exc(limit=4))
            _section_done(sec, t, done, bar, progress, "hold")
        if results:
            bar.update(0, step="across-layer figure")
            path = hf_layers_figure(results, out / "figures" / "hf_layers.png",
                                    title=f"{run.spec.model_type} ({run.path.name}): early, middle and last layers")
            done[-1].figures.append(str(path.relative_to(out)))
        bar.update(1)
    seconds = time.perf_counter() - t0
    md = _markdown(done, quick, seconds, out=out).replace(
        "# ufmjax reproduce report", f"# ufmjax reproduce report: {run.spec.model_type} from {run.path}", 1)
    io.write_bytes_atomic(out / "report.md", md.encode())
    laws = [asdict(law) for s in done for law in s.laws]
    summary = {"model": str(run.path), "model_type": run.spec.model_type, "layers": layers, "quick": quick,
               "seconds": seconds, "laws": laws, "passed": sum(law["passed"] for law in laws), "total": len(laws),
               "failed_sections": [s.title for s in done if s.error], "all_ran": not any(s.error for s in done)}
    io.write_json_atomic(out / "report.json", summary)
    return summary
