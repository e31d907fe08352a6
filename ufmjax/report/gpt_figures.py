"""Fig. A.4 of the paper on a GPT trained here: steering a text GPT toward "uppercase".

Panels: (a) Δp of the top tokens at the largest alpha (Fig. 6: off-target bumps, target tokens
rising); (b) concept probability with its tanh fit (Thm 3.6) and sampled concept presence;
(c) ΔCE of the next character and of every position of held-out text (Thm 3.8 near 0, the
Prop. 4.1 plateau far out); (d) distance to LN(±v) W^T (Prop. 4.1) and KL to the local UFM law.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ufmjax.analysis import tanh_fit
from ufmjax.report.plots import new_figure, place_legends, save_figure


def fig_a4(run, arrays: dict, summary: dict, path, *, layer: int, positions: str) -> Path:
    """Draw Fig. A.4 from a text GPT's `scaled_sweep` output and write it atomically to `path`."""
    return save_figure(draw_fig_a4(run, arrays, summary, layer=layer, positions=positions), path, dpi=120)


def draw_fig_a4(run, arrays: dict, summary: dict, *, layer: int, positions: str) -> Figure:
    """Fig. A.4's four panels from a text GPT's `scaled_sweep` output (see `fig_a4`).

    Args:
      run: the text GPT run (its `source` names the characters, its metrics go in the title).
      arrays, summary: `scaled_sweep`'s arrays (tracking every token) and summary.
      layer, positions: where the sweep steered, for the title.
    Returns:
      the figure, legends placed where they cover no curve.
    """
    a = arrays["alphas"]
    chars = run.source.chars
    fig = new_figure((11, 8))
    ax = fig.subplots(2, 2)
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
    # Up to 14 curves fill the panel from edge to edge: no corner is free, so the legend sits
    # outside, right of the panel, in one column (place_legends checks it hides nothing).
    ax[0, 0].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)

    F = arrays["concept_prob"][:, :, 0] @ w
    r2, (c0, c1, c2, c3) = tanh_fit(a, F)
    ax[0, 1].plot(a, F, label="P(uppercase) exact")
    ax[0, 1].plot(a, c0 + c1 * np.tanh((a - c2) / c3), ":", label=f"tanh fit (R²={r2:.4f})")
    if "concept_presence" in arrays:
        ax[0, 1].plot(arrays["presence_alphas"], arrays["concept_presence"], "o", ms=3,
                      label="sampled presence (≥50% of new chars)")
    ax[0, 1].set(xscale="asinh", title="(b) concept level (Thm 3.6)", xlabel="α", ylabel="probability")
    ax[0, 1].legend(fontsize=8)

    ax[1, 0].plot(a, arrays["delta_ce"], label="ΔCE next char (last position)")
    if "text_delta_ce" in arrays:
        ax[1, 0].plot(a, arrays["text_delta_ce"], label="ΔCE held-out text (all positions)")
    ax[1, 0].set(xscale="asinh", title="(c) cross-entropy (Thm 3.8, Prop. 4.1)", xlabel="α", ylabel="nats")
    ax[1, 0].legend(fontsize=8)

    pos = a > 0
    ax[1, 1].loglog(a[pos], arrays["limit_distance"][pos], label="max |y(α) − LN(v)Wᵀ| (Prop. 4.1)")
    ax[1, 1].loglog(-a[a < 0], arrays["limit_distance"][a < 0], "--", label="α < 0: LN(−v)Wᵀ")
    ax[1, 1].loglog(np.abs(a[a != 0]), np.maximum(arrays["local_ufm_kl"][a != 0], 1e-12), ":",
                    label="KL(GPT ‖ local UFM law) (nats)")
    ax[1, 1].axhline(0.01, color="gray", lw=0.5)
    ax[1, 1].set(title="(d) limit and local UFM", xlabel="|α|")
    ax[1, 1].legend(fontsize=8)
    fig.suptitle(f"Fig. A.4 (Taimeskhanov et al. 2026) on a {run.model.config.layers}-layer GPT trained on "
                 f"Python's docs,\nsteered toward uppercase at layer {layer} ({positions} positions); val loss "
                 f"{run.metrics['val_loss']:.3f} vs bigram {run.metrics['bigram_val_loss']:.3f} nats/char",
                 fontsize=10)
    place_legends(fig)
    return fig


def landscape(run, path, targets=(0, 1), lam: float = 0.1, num: int = 61) -> dict:
    """Two steering vectors on a GPT: the penalised objective dp - lam ΔCE over
    (alpha_1, alpha_2), each term its own target's difference-of-means vector, with Newton's
    path to the 2-D optimum beside the two 1-D optima (each vector alone). Where the 2-D
    optimum sits at the pair of 1-D optima the vectors do not interact. Computes in float64,
    writes the figure atomically to `path` and returns its numbers."""
    import jax

    from ufmjax.optimize import Objective, optimize, optimize_vector, vector_landscape
    from ufmjax.runs.several import steer_terms
    from ufmjax.runs.terms import TermSpec

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
    fig = new_figure((6.4, 5.2))
    ax = fig.subplots()
    cs = ax.contourf(axis, axis, Z.T, levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=f"dp - {lam:g} ΔCE")
    steps = np.asarray(res.path)
    ax.plot(steps[:, 0], steps[:, 1], "w.-", label=f"Newton ({len(steps) - 1} steps)")
    ax.plot(*res.alpha, "r*", ms=14, label=f"2-D optimum ({res.alpha[0]:.3g}, {res.alpha[1]:.3g})")
    ax.plot([ones[0].alpha, 0], [0, ones[1].alpha], "ws", mfc="none", ms=9, label="1-D optima (each vector alone)")
    ax.set_xlabel(f"alpha_1 (target {targets[0]})")
    ax.set_ylabel(f"alpha_2 (target {targets[1]})")
    ax.set_title("Two steering vectors on a GPT: penalised objective")
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path, dpi=120)
    return {"targets": list(targets), "lam": lam, "alpha_2d": [float(a) for a in res.alpha],
            "objective_2d": float(res.objective), "newton_steps": len(steps) - 1,
            "evaluations": int(res.evaluations), "converged": bool(res.converged),
            "alpha_1d": [float(o.alpha) for o in ones], "objective_1d": [float(o.objective) for o in ones],
            "grid_best": float(Z.max()), "grid_points": int(Z.size)}
