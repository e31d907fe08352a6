"""The model-size table: 1-, 2- and 4-layer GPTs trained on Python's docs, steered toward
"uppercase" at an early, a middle and the last layer, every law measured by the shared kernel.

Columns (one row per model and layer; grids reach alpha |v| = 50 |h|, dense near 0):
  bumps     share of (prompt, top-10 token) curves Δp(α) with an interior peak (Thm 3.3)
  precede   share of prompts whose off-target bumps all peak before their target bumps
  tanh R²   fit of the concept probability by a + b tanh((α - c) / d) (Thm 3.6)
  quad R²   fit of ΔCE by bα + kα² on the local-UFM range; k / (ΔCE''(0)/2) (Thm 3.8)
  plateau   |ΔCE'| at the grid's ends relative to its largest value (Prop. 4.1)
  limit     max |y(α) - LN(±v) Wᵀ| at the grid's ends, and at |α| = 1e4 (Prop. 4.1)
  local UFM [lo, hi]: the α range where KL(GPT || softmax(y(0) + α u)) < 0.01 nats, and
            the same in units of α|v|/|h| (the push relative to the residual stream)

    python experiments/gpt_size_table.py [--runs results/gpt_runs] [--out results/gpt_size_table]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ufmjax.runs import scaled_sweep, text_run
from ufmjax.runs.io import write_bytes_atomic, write_json_atomic


def layers_of(L: int) -> dict[str, int]:
    """Early, middle and last residual layer of an L-block model (deduplicated, in order)."""
    named = {"early": 0, "middle": L // 2, "last": L}
    out, seen = {}, set()
    for name, layer in named.items():
        if layer not in seen:
            out[name] = layer
            seen.add(layer)
    return out


def fmt(x, spec=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="results/gpt_runs", help="where the GPT runs live (trained if missing)")
    p.add_argument("--out", default="results/gpt_size_table", help="output folder")
    p.add_argument("--sizes", default="1,2,4", help="model depths L")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the text default)")
    p.add_argument("--positions", choices=["all", "last"], default="all")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for L in (int(x) for x in args.sizes.split(",")):
        run = text_run(args.runs, L, steps=args.steps, progress=not args.quiet)
        for name, layer in layers_of(L).items():
            arrays, meta, s = scaled_sweep(run, layer, "uppercase", positions=args.positions)
            row = {"L": L, "layer": layer, "where": name, "val_loss": run.metrics["val_loss"],
                   "bigram": run.metrics["bigram_val_loss"], "alpha_reach": float(arrays["alphas"][-1]),
                   "sweep_seconds": meta["sweep_seconds"], **s}
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)

    write_json_atomic(out / "table.json", rows)
    lines = [("| L | layer | val / bigram | bumps | precede | tanh R² | quad R² (k ratio) | plateau "
              "| limit at ends / 1e4 | local UFM α range (α|v|/|h|) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["local_ufm_range"]
        rlo, rhi = r["local_ufm_range_rel"]
        lines.append(
            f"| {r['L']} | {r['layer']} ({r['where']}) | {r['val_loss']:.3f} / {r['bigram']:.3f} "
            f"| {fmt(r['bump_share'], '.2f')} | {fmt(r['precede'], '.2f')} ({r['precede_rows']}) "
            f"| {fmt(r['tanh_r2'], '.4f')} | {fmt(r['quad_r2'], '.4f')} ({fmt(r['quad_k_vs_d2'], '.2f')}) "
            f"| {fmt(r['plateau_slope'], '.1e')} | {fmt(r['limit_distance_end'], '.1e')} / "
            f"{fmt(r.get('limit_distance_1e4'), '.1e')} "
            f"| [{lo:.3g}, {hi:.3g}] ([{50 * rlo:.2g}, {50 * rhi:.2g}]) |")
    table = "\n".join(lines) + "\n"
    write_bytes_atomic(out / "table.md", table.encode())
    print(table)


if __name__ == "__main__":
    main()
