"""Figs. 6/7 of the paper (Sec. 4) on a pretrained model read from a Hugging Face folder.

Per layer (`hf_layer_figure`): (a) Δp of the top tokens at the largest alpha and of the most
likely unsteered tokens (Fig. 6: off-target bumps, the concept's tokens rising); (b) concept
probability with its tanh fit (Thm 3.6); (c) ΔCE of the next token and of held-out text near
alpha = 0, with the local quadratic law (Thm 3.8); (d) ΔCE far out (the Prop. 4.1 plateau), the
distance of the logits to their limit and the local UFM's KL, with its validity range shaded.
Across layers (`hf_layers_figure`): concept probability and ΔCE against alpha |v| / |h|, so
early, middle and last layers are on one scale (Fig. 7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ufmjax.analysis import tanh_fit
from ufmjax.report.plots import new_figure, place_legends, save_figure


def _label(s: str) -> str:
    """A token as a legend label: escapes shown, and a token that is or holds only whitespace
    (BPE's leading-space tokens) quoted, so it does not read as an empty entry."""
    text = repr(str(s))[1:-1][:12]
    return f"'{text}'" if not text.strip() or text != text.strip() else text


def hf_layer_figure(arrays: dict, summary: dict, path, *, title: str) -> Path:
    """Draw one layer's four panels from an `hf_sweep` (with ce_text) and write `path`."""
    return save_figure(draw_hf_layer(arrays, summary, title=title), path, dpi=110)


def draw_hf_layer(arrays: dict, summary: dict, *, title: str) -> Figure:
    """One layer's four panels (see `hf_layer_figure`).

    Args:
      arrays: an `hf_sweep` result (with ce_text for the held-out curves).
      summary: `summarize_sweep` of it (top tokens, local UFM range, quadratic window).
      title: the figure title.
    Returns:
      the figure, legends placed where they cover no curve.
    """
    a = np.asarray(arrays["alphas"])
    w = np.asarray(arrays["weights"])
    strs = list(np.asarray(arrays["token_strs"]))
    tokens = np.asarray(arrays["tokens"])
    concept = np.asarray(arrays["concept_of"])
    fig = new_figure((12, 8.5))
    ax = fig.subplots(2, 2)

    dp = np.einsum("amk,m->ak", arrays["delta_p"], w)
    top = [int(np.flatnonzero(tokens == t)[0]) for t in summary["top_tokens"] if t in tokens]
    base_rank = np.argsort(-(np.asarray(arrays["probs_base"])[:, tokens].T @ w))
    base = [int(k) for k in base_rank[:3] if int(k) not in top]
    for k in top[:8] + base:
        inside = concept[tokens[k]] == 1
        ax[0, 0].plot(a, dp[:, k], "-" if inside else "--", lw=1.3 if inside else 1.0,
                      label=_label(strs[k]) + (" (C)" if inside else ""))
    ax[0, 0].set(xscale="asinh", title="(a) Δp: top tokens at max α, top unsteered tokens", xlabel="α",
                 ylabel="Δp (mean over prompts)")
    ax[0, 0].legend(fontsize=7, ncol=2, loc="best", framealpha=0.6)

    F = np.asarray(arrays["concept_prob"])[:, :, 1] @ w
    r2, (c0, c1, c2, c3) = tanh_fit(a, F)
    ax[0, 1].plot(a, F, lw=1.5, label="P(concept) exact")
    ax[0, 1].plot(a, c0 + c1 * np.tanh((a - c2) / c3), ":", label=f"tanh fit (R²={r2:.3f})")
    if "text_concept_prob" in arrays:
        ax[0, 1].plot(a, arrays["text_concept_prob"], "--", lw=1.0, label="held-out text, every position")
    ax[0, 1].set(xscale="asinh", title="(b) concept probability (Thm 3.6)", xlabel="α", ylabel="probability")
    ax[0, 1].legend(fontsize=8)

    lo, hi = summary.get("local_ufm_range", [np.nan, np.nan])
    win = summary.get("quad_window", np.abs(a).max() / 20)
    near = np.abs(a) <= 3 * win
    i0 = int(np.argmin(np.abs(a)))
    dce = np.asarray(arrays["delta_ce"])
    ax[1, 0].plot(a[near], dce[near], label="ΔCE next token")
    if "text_delta_ce" in arrays:
        ax[1, 0].plot(a[near], np.asarray(arrays["text_delta_ce"])[near], label="ΔCE held-out text")
    if "d2_delta_ce" in arrays:
        b, k = float(arrays["d_delta_ce"][i0]), 0.5 * float(arrays["d2_delta_ce"][i0])
        ax[1, 0].plot(a[near], dce[i0] + b * (a[near] - a[i0]) + k * (a[near] - a[i0]) ** 2, ":",
                      label="quadratic law from ΔCE'(0), ΔCE''(0)")
    if np.isfinite(lo):
        ax[1, 0].axvspan(max(lo, a[near].min()), min(hi, a[near].max()), color="0.9", zorder=0,
                         label="local UFM valid (KL < 0.01)")
    ax[1, 0].set(title="(c) ΔCE near 0 (Thm 3.8)", xlabel="α", ylabel="nats")
    ax[1, 0].legend(fontsize=8)

    ax[1, 1].plot(a, dce, label="ΔCE next token")
    if "text_delta_ce" in arrays:
        ax[1, 1].plot(a, arrays["text_delta_ce"], label="ΔCE held-out text")
    ax[1, 1].set(xscale="asinh", title="(d) far out: plateau and Prop. 4.1", xlabel="α", ylabel="nats")
    twin = ax[1, 1].twinx()
    if "limit_distance" in arrays:
        twin.semilogy(a, np.maximum(arrays["limit_distance"], 1e-12), "k:", lw=1.0,
                      label="max |y(α) − lim| (logits)")
    twin.set_ylabel("distance to the limit logits")
    lines = ax[1, 1].get_legend_handles_labels()
    tl = twin.get_legend_handles_labels()
    ax[1, 1].legend(lines[0] + tl[0], lines[1] + tl[1], fontsize=8, loc="center right")
    fig.suptitle(title, fontsize=10)
    place_legends(fig)
    return fig


def hf_layers_figure(results: list[dict], path, *, title: str) -> Path:
    """Concept probability and ΔCE against the relative strength alpha |v| / median |h| per layer."""
    return save_figure(draw_hf_layers(results, title=title), path, dpi=110)


def draw_hf_layers(results: list[dict], *, title: str) -> Figure:
    """The across-layer figure (see `hf_layers_figure`) from `hf_layer_section` results
    (each with `layer`, `arrays` and `scale`, the alpha of alpha |v| = median |h|)."""
    fig = new_figure((11, 4.2))
    ax = fig.subplots(1, 2)
    for r in results:
        arrays, scale = r["arrays"], r["scale"]
        x = np.asarray(arrays["alphas"]) * scale
        w = np.asarray(arrays["weights"])
        ax[0].plot(x, np.asarray(arrays["concept_prob"])[:, :, 1] @ w, label=f"layer {r['layer']}")
        ax[1].plot(x, arrays["text_delta_ce"] if "text_delta_ce" in arrays else arrays["delta_ce"],
                   label=f"layer {r['layer']}")
    ax[0].set(xscale="asinh", title="concept probability", xlabel="α |v| / median |h|", ylabel="probability")
    ax[1].set(xscale="asinh", title="ΔCE on held-out text (every position)", xlabel="α |v| / median |h|",
              ylabel="nats")
    for x in ax:
        x.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    place_legends(fig)
    return fig
