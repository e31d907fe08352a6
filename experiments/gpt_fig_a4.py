"""Fig. A.4 on a GPT trained here: a 1-layer GPT on the bundled Python docs, steered toward
the "uppercase" concept through the shared kernel.

Panels: (a) Δp of the top tokens at the largest alpha (Fig. 6: bumps of the off-target
tokens, monotone rise of the target ones); (b) concept probability of uppercase with its tanh
fit (Thm 3.6) and sampled concept presence; (c) ΔCE: next character of held-out prompts
(last position) and every position of held-out text, both steered at all positions
(Thm 3.8 near 0, Prop. 4.1 plateau); (d) distance to LN(±v) W^T (Prop. 4.1) and KL to the
local UFM law.

    python experiments/gpt_fig_a4.py [--runs results/gpt_runs] [--out results/gpt_fig_a4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from ufmjax.report import fig_a4
from ufmjax.runs import save_sweep, scaled_sweep, text_run
from ufmjax.runs.io import write_json_atomic


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="results/gpt_runs", help="where the GPT runs live (trained if missing)")
    p.add_argument("--out", default="results/gpt_fig_a4", help="output folder")
    p.add_argument("--layer", type=int, default=1, help="residual layer steered (0 or 1)")
    p.add_argument("--positions", choices=["all", "last"], default="all")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the text default)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    run = text_run(args.runs, 1, steps=args.steps, progress=not args.quiet)
    arrays, meta, summary = scaled_sweep(run, args.layer, "uppercase", positions=args.positions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_sweep(out / "sweep.npz", arrays, meta)
    fig_a4(run, arrays, summary, out / "fig_a4.png", layer=args.layer, positions=args.positions)
    chars = run.source.chars
    top = summary["top_tokens"]

    result = {"summary": summary, "top_tokens": [chars[t] for t in top], "run": str(run.path), "metrics": {
        k: run.metrics[k] for k in ("val_loss", "bigram_val_loss", "unigram_val_loss", "seconds", "steps")},
        "sweep_seconds": meta["sweep_seconds"], "layer": args.layer, "positions": args.positions,
        "figure": str(out / "fig_a4.png")}
    write_json_atomic(out / "summary.json", result)
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
