"""Two steering vectors on a trained GPT: the 2-D landscape of the penalised objective.

For two target concepts (each term its own difference-of-means vector), draws
dp(alpha) - lam * ΔCE(alpha) over (alpha_1, alpha_2) with Newton's path to the optimum, beside
the two 1-D optima (each vector alone): when the 2-D optimum sits where the two 1-D optima
would put it, the vectors do not interact. Writes landscape.png and landscape.json; the same
figure is part of `ufmjax reproduce` (figures/gpt_landscape.png).

    python experiments/landscape.py [--run RUN] [--out results/landscape] [--targets 0,1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ufmjax.report.gpt_figures import landscape
from ufmjax.runs import load_run, train_gpt_run


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
    s = landscape(load_run(args.run), out / "landscape.png", tuple(int(t) for t in args.targets.split(",")))
    (out / "landscape.json").write_text(json.dumps(s, indent=2))
    print(json.dumps(s))
    # The 2-D Newton optimum is at least as good as the best point of the dense grid.
    return 0 if s["converged"] and s["objective_2d"] >= s["grid_best"] - 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
