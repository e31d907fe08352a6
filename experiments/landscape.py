"""Two steering vectors on a trained GPT: the 2-D landscape of the penalised objective.

For two target concepts (each term its own difference-of-means vector), draws
dp(alpha) - lam * ΔCE(alpha) over (alpha_1, alpha_2) with Newton's path to the optimum, beside
the two 1-D optima (each vector alone): when the 2-D optimum sits where the two 1-D optima
would put it, the vectors do not interact. Writes landscape.png and landscape.json.

    python experiments/landscape.py [--run RUN] [--out results/landscape] [--targets 0,1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ufmjax.optimize import Objective, optimize, optimize_vector, vector_landscape  # noqa: E402
from ufmjax.runs import load_run, train_gpt_run  # noqa: E402
from ufmjax.runs.several import steer_terms  # noqa: E402
from ufmjax.runs.terms import TermSpec  # noqa: E402


def landscape(run, out: Path, targets=(0, 1), lam: float = 0.1, num: int = 61) -> dict:
    """The figure and its numbers for one run (float64)."""
    objective = Objective("penalised", lam=lam)
    with jax.enable_x64(True):
        ms = steer_terms(run, [TermSpec(target=str(t)) for t in targets], dtype=np.float64)
        pb = ms.problem()
        res = optimize_vector(pb, objective)
        ones = [optimize(s.problem(), objective) for s in ms.singles]
        reach = 2.0 * max(max(abs(a) for a in res.alpha), *(abs(o.alpha) for o in ones), 0.5)
        axis = np.linspace(-reach, reach, num)
        pts = np.stack([a.reshape(-1) for a in np.meshgrid(axis, axis, indexing="ij")], axis=1)
        land = vector_landscape(pb, objective, pts)
    Z = np.asarray(land["objective"]).reshape(num, num)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    cs = ax.contourf(axis, axis, Z.T, levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=f"dp - {lam:g} ΔCE")
    path = np.asarray(res.path)
    ax.plot(path[:, 0], path[:, 1], "w.-", label=f"Newton ({len(path) - 1} steps)")
    ax.plot(*res.alpha, "r*", ms=14, label=f"2-D optimum ({res.alpha[0]:.3g}, {res.alpha[1]:.3g})")
    ax.plot([ones[0].alpha, 0], [0, ones[1].alpha], "ws", mfc="none", ms=9, label="1-D optima (each vector alone)")
    ax.set_xlabel(f"alpha_1 (target {targets[0]})")
    ax.set_ylabel(f"alpha_2 (target {targets[1]})")
    ax.set_title("Two steering vectors on a GPT: penalised objective")
    ax.legend(loc="lower left", fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "landscape.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    summary = {"targets": list(targets), "lam": lam, "alpha_2d": res.alpha, "objective_2d": res.objective,
               "newton_steps": len(path) - 1, "evaluations": res.evaluations, "converged": res.converged,
               "alpha_1d": [o.alpha for o in ones], "objective_1d": [o.objective for o in ones],
               "grid_best": float(Z.max()), "grid_points": int(Z.size)}
    (out / "landscape.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a concept GPT run (default: trained into OUT/gpt)")
    p.add_argument("--out", default="results/landscape")
    p.add_argument("--targets", default="0,1")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.run is None:
        args.run = str(out / "gpt")
        if not (out / "gpt" / "metrics.json").exists():
            train_gpt_run(args.run, "concept", progress=False)
    s = landscape(load_run(args.run), out, tuple(int(t) for t in args.targets.split(",")))
    print(json.dumps(s, default=float))
    # The 2-D Newton optimum is at least as good as the best point of the dense grid.
    return 0 if s["converged"] and s["objective_2d"] >= s["grid_best"] - 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
