"""Optimal steering strength by gradients in alpha, against grids and bisection.

Trains (or loads) the paper's reference UFM (V=9, G=3, eps=0.05) and (unless --no-gpt)
a small GPT on the same concept data; for each model it writes under --out:

  landscape_<model>.png    objective landscapes on a dense alpha grid (penalised, budgeted,
                           target level, and a wide view of dp and ΔCE) with every solver's
                           path and optimum drawn on them
  per_context_<model>.png  prompt-adaptive alphas (one per context) against the shared alpha
  optimize_alpha.md        tables: solvers vs dense grids vs bisection calibration to the same
                           budget (alpha, objective, evaluations, wall time); gain of
                           prompt-adaptive alpha over the best shared alpha
  optimize_alpha.json      every number of the tables

    python experiments/optimize_alpha.py [--out results/optimize] [--no-gpt] [--lam 0.1] [--budget 0.05]

Everything is float64. Wall times: "cold" includes JIT compilation (first call of a solver on
a model), "warm" is the same call again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("newton", "lbfgs", "adam", "gd")
PAPER_GRID = 1025


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/optimize", help="output folder (default results/optimize)")
    p.add_argument("--lam", type=float, default=0.1, help="penalty weight of the penalised objective")
    p.add_argument("--budget", type=float, default=0.05, help="ΔCE budget in nats")
    p.add_argument("--level", type=float, default=0.6, help="target-concept probability of the level objective")
    p.add_argument("--target", type=int, default=0, help="target concept")
    p.add_argument("--no-gpt", action="store_true", help="skip the GPT part")
    p.add_argument("--gpt-steps", type=int, default=500, help="GPT training steps (default 500, ~15 s)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- measurements

def timed(fn, *args, **kw):
    """(result, cold seconds, warm seconds): the call twice, the second one compiled already."""
    t0 = time.perf_counter()
    fn(*args, **kw)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, cold, time.perf_counter() - t0


def solver_rows(problem, objective, grid_specs, bisect: bool):
    """One table row per solver, per dense grid and (budgets) for bisection calibration."""
    from ufmjax import optimize as opt

    rows, results = [], {}
    for method in METHODS:
        res, cold, warm = timed(opt.optimize, problem, objective, method=method)
        results[method] = res
        rows.append({"solver": method, "alpha": res.alpha, "objective": res.objective,
                     "delta_ce": res.delta_ce, "kl": res.kl, "evaluations": res.evaluations,
                     "iterations": res.iterations, "converged": res.converged, "message": res.message,
                     "cold_ms": 1e3 * cold, "warm_ms": 1e3 * warm})
    for lo, hi, num in grid_specs:
        alphas = np.linspace(lo, hi, num)
        g, cold, warm = timed(opt.grid_search, problem, objective, alphas)
        rows.append({"solver": f"grid {num} on [{lo:g}, {hi:g}]", "alpha": g["alpha"], "objective": g["objective"],
                     "delta_ce": g["delta_ce"], "kl": g["kl"], "evaluations": g["evaluations"], "iterations": None,
                     "converged": True, "message": f"spacing {g['spacing']:.3g}",
                     "cold_ms": 1e3 * cold, "warm_ms": 1e3 * warm})
    if bisect:
        b, cold, warm = timed(opt.bisect_budget, problem, objective.budget, objective.metric)
        land = opt.objective_values(problem, objective, [b["alpha"]])
        rows.append({"solver": "bisection calibration", "alpha": b["alpha"], "objective": float(land["objective"][0]),
                     "delta_ce": float(land["ce"][0]), "kl": float(land["kl"][0]), "evaluations": b["evaluations"],
                     "iterations": None, "converged": True, "message": f"bracket {b['bracket']:.2g}",
                     "cold_ms": 1e3 * cold, "warm_ms": 1e3 * warm})
    ref = results["newton"].alpha
    for r in rows:
        r["alpha_error"] = abs(r["alpha"] - ref)
    return rows, results


def adaptive_rows(problem, objectives):
    """Prompt-adaptive alpha (one per context) vs the best shared alpha, on the same objective."""
    from ufmjax import optimize as opt

    rows, results = [], {}
    for name, objective in objectives.items():
        res = opt.optimize(problem, objective, per_context=True)
        results[name] = res
        shared = res.shared
        rows.append({"objective": name, "shared_alpha": shared["alpha"], "shared_value": shared["objective"],
                     "adaptive_value": res.objective, "gain": res.gain,
                     "gain_pct": 100.0 * res.gain / abs(shared["objective"]) if shared["objective"] else None,
                     "alpha_min": float(np.min(res.alpha)), "alpha_max": float(np.max(res.alpha)),
                     "delta_ce": res.delta_ce, "evaluations": res.evaluations, "converged": res.converged,
                     "message": res.message})
    return rows, results


# ---------------------------------------------------------------- figures

def landscape_figure(out_png, problem, objectives, results, level_result, window, wide, title):
    """2 x 3 panels: penalised, budget and level landscapes with the solvers' paths; a zoom on the
    penalised optimum; |alpha_k - alpha*| per iteration; a wide view of dp and ΔCE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ufmjax import optimize as opt
    from ufmjax.report.plots import place_legends

    pen, bud, lev = objectives["penalised"], objectives["budget"], objectives["level"]
    alphas = np.linspace(*window, 1601)
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    style = {"newton": ("o", "C3"), "lbfgs": ("s", "C2"), "adam": ("^", "C4"), "gd": ("v", "C1")}

    def thin(path):
        path = np.asarray(path, float)
        if path.size > 40:  # long first-order paths: 40 points, log-spaced in the iteration
            path = path[np.unique(np.geomspace(1, path.size, 40).astype(int) - 1)]
        return path

    def draw_paths(ax, res_by_method, quantity, objective):
        for method, res in res_by_method.items():
            pts = thin(res.path)
            mk, col = style[method]
            y = opt.objective_values(problem, objective, pts)[quantity]
            ax.plot(pts, y, mk + "-", color=col, ms=4, lw=0.8, alpha=0.8,
                    label=f"{method}: {res.evaluations} evals")
            ax.plot([res.alpha], opt.objective_values(problem, objective, [res.alpha])[quantity], "*",
                    color=col, ms=14, mec="k")

    # (a) penalised
    land = opt.objective_values(problem, pen, alphas)
    ax = axes[0, 0]
    ax.plot(alphas, land["objective"], "k-", lw=1.5, label=r"$\Delta p(T) - \lambda\,\Delta CE$")
    ax.plot(alphas, land["dp"], color="0.6", lw=1, ls="--", label=r"$\Delta p(T)$")
    draw_paths(ax, results["penalised"], "objective", pen)
    top = land["objective"].max()
    ax.set_ylim(top - 2.5 * (top - land["objective"][np.argmin(np.abs(alphas))]) - 0.02, land["dp"].max() + 0.02)
    ax.set(title=f"penalised: max dp - {pen.lam:g} ΔCE", xlabel="alpha", ylabel="objective")
    ax.legend(fontsize=7)

    # (b) budget
    land = opt.objective_values(problem, bud, alphas)
    ax = axes[0, 1]
    ax.plot(alphas, land["dp"], "k-", lw=1.5, label=r"$\Delta p(T)$")
    lo, hi = land["dp"].min(), land["dp"].max()
    ax.fill_between(alphas, lo, hi, where=land["feasible"], color="C0", alpha=0.1, label=f"ΔCE <= {bud.budget:g}")
    draw_paths(ax, results["budget"], "dp", bud)
    tw = ax.twinx()
    tw.plot(alphas, land["ce"], color="C0", lw=1)
    tw.axhline(bud.budget, color="C0", ls=":", lw=1)
    tw.set_ylim(0, 4 * bud.budget)
    tw.set_ylabel("ΔCE (nats)", color="C0")
    ax.set(title=f"budget: max dp s.t. ΔCE <= {bud.budget:g}", xlabel="alpha", ylabel=r"$\Delta p(T)$")
    ax.legend(fontsize=7, loc="upper left")

    # (c) level
    land = opt.objective_values(problem, lev, alphas)
    ax = axes[0, 2]
    ax.plot(alphas, land["F"], "k-", lw=1.5, label="target-concept probability F")
    ax.axhline(lev.level, color="C0", ls=":", lw=1, label=f"level {lev.level:g}")
    draw_paths(ax, {"newton": level_result}, "F", lev)
    ax.set(title=f"level: smallest |alpha| with F >= {lev.level:g}", xlabel="alpha", ylabel="F")
    ax.legend(fontsize=7)

    # (d) zoom on the penalised optimum
    a_star = results["penalised"]["newton"].alpha
    za = np.linspace(a_star - 0.25, a_star + 0.25, 801)
    land = opt.objective_values(problem, pen, za)
    ax = axes[1, 0]
    ax.plot(za, land["objective"], "k-", lw=1.5)
    for method, res in results["penalised"].items():
        pts = thin(res.path)
        keep = np.abs(pts - a_star) <= 0.25
        mk, col = style[method]
        ax.plot(pts[keep], opt.objective_values(problem, pen, pts[keep])["objective"] if keep.any() else [],
                mk + "-", color=col, ms=5, lw=0.8, label=method)
    grid = np.linspace(-20, 20, PAPER_GRID)
    near = grid[np.abs(grid - a_star) <= 0.25]
    ax.plot(near, opt.objective_values(problem, pen, near)["objective"], "|", color="0.3", ms=14,
            label=f"grid of {PAPER_GRID} on [-20, 20]")
    ax.axvline(a_star, color="C3", ls=":", lw=1)
    ax.set(title="zoom on the penalised optimum", xlabel="alpha", ylabel="objective")
    ax.legend(fontsize=7)

    # (e) convergence: |alpha_k - alpha*| against model evaluations is not stored per step, so
    # against the iterate index; both objectives.
    ax = axes[1, 1]
    for name, ls in (("penalised", "-"), ("budget", "--")):
        ref = results[name]["newton"].alpha
        for method, res in results[name].items():
            err = np.abs(np.asarray(res.path, float) - ref)
            err = np.maximum(err, 1e-16)
            mk, col = style[method]
            ax.loglog(np.arange(1, err.size + 1), err, ls, color=col, lw=1.2, label=f"{method} ({name})")
    ax.axhline(np.diff(np.linspace(-20, 20, PAPER_GRID))[0] / 2, color="0.5", ls=":", lw=1,
               label="half the spacing of the 1025 grid")
    ax.set(title="|alpha_k - alpha*| per iterate", xlabel="iterate", ylabel="error in alpha")
    ax.legend(fontsize=6, ncol=2)

    # (f) wide view: dp saturates; ΔCE grows (UFM) or plateaus (GPT, Prop. 4.1)
    wa = np.linspace(-wide, wide, 1601)
    land = opt.objective_values(problem, pen, wa)
    ax = axes[1, 2]
    ax.plot(wa, land["dp"], "k-", label=r"$\Delta p(T)$")
    ax.set(title="wide view: dp and ΔCE", xlabel="alpha", ylabel=r"$\Delta p(T)$")
    tw = ax.twinx()
    tw.plot(wa, land["ce"], color="C0")
    tw.set_ylabel("ΔCE (nats)", color="C0")
    ax.axvline(a_star, color="C3", ls=":", lw=1)
    fig.suptitle(title)
    # A layout engine (not a one-off tight_layout) so that legends moved off the data keep room.
    fig.set_layout_engine("tight")
    place_legends(fig)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def per_context_figure(path, problem, adaptive, context_concept, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ufmjax.report.plots import place_legends

    fig, axes = plt.subplots(1, len(adaptive), figsize=(5.2 * len(adaptive), 3.8), squeeze=False)
    cc = np.asarray(context_concept) if context_concept is not None else np.zeros(problem.contexts.size, int)
    for ax, (name, res) in zip(axes[0], adaptive.items()):
        alpha = np.asarray(res.alpha)
        ax.bar(np.arange(alpha.size), alpha, color=[f"C{c}" for c in cc])
        ax.axhline(res.shared["alpha"], color="k", ls="--", lw=1, label=f"shared alpha {res.shared['alpha']:.3g}")
        ax.set(title=f"{name}: gain {res.gain:+.3g} ({100 * res.gain / abs(res.shared['objective']):+.1f}%)",
               xlabel="context (colour: its concept)", ylabel="alpha_j")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.set_layout_engine("tight")
    place_legends(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- tables

def _f(x, spec=".6g"):
    if x is None:
        return "-"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "NO"
    return format(x, spec)


def solver_table(rows, budget=None) -> str:
    head = "| solver | alpha | abs(alpha - newton) | objective | ΔCE" + (" - budget" if budget else "") + \
        " | evaluations | converged | cold ms | warm ms |\n|---|---|---|---|---|---|---|---|---|\n"
    body = ""
    for r in rows:
        dce = r["delta_ce"] - budget if budget else r["delta_ce"]
        body += (f"| {r['solver']} | {_f(r['alpha'], '.10f')} | {_f(r['alpha_error'], '.2e')} | {_f(r['objective'], '.8f')} "
                 f"| {_f(dce, '.2e' if budget else '.5f')} | {r['evaluations']} | {_f(r['converged'])} "
                 f"| {_f(r['cold_ms'], '.1f')} | {_f(r['warm_ms'], '.1f')} |\n")
    return head + body


def adaptive_table(rows) -> str:
    head = ("| objective | shared alpha | shared value | per-context value | gain | gain % | alpha_j range | "
            "evaluations | converged |\n|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        body += (f"| {r['objective']} | {_f(r['shared_alpha'], '.4f')} | {_f(r['shared_value'], '.6f')} "
                 f"| {_f(r['adaptive_value'], '.6f')} | {_f(r['gain'], '+.6f')} | {_f(r['gain_pct'], '+.1f')} "
                 f"| [{r['alpha_min']:.3g}, {r['alpha_max']:.3g}] | {r['evaluations']} | {_f(r['converged'])} |\n")
    return head + body


# ---------------------------------------------------------------- one model

def study(label, run, args, out, window, wide):
    import jax

    from ufmjax import optimize as opt
    import jax.numpy as jnp

    from ufmjax.runs import versions

    with jax.enable_x64(True):
        st = run.steer(args.target, dtype=jnp.float64)
        problem = st.problem()
        meta = {**st.meta, "dtype": "float64", "versions": versions()}
        if "context_concept" in st.arrays:
            meta["context_concept"] = st.arrays["context_concept"][problem.contexts].tolist()
        objectives = {"penalised": opt.Objective("penalised", lam=args.lam),
                      "budget": opt.Objective("budget", budget=args.budget),
                      "level": opt.Objective("level", level=args.level)}
        grids = [(-20.0, 20.0, PAPER_GRID), (window[0], window[1], 4001)]
        pen_rows, pen_res = solver_rows(problem, objectives["penalised"], grids, bisect=False)
        bud_rows, bud_res = solver_rows(problem, objectives["budget"], grids, bisect=True)
        level_res = opt.optimize(problem, objectives["level"])
        adaptive = {"penalised": objectives["penalised"], "budget ΔCE": objectives["budget"],
                    "budget KL": opt.Objective("budget", budget=args.budget, metric="kl")}
        ad_rows, ad_res = adaptive_rows(problem, adaptive)
        landscape_figure(out / f"landscape_{label}.png", problem, objectives,
                         {"penalised": pen_res, "budget": bud_res}, level_res, window, wide,
                         f"{label}: target concept {args.target} (float64)")
        per_context_figure(out / f"per_context_{label}.png", problem, ad_res, meta.get("context_concept"),
                           f"{label}: prompt-adaptive alpha vs one shared alpha")
    md = (f"## {label}\n\nRun `{meta['run']}`, target concept {args.target}, {problem.contexts.size} contexts, "
          f"closed-form curvature c = {pen_res['newton'].curvature:.6g} (one jvp).\n\n"
          f"### Penalised: max Δp(T) - {args.lam:g} ΔCE\n\n" + solver_table(pen_rows) +
          f"\n### Budget: max Δp(T) s.t. ΔCE <= {args.budget:g} (calibration)\n\n"
          f"Closed-form start alpha0 = {bud_res['newton'].alpha_start:.6g} "
          f"(optimum {bud_res['newton'].alpha:.6g}).\n\n" + solver_table(bud_rows, args.budget) +
          f"\n### Target level F >= {args.level:g}\n\nalpha = {level_res.alpha:.8f}, F = {level_res.target_prob:.10f}, "
          f"{level_res.evaluations} evaluations, converged: {_f(level_res.converged)}.\n"
          f"\n### Prompt-adaptive alpha (one per context, same objective and budget)\n\n" + adaptive_table(ad_rows))
    return md, {"meta": meta, "penalised": pen_rows, "budget": bud_rows, "level": level_res.to_dict(),
                "adaptive": ad_rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    from ufmjax.data import reference_config
    from ufmjax.runs import gpt as gptrun
    from ufmjax.runs import io, load_run, train_ufm_run

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections, numbers = [], {}

    ufm_dir = out / "runs" / "ufm_ref"
    train_ufm_run(ufm_dir, reference_config(), progress=False)
    md, nums = study("ufm", load_run(ufm_dir), args, out, window=(-2.0, 4.0), wide=20.0)
    sections.append(md)
    numbers["ufm"] = nums
    print(f"ufm done ({time.perf_counter() - t0:.0f} s)")

    if args.no_gpt:
        sections.append("## gpt\n\nskipped (--no-gpt).\n")
    else:
        from dataclasses import replace

        gpt_dir = out / "runs" / "gpt_concept"
        cfg = replace(gptrun.CONCEPT_TRAIN, steps=args.gpt_steps, warmup=min(gptrun.CONCEPT_TRAIN.warmup,
                                                                            args.gpt_steps // 10))
        m = gptrun.train_gpt_run(gpt_dir, "concept", data_config=reference_config(), train_config=cfg,
                                 progress=False)
        md, nums = study("gpt", load_run(gpt_dir), args, out, window=(-2.0, 4.0), wide=40.0)
        sections.append(md + f"\nGPT: {m.get('params')} parameters, CE gap to the entropy "
                        f"{m.get('gap', float('nan')):.2e} nats.\n")
        numbers["gpt"] = nums
        print(f"gpt done ({time.perf_counter() - t0:.0f} s)")

    header = ("# Optimal steering strength by gradients in alpha\n\n"
              "Objectives (ufmjax.optimize): Δp(T) is the weighted mean over contexts of Def. 3.5's concept "
              "increase (F_T(alpha) - F_T(0)) / |T|; ΔCE is Def. 3.7 against the data. Evaluations count "
              "forward passes of the steered model over all its contexts (newton's carry two forward-mode "
              "tangents, lbfgs/adam/gd's a reverse pass); grids evaluate values only.\n\n")
    io.write_bytes_atomic(out / "optimize_alpha.md", (header + "\n".join(sections)).encode())
    io.write_json_atomic(out / "optimize_alpha.json", {"numbers": numbers, "seconds": time.perf_counter() - t0})
    print(f"wrote {out}/optimize_alpha.md and figures in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
