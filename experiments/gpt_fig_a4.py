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
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_common import scaled_sweep, text_run

from ufmjax.gptrun import tanh_fit
from ufmjax.runs import save_sweep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="results/gpt_runs", help="where the GPT runs live (trained if missing)")
    p.add_argument("--out", default="results/gpt_fig_a4", help="output folder")
    p.add_argument("--layer", type=int, default=1, help="residual layer steered (0 or 1)")
    p.add_argument("--positions", choices=["all", "last"], default="all")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the text default)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = text_run(args.runs, 1, steps=args.steps, progress=not args.quiet)
    arrays, meta, summary = scaled_sweep(run, args.layer, "uppercase", positions=args.positions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_sweep(out / "sweep.npz", arrays, meta)

    a = arrays["alphas"]
    chars = run.source.chars
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    w = np.full(arrays["probs_base"].shape[0], 1 / arrays["probs_base"].shape[0])
    dp = np.einsum("amk,m->ak", arrays["delta_p"], w)
    top = summary["top_tokens"]
    # The top tokens at the largest alpha, and the most likely tokens of the unsteered model.
    base = [int(t) for t in np.argsort(-(arrays["probs_base"].T @ w))[:4] if t not in top]
    for tok in top + base:
        upper = run.source.concept_of[tok] == 0
        ax[0, 0].plot(a, dp[:, tok], "-" if upper else "--", lw=1.2 if upper else 1.0, label=repr(chars[tok]))
    ax[0, 0].set(xscale="asinh", title="(a) Δp: top tokens at max α (—), top unsteered (--)",
                 xlabel="α", ylabel="Δp (mean over prompts)")
    ax[0, 0].legend(fontsize=7, ncol=3, loc="upper left")

    F = arrays["concept_prob"][:, :, 0] @ w
    r2, (c0, c1, c2, c3) = tanh_fit(a, F)
    ax[0, 1].plot(a, F, label="P(uppercase) exact")
    ax[0, 1].plot(a, c0 + c1 * np.tanh((a - c2) / c3), ":", label=f"tanh fit (R²={r2:.4f})")
    if "concept_presence" in arrays:
        ax[0, 1].plot(arrays["presence_alphas"], arrays["concept_presence"], "o", ms=3,
                      label="sampled presence (≥50% of 16 chars)")
    ax[0, 1].set(xscale="asinh", title="(b) concept level", xlabel="α")
    ax[0, 1].legend(fontsize=8)

    ax[1, 0].plot(a, arrays["delta_ce"], label="ΔCE next char (last position)")
    if "text_delta_ce" in arrays:
        ax[1, 0].plot(a, arrays["text_delta_ce"], label="ΔCE held-out text (all positions)")
    ax[1, 0].set(xscale="asinh", title="(c) cross-entropy", xlabel="α", ylabel="nats")
    ax[1, 0].legend(fontsize=8)

    pos = a > 0
    ax[1, 1].loglog(a[pos], arrays["limit_distance"][pos], label="max |y(α) − LN(v)Wᵀ| (Prop. 4.1)")
    ax[1, 1].loglog(-a[~pos & (a < 0)], arrays["limit_distance"][a < 0], "--", label="α < 0: LN(−v)Wᵀ")
    ax[1, 1].loglog(np.abs(a[a != 0]), np.maximum(arrays["local_ufm_kl"][a != 0], 1e-12), ":",
                    label="KL(GPT ‖ local UFM law)")
    ax[1, 1].axhline(0.01, color="gray", lw=0.5)
    ax[1, 1].set(title="(d) limit and local UFM", xlabel="|α|")
    ax[1, 1].legend(fontsize=8)
    fig.suptitle(f"1-layer GPT on Python's docs, steered toward uppercase at layer {args.layer} "
                 f"({args.positions} positions); val loss {run.metrics['val_loss']:.3f} vs bigram "
                 f"{run.metrics['bigram_val_loss']:.3f} nats/char", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "fig_a4.png", dpi=120)

    result = {"summary": summary, "top_tokens": [chars[t] for t in top], "run": str(run.path), "metrics": {
        k: run.metrics[k] for k in ("val_loss", "bigram_val_loss", "unigram_val_loss", "seconds", "steps")},
        "sweep_seconds": meta["sweep_seconds"], "layer": args.layer, "positions": args.positions,
        "figure": str(out / "fig_a4.png")}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
