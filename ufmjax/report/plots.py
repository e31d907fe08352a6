"""Figures of the paper from alpha-sweep results, with the numbers each figure checks.

Source: Taimeskhanov, Vaiter, Garreau, "Towards Understanding Steering Strength"
(arXiv 2602.02712). Each `fig_*` function takes a sweep result dict (the output of
`ufmjax.kernel.sweep` / `ufmjax.runs.ufm_sweep`) and the theory arrays it is compared with
(`ufmjax.theory`), and returns `(figure, numbers)`: a matplotlib Figure and a dict of plain
floats/ints/bools that say whether the sweep agrees with the theory. Plotting never changes
the numbers; the `check_*` functions compute them without matplotlib.

Shape legend: A = alphas, M = contexts, V = vocabulary, G = concepts, K = tracked tokens.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot,
so importing this module changes no global backend and leaks no open figures; `save_figure`
writes PNGs atomically (temporary file in the same folder, then rename).

Legends: every figure function ends with `place_legends`, which moves a legend that covers a
drawn line, marker or text (`legend_overlap`) to a free place, checked after layout; legend
entries are drawn artists, never style keys that match no line (`legend_orphans`);
`legend_problems` lists both faults, for tests.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from ufmjax.runs import io

PAPER = "Taimeskhanov et al. 2026"

STYLE = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "figure.dpi": 100,
}

# A kernel derivative counts against unimodality only above this fraction of its curve's
# largest |slope|: far from the peak both sides of a bump are flat to rounding.
SLOPE_RTOL = 1e-4
# Relative departure of ΔCE from its quadratic law that Fig. 5 calls "departed".
DEPARTURE = 0.10
# Two token curves closer than this fraction of a panel's largest |Δp| are drawn as one line
# with one legend entry: at 400 pixels of axes height they are within a pixel anyway (uniform
# profiles make every token of a concept coincide).
COINCIDE_RTOL = 1e-3


def new_figure(figsize) -> Figure:
    """A pyplot-free Figure drawn by Agg."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path, dpi: int = 150) -> Path:
    """Write `fig` as a PNG at `path` atomically: a failed save leaves no partial file."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path must end in .png, got {str(path)!r}")
    with matplotlib.rc_context(STYLE), io.atomic_path(path) as tmp:
        # The temporary name ends in .tmp: the format must be given, not inferred.
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    return path


# ----------------------------------------------------------------------------- legends

# Where `place_legends` tries an axes legend, in order, before moving it outside the axes.
LEGEND_LOCS = ("upper left", "upper right", "lower left", "lower right", "center left", "center right",
               "upper center", "lower center")
_NO_STYLE = (None, "None", "none", "", " ")


def _layout(fig: Figure):
    """Run the figure's layout engine, so positions are those a save draws; return a renderer."""
    renderer = fig.canvas.get_renderer()
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
    return renderer


def _name(artist, ax) -> str:
    """How a covered artist is reported: its label (or text) and its panel's title."""
    label = str(artist.get_label() if hasattr(artist, "get_label") else "")
    if isinstance(artist, Text):
        label = f"text {artist.get_text()[:30]!r}"
    elif not label or label.startswith("_"):
        label = f"unlabelled {type(artist).__name__}"
    return f"{label} (panel {ax.get_title().splitlines()[0][:40]!r})" if ax.get_title() else label


def _covered(box: Bbox, fig: Figure, renderer) -> list[str]:
    """What is drawn under `box` (display pixels): lines, markers and texts of every axes."""
    hits = []
    for ax in fig.axes:
        # Only the part of the box over this axes counts: lines are clipped to their axes.
        clip = Bbox.intersection(box, ax.bbox)
        if clip is None or clip.width <= 0 or clip.height <= 0:
            continue
        for line in ax.lines:
            if not line.get_visible():
                continue
            path = line.get_transform().transform_path(line.get_path())
            hit = line.get_linestyle() not in _NO_STYLE and path.intersects_bbox(clip, filled=False)
            if not hit and line.get_marker() not in _NO_STYLE:
                r = renderer.points_to_pixels(line.get_markersize()) / 2
                v = path.vertices
                hit = bool(np.any((v[:, 0] >= clip.x0 - r) & (v[:, 0] <= clip.x1 + r)
                                  & (v[:, 1] >= clip.y0 - r) & (v[:, 1] <= clip.y1 + r)))
            if hit:
                hits.append(_name(line, ax))
        for text in ax.texts:
            if text.get_visible() and text.get_text() and text.get_window_extent(renderer).overlaps(clip):
                hits.append(_name(text, ax))
    return hits


def legend_overlap(ax, *, layout: bool = True) -> list[str]:
    """What the legend of `ax` covers: the drawn lines, markers and texts of any axes of its
    figure that pass under the legend's box, as the figure is laid out when saved.

    Args:
      ax: an Axes; a figure without a legend on it covers nothing.
      layout: run the layout engine first (False when the caller just did).
    Returns:
      one description per covered artist (its label and panel); empty if the legend hides nothing.
    """
    legend = ax.get_legend()
    if legend is None or not legend.get_visible():
        return []
    fig = ax.get_figure(root=True)
    renderer = _layout(fig) if layout else fig.canvas.get_renderer()
    return _covered(legend.get_window_extent(renderer), fig, renderer)


def _twins(ax) -> list:
    """`ax` and the axes drawn in its box (twinx / twiny)."""
    return [a for a in ax.get_figure(root=True).axes if a.bbox.bounds == ax.bbox.bounds]


def _make_headroom(ax, legend, renderer) -> bool:
    """Raise the top of the y range of `ax` and its twins so that their data end below a band
    as tall as the legend (what Fig. 5 leaves by hand). False if the band would take more than
    half the panel, where the data would be squeezed: then the legend goes outside instead."""
    pad = renderer.points_to_pixels(2 * legend.prop.get_size_in_points())
    band = legend.get_window_extent(renderer).height + pad
    keep = 1.0 - band / ax.bbox.height  # share of the height left to the data
    if keep < 0.5:
        return False
    for a in _twins(ax):
        b = a.bbox
        tops = [b.y0]
        for line in a.lines:
            if line.get_visible():
                v = line.get_transform().transform(np.asarray(line.get_xydata(), float))
                v = v[np.all(np.isfinite(v), axis=1) & (v[:, 0] >= b.x0) & (v[:, 0] <= b.x1) & (v[:, 1] <= b.y1)]
                tops += v[:, 1].tolist()
        top = (max(tops) - b.y0) / b.height  # where the data end now, as a share of the height
        scale = a.yaxis.get_transform()  # the axis scale (linear, log, asinh): stretch in its space
        lo, hi = scale.transform(np.asarray(a.get_ylim(), float).reshape(-1, 1)).ravel()
        new_hi = float(scale.inverted().transform([[lo + (hi - lo) * max(top, 1e-3) / keep]])[0, 0])
        if np.isfinite(lo) and hi > lo and np.isfinite(new_hi):  # an inverted or degenerate axis stays
            a.set_ylim(a.get_ylim()[0], new_hi)
    return True


def place_legends(fig: Figure, locs=LEGEND_LOCS) -> None:
    """Move every axes legend of `fig` that covers data where it covers nothing: the first
    free location of `locs`; else the top of the panel after raising its y range (and its
    twins') to leave a band for the legend; else just outside the axes, right side.

    Dense panels have no empty corner and matplotlib's loc="best" then settles for the least
    covered one; here every choice is checked against every drawn line after layout. Headroom
    and outside placement change the layout, so the check is repeated (four rounds at most).
    """
    headroom: set[int] = set()
    for _ in range(4):
        renderer = _layout(fig)
        changed = False
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None or not legend_overlap(ax, layout=False):
                continue
            legend.set_bbox_to_anchor(None)
            for loc in locs:
                legend.set_loc(loc)
                if not _covered(legend.get_window_extent(renderer), fig, renderer):
                    break
            else:
                changed = True
                if id(ax) not in headroom and _make_headroom(ax, legend, renderer):
                    headroom.add(id(ax))
                    legend.set_loc("upper left")
                else:
                    legend.set_loc("upper left")
                    legend.set_bbox_to_anchor((1.02, 1.0), transform=ax.transAxes)
        if not changed:
            return


def _shows_data(artist, ax) -> bool:
    """Whether a drawn artist puts anything inside its axes' box."""
    if not artist.get_visible():
        return False
    if isinstance(artist, Line2D):
        v = artist.get_transform().transform(np.asarray(artist.get_xydata(), float))
        v = v[np.all(np.isfinite(v), axis=1)]
        b = ax.bbox
        return bool(np.any((v[:, 0] >= b.x0 - 0.5) & (v[:, 0] <= b.x1 + 0.5)
                           & (v[:, 1] >= b.y0 - 0.5) & (v[:, 1] <= b.y1 + 0.5)))
    inter = Bbox.intersection(artist.get_window_extent(), ax.bbox)
    return inter is not None and inter.width > 0 and inter.height > 0


def _same_style(entry, artist) -> bool:
    """Whether a legend entry's swatch looks like `artist`."""
    if isinstance(entry, Line2D) and isinstance(artist, Line2D):
        same = np.allclose(to_rgba(entry.get_color()), to_rgba(artist.get_color()))
        same &= (entry.get_linestyle() in _NO_STYLE) == (artist.get_linestyle() in _NO_STYLE)
        same &= entry.get_linestyle() in _NO_STYLE or entry.get_linestyle() == artist.get_linestyle()
        same &= str(entry.get_marker()) == str(artist.get_marker())
        if entry.get_marker() not in _NO_STYLE:
            same &= np.allclose(to_rgba(entry.get_markerfacecolor()), to_rgba(artist.get_markerfacecolor()))
        return bool(same)
    if isinstance(entry, Patch) and isinstance(artist, Patch):
        return bool(np.allclose(to_rgba(entry.get_facecolor()), to_rgba(artist.get_facecolor())))
    return False


def legend_orphans(fig: Figure, *, layout: bool = True) -> list[str]:
    """Legend entries of `fig` (figure and axes legends) that name nothing drawn: the labels
    whose swatch (colour, line style, marker) matches no visible line or patch with data inside
    its axes (after layout, unless `layout` is False because the caller just ran it)."""
    if layout:
        _layout(fig)
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    drawn = [(a, ax) for ax in fig.axes for a in (*ax.lines, *ax.patches)]
    orphans = []
    for legend in legends:
        for entry, text in zip(legend.legend_handles, legend.get_texts()):
            if not any(_same_style(entry, a) and _shows_data(a, ax) for a, ax in drawn):
                orphans.append(text.get_text())
    return orphans


def legend_problems(fig: Figure) -> list[str]:
    """Every legend fault of `fig`, for tests: entries that name nothing drawn, and data covered
    by a legend (axes legends and figure legends)."""
    renderer = _layout(fig)
    problems = [f"legend entry {label!r} matches no drawn artist" for label in legend_orphans(fig, layout=False)]
    for legend in fig.legends:
        problems += [f"figure legend covers {hit}" for hit in _covered(legend.get_window_extent(renderer), fig,
                                                                          renderer)]
    for ax in fig.axes:
        problems += [f"legend of {ax.get_title()[:40]!r} covers {hit}" for hit in legend_overlap(ax, layout=False)]
    return problems


# ----------------------------------------------------------------------------- helpers


def _window(alphas_A: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (alphas_A >= lo) & (alphas_A <= hi)


def _grid_step(alphas_A: np.ndarray) -> float:
    return float(np.max(np.diff(alphas_A))) if alphas_A.size > 1 else 0.0


def _context_label(sweep: dict, j: int, target: int) -> str:
    cc = sweep.get("context_concept")
    if cc is None:
        return f"context $c_{{{j}}}$"
    g = int(cc[j])
    role = ""
    if "P" in sweep and j in set(np.asarray(sweep["P"]).tolist()):
        role = ", in P"
    elif "N" in sweep and j in set(np.asarray(sweep["N"]).tolist()):
        role = ", in N"
    tag = " = target" if g == target else ""
    return f"context $c_{{{j}}}$ (concept {g}{tag}{role})"


def _concept_colors(G: int, target: int):
    """Target concept in warm colours, every other concept in its own cool colour map."""
    cmaps = ["Blues", "Greens", "Purples", "Greys", "BuGn", "PuBu"]
    out, k = {}, 0
    for g in range(G):
        if g == target:
            out[g] = matplotlib.colormaps["Reds"]
        else:
            out[g] = matplotlib.colormaps[cmaps[k % len(cmaps)]]
            k += 1
    return out


def _token_colors(concept_of_V: np.ndarray, target: int) -> dict[int, tuple]:
    G = int(concept_of_V.max()) + 1
    cmaps = _concept_colors(G, target)
    colors = {}
    for g in range(G):
        members = np.flatnonzero(concept_of_V == g)
        shades = np.linspace(0.9, 0.5, members.size) if members.size > 1 else [0.75]
        for z, s in zip(members, shades):
            colors[int(z)] = cmaps[g](s)
    return colors


def _concept_line_colors(G: int, target: int) -> list:
    cmaps = _concept_colors(G, target)
    return [cmaps[g](0.8) for g in range(G)]


def _with_subtitle(title: str, subtitle: str | None) -> str:
    return title if not subtitle else f"{title}\n{subtitle}"


def _order_text(peaks_V: np.ndarray, is_target_V: np.ndarray, lo: float, hi: float, step: float) -> str:
    """Thm 3.3's peak order in one context, restricted to peaks inside the drawn range (more
    than half a grid step from its ends: a token largest at alpha = 0 has no peak in a half)."""
    def inside(x):
        return x[np.isfinite(x) & (x > lo + 0.5 * step) & (x < hi - 0.5 * step)]

    def fmt(x):
        return f"{round(float(x), 3) + 0.0:.3f}"

    def span(x):
        return f"at {fmt(x[0])}" if fmt(x.min()) == fmt(x.max()) else f"in [{fmt(x.min())}, {fmt(x.max())}]"

    off, on = inside(peaks_V[~is_target_V]), inside(peaks_V[is_target_V])
    if off.size and on.size:
        return f"off-target peaks \u2264 {fmt(off.max())} < {fmt(on.min())} \u2264 target peaks"
    if off.size:
        return f"off-target peaks {span(off)}, no target peak"
    if on.size:
        return f"target peaks {span(on)}, no off-target peak"
    n_edge = int(np.sum(np.isfinite(peaks_V) & (np.abs(peaks_V) <= 0.5 * step)))
    return "no peak in this range" + (f" ({n_edge} token{'s' if n_edge > 1 else ''} largest at \u03b1 = 0)"
                                      if n_edge else "")


def _marked_peak(alphas_A, slope_A, a_star: float, lo: float, hi: float, noise: float) -> bool:
    """Whether a theory peak alpha_(j,z) is a peak of the drawn curve: inside [lo, hi] by more
    than half a grid step (a maximum at an end is where a monotone piece starts, not a bump),
    and the kernel's slope turns from + to - within a grid step of it by more than rounding
    (the test of `ufmjax.analysis.find_peaks`), so a flat curve has none."""
    step = _grid_step(alphas_A)
    if not (np.isfinite(a_star) and lo + 0.5 * step < a_star < hi - 0.5 * step):
        return False
    near = np.flatnonzero(np.abs(alphas_A - a_star) <= step * (1 + 1e-9))
    near = np.arange(max(near.min() - 1, 0), min(near.max() + 1, alphas_A.size - 1) + 1) if near.size else near
    s = slope_A[near]
    return bool(np.any((s[:-1] > 0) & (s[1:] < 0) & (s[:-1] - s[1:] > noise)))


def _coincident_groups(curves_KxN: np.ndarray, tol: float) -> list[list[int]]:
    """Curves (rows) within tol of each other everywhere, grouped; first members first."""
    groups: list[list[int]] = []
    for k in range(curves_KxN.shape[0]):
        for g in groups:
            if np.max(np.abs(curves_KxN[k] - curves_KxN[g[0]])) <= tol:
                g.append(k)
                break
        else:
            groups.append([k])
    return groups


def _tokens_label(zs: list[int], concept_of_V: np.ndarray, target: int) -> str:
    """Legend label of one drawn curve: its token(s), concept(s), and whether they coincide."""
    gs = sorted({int(concept_of_V[z]) for z in zs})
    role = "target, " if gs == [target] else ""
    concepts = f"concept {gs[0]}" if len(gs) == 1 else "concepts " + ", ".join(map(str, gs))
    if len(zs) == 1:
        return f"z={zs[0]} ({concepts}{', target' if role else ''})"
    return f"z={', '.join(map(str, zs))} ({concepts}, {role}identical curves)"


def _slope_zero(a0, a1, d0, d1, s0=None, s1=None) -> float:
    """Zero of the kernel's slope between two grid points: the root of the cubic Hermite
    interpolant of (slope, second derivative) when both are known (O(h^4)), else linear."""
    h = a1 - a0
    if s0 is not None and s1 is not None:
        # Hermite basis in t in [0, 1]: d(t) = c3 t^3 + c2 t^2 + c1 t + c0.
        c0, c1 = d0, h * s0
        c2 = -3 * d0 - 2 * h * s0 + 3 * d1 - h * s1
        c3 = 2 * d0 + h * s0 - 2 * d1 + h * s1
        roots = np.roots([c3, c2, c1, c0])
        real = roots[(np.abs(roots.imag) < 1e-9) & (roots.real >= -1e-9) & (roots.real <= 1 + 1e-9)].real
        if real.size:
            return float(a0 + h * real[np.argmin(np.abs(real - d0 / (d0 - d1 if d0 != d1 else 1.0)))])
    return float(a0 + h * d0 / (d0 - d1)) if d0 != d1 else float(a0 + 0.5 * h)


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


# ----------------------------------------------------------------------------- Thm 3.3


def check_token_bumps(sweep: dict, peaks_MxV, *, target: int, sign: int = 1,
                      delta_p_theory_AxMxK=None) -> dict:
    """Numbers behind Fig. 3 (sign=+1) and Fig. B.1 (sign=-1), over every context.

    Args:
      sweep: sweep result with alphas, tokens, concept_of, delta_p and d_delta_p.
      peaks_MxV: theory peak strengths alpha_(j,z) (theory.peak_strengths), +-inf for
        extremal tokens.
      target: the target concept T.
      sign: +1 for the alpha >= 0 half of the grid, -1 for alpha <= 0.
      delta_p_theory_AxMxK: optional Lemma B.3 values of delta_p on the sweep's grid.
    Returns:
      dict with n_bumps (peaks strictly inside this half of the grid), n_peaks_at_0 (peaks
      within half a grid step of 0, in neither half), n_monotone (tokens with an infinite
      peak: increasing or decreasing on all of R), kernel_peak_max_err (|zero of the kernel's d delta_p, linearly
      interpolated on the grid - alpha_(j,z)|), grid_step, slope_sign_violations (grid points
      where the kernel's slope has the wrong sign for a bump), off_target_before_target (in
      every context each off-target peak precedes each target peak, Thm 3.3), order_margin
      (min over contexts of first target peak - last off-target peak) and, if given,
      max_abs_err_vs_lemma_b3.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    alphas = np.asarray(sweep["alphas"], np.float64)
    tokens = np.asarray(sweep["tokens"])
    concept_of = np.asarray(sweep["concept_of"])
    dp = np.asarray(sweep["delta_p"], np.float64)
    if "d_delta_p" not in sweep:
        raise ValueError("the sweep must carry first derivatives (derivatives >= 1)")
    ddp = np.asarray(sweep["d_delta_p"], np.float64)
    d2dp = np.asarray(sweep["d2_delta_p"], np.float64) if "d2_delta_p" in sweep else None
    peaks = np.asarray(peaks_MxV, np.float64)
    m = dp.shape[1]
    if peaks.shape != (m, concept_of.size):
        raise ValueError(f"peaks_MxV must have shape {(m, concept_of.size)}, got {peaks.shape}")
    half = sign * alphas >= 0
    a_half = alphas[half]
    lo, hi = float(a_half.min()), float(a_half.max())

    pk_MxK = peaks[:, tokens]
    step = _grid_step(alphas)
    # A peak within half a grid step of 0 (e.g. exactly 0 in exact arithmetic, +-1e-6 after
    # float32 training) belongs to neither half: counted apart, so counts do not flicker.
    at_zero = np.isfinite(pk_MxK) & (np.abs(pk_MxK) < 0.5 * step)
    inside = np.isfinite(pk_MxK) & ~at_zero & (sign * pk_MxK > 0) & (pk_MxK > alphas[0]) \
        & (pk_MxK < alphas[-1]) & (pk_MxK >= lo) & (pk_MxK <= hi)
    errs, violations = [], 0
    for j, k in zip(*np.nonzero(inside)):
        a_star = pk_MxK[j, k]
        d = ddp[:, j, k]
        i = int(np.searchsorted(alphas, a_star, side="right") - 1)
        cross = _slope_zero(alphas[i], alphas[i + 1], d[i], d[i + 1],
                            None if d2dp is None else d2dp[i, j, k], None if d2dp is None else d2dp[i + 1, j, k])
        errs.append(abs(cross - a_star))
        # Lemma B.5: increasing before alpha_(j,z), decreasing after.
        tol = SLOPE_RTOL * np.max(np.abs(d))
        want = np.sign(a_star - alphas)
        violations += int(np.sum((np.abs(d) > tol) & (np.sign(d) != want) & (want != 0)))

    T = concept_of == target
    ordered, margins = [], []
    for j in range(m):
        pj = peaks[j]
        if np.any(np.isnan(pj)) or not T.any() or T.all():
            continue
        last_off, first_target = np.max(pj[~T]), np.min(pj[T])
        ordered.append(bool(last_off < first_target))
        if np.isfinite(last_off) and np.isfinite(first_target):
            margins.append(first_target - last_off)
    out = {
        "half": "alpha >= 0" if sign > 0 else "alpha <= 0",
        "n_bumps": int(inside.sum()),
        "n_bumps_target": int(inside[:, T[tokens]].sum()),
        "n_bumps_off_target": int(inside[:, ~T[tokens]].sum()),
        "n_peaks_at_0": int(at_zero.sum()),
        "n_monotone": int(np.sum(np.isinf(pk_MxK))),
        "kernel_peak_max_err": float(max(errs)) if errs else 0.0,
        "grid_step": step,
        "slope_sign_violations": violations,
        "contexts_checked_for_order": len(ordered),
        "off_target_before_target": bool(all(ordered)) if ordered else None,
        "order_margin": _finite_or_none(min(margins)) if margins else None,
    }
    if delta_p_theory_AxMxK is not None:
        th = np.asarray(delta_p_theory_AxMxK, np.float64)
        if th.shape != dp.shape:
            raise ValueError(f"delta_p_theory_AxMxK must have shape {dp.shape}, got {th.shape}")
        out["max_abs_err_vs_lemma_b3"] = float(np.max(np.abs(dp - th)))
    return out


def fig_token_bumps(sweep: dict, peaks_MxV, *, target: int, contexts, sign: int = 1,
                    alpha_max: float | None = None, delta_p_theory_AxMxK=None,
                    title: str | None = None, subtitle: str | None = None) -> tuple[Figure, dict]:
    """Fig. 3 (sign=+1) / Fig. B.1 (sign=-1): token bumps Δp(z|c_j, alpha) with peaks marked.

    Args:
      sweep: sweep result (delta_p over all or some tokens, d_delta_p).
      peaks_MxV: theory.peak_strengths of the model's own probabilities.
      target: target concept; its tokens are drawn solid in warm colours, off-target
        tokens dashed in cool colours.
      contexts: context indices, one panel each.
      sign: which half of the grid to draw.
      alpha_max: draw |alpha| up to this (default: the whole half-grid).
      delta_p_theory_AxMxK: optional Lemma B.3 values for the numbers.
      title: figure title (default cites the paper's figure); subtitle: a second line
        (e.g. the model and data).
    Returns:
      (figure, check_token_bumps numbers plus `contexts_shown`, `n_bumps_shown` (peaks marked),
      `curves_shown` (the tokens of each drawn curve) and `alpha_window`).

    Tokens whose curves coincide in every panel (within COINCIDE_RTOL of the largest |Δp|, as
    every token of a concept does under uniform profiles) are drawn once, with one legend entry
    that names them all. A peak is marked only where the drawn curve has one (`_marked_peak`):
    strictly inside the window by more than half a grid step, with the kernel's slope turning
    from + to - there; a token largest at alpha = 0 (the end of either half) has none.
    """
    numbers = check_token_bumps(sweep, peaks_MxV, target=target, sign=sign,
                                delta_p_theory_AxMxK=delta_p_theory_AxMxK)
    alphas = np.asarray(sweep["alphas"], np.float64)
    tokens = np.asarray(sweep["tokens"])
    concept_of = np.asarray(sweep["concept_of"])
    dp = np.asarray(sweep["delta_p"], np.float64)
    peaks = np.asarray(peaks_MxV, np.float64)
    contexts = [int(j) for j in np.atleast_1d(contexts)]
    if not contexts or min(contexts) < 0 or max(contexts) >= dp.shape[1]:
        raise ValueError(f"contexts must be context indices in [0, {dp.shape[1]})")
    extent = float(np.max(sign * alphas)) if alpha_max is None else float(alpha_max)
    if not extent > 0:
        raise ValueError(f"the sweep has no alpha on the {'positive' if sign > 0 else 'negative'} side")
    lo, hi = (0.0, extent) if sign > 0 else (-extent, 0.0)
    win = _window(alphas, lo, hi)
    colors = _token_colors(concept_of, target)
    T = concept_of == target

    slope = np.asarray(sweep["d_delta_p"])
    eps = np.finfo(slope.dtype).eps if np.issubdtype(slope.dtype, np.floating) else np.finfo(np.float64).eps
    slope = slope.astype(np.float64)
    step = _grid_step(alphas)
    # Tokens whose curves coincide in every drawn panel (uniform profiles) are one line, one entry.
    curves = dp[win][:, contexts, :].transpose(2, 0, 1).reshape(tokens.size, -1)
    groups = _coincident_groups(curves, COINCIDE_RTOL * max(float(np.abs(curves).max()), 1e-300))

    n = len(contexts)
    fig = new_figure((4.6 * n + 1.6, 3.9))
    with matplotlib.rc_context(STYLE):
        axes = np.atleast_1d(fig.subplots(1, n, sharey=False, squeeze=False)[0])
        shown, peak_marker = 0, None
        for ax, j in zip(axes, contexts):
            ax.axhline(0.0, color="0.4", lw=0.6, zorder=0)
            for group in groups:
                k = group[0]
                z = int(tokens[k])
                on = bool(T[z])
                label = _tokens_label([int(tokens[i]) for i in group], concept_of, target)
                ax.plot(alphas[win], dp[win, j, k], color=colors[z], ls="-" if on else "--",
                        lw=1.7 if on else 1.3, label=label)
                a_star = peaks[j, z]
                noise = eps * 1e3 * float(np.abs(slope[:, j, k]).max())
                if _marked_peak(alphas, slope[:, j, k], a_star, lo, hi, noise):
                    y = np.interp(a_star, alphas, dp[:, j, k])
                    marker, = ax.plot([a_star], [y], "o", ms=5.5, mfc=colors[z], mec="black", mew=0.8, zorder=5)
                    peak_marker = marker if peak_marker is None else peak_marker
                    shown += 1
            order = _order_text(peaks[j], T, lo, hi, step)
            ax.set_xlim(lo, hi)
            ax.set_title(_context_label(sweep, j, target) + "\n" + order)
            ax.set_xlabel(r"steering strength $\alpha$ (dimensionless)")
        axes[0].set_ylabel(r"$\Delta p(z \mid c_j, \alpha)$ (probability)")
        # Every entry is a drawn line (solid: target-concept tokens, dashed: off-target), and
        # the peak entry one of the drawn peak markers, so no entry names something not drawn.
        handles, labels = axes[0].get_legend_handles_labels()
        if peak_marker is not None:
            handles.append(peak_marker)
            labels.append(r"peak $\alpha_{(j,z)}$ (Thm 3.3)")
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        side = r"$\alpha \geq 0$" if sign > 0 else r"$\alpha \leq 0$"
        default = (f"Fig. 3 ({PAPER}): token bumps, {side}" if sign > 0
                   else f"Fig. B.1 ({PAPER}): token bumps, negative steering {side}")
        fig.suptitle(_with_subtitle(title or default, subtitle))
    place_legends(fig)
    numbers["contexts_shown"] = contexts
    numbers["n_bumps_shown"] = shown
    numbers["curves_shown"] = [[int(tokens[i]) for i in g] for g in groups]
    numbers["alpha_window"] = [lo, hi]
    return fig, numbers


# ----------------------------------------------------------------------------- Thm 3.6


def check_concept_curves(sweep: dict, tanh_AxMxG, *, target: int) -> dict:
    """Numbers behind Fig. 4: the kernel's Δp(C|c_j, alpha) against Thm 3.6's tanh form.

    Returns max_abs_err_vs_tanh (over all alphas, contexts, concepts), the same relative to
    the largest |Δp(C)|, target_min_slope (the smallest d Δp(T|c_j)/d alpha of the kernel:
    the target concept rises on all of R, so it is >= 0 up to rounding) and
    target_increasing (target_min_slope >= -1e-6 * the largest slope).
    """
    dpc = np.asarray(sweep["delta_p_concept"], np.float64)
    th = np.asarray(tanh_AxMxG, np.float64)
    if th.shape != dpc.shape:
        raise ValueError(f"tanh_AxMxG must have shape {dpc.shape}, got {th.shape}")
    err = np.abs(dpc - th)
    out = {
        "max_abs_err_vs_tanh": float(err.max()),
        "max_rel_err_vs_tanh": float(err.max() / max(np.abs(dpc).max(), 1e-300)),
        "alpha_range": [float(sweep["alphas"][0]), float(sweep["alphas"][-1])],
    }
    if "d_delta_p_concept" in sweep:
        slope = np.asarray(sweep["d_delta_p_concept"], np.float64)[:, :, target]
        out["target_min_slope"] = float(slope.min())
        out["target_increasing"] = bool(slope.min() >= -1e-6 * max(np.abs(slope).max(), 1e-300))
    return out


def fig_concept_curves(sweep: dict, tanh_AxMxG, *, target: int, contexts,
                       alpha_max: float | None = None, title: str | None = None,
                       subtitle: str | None = None) -> tuple[Figure, dict]:
    """Fig. 4: concept curves Δp(C|c_j, alpha), kernel solid, Thm 3.6's tanh form dashed.

    Args:
      sweep: sweep result with delta_p_concept (and d_delta_p_concept for the slope check).
      tanh_AxMxG: theory.tanh_representation on the sweep's grid.
      target: target concept.
      contexts: context indices, one panel each.
      alpha_max: draw |alpha| up to this (default: the whole grid).
    Returns:
      (figure, check_concept_curves numbers).
    """
    numbers = check_concept_curves(sweep, tanh_AxMxG, target=target)
    alphas = np.asarray(sweep["alphas"], np.float64)
    dpc = np.asarray(sweep["delta_p_concept"], np.float64)
    th = np.asarray(tanh_AxMxG, np.float64)
    G = dpc.shape[2]
    contexts = [int(j) for j in np.atleast_1d(contexts)]
    if not contexts or min(contexts) < 0 or max(contexts) >= dpc.shape[1]:
        raise ValueError(f"contexts must be context indices in [0, {dpc.shape[1]})")
    extent = float(np.max(np.abs(alphas))) if alpha_max is None else float(alpha_max)
    win = _window(alphas, -extent, extent)
    colors = _concept_line_colors(G, target)
    n = len(contexts)
    fig = new_figure((4.2 * n + 1.8, 3.8))
    with matplotlib.rc_context(STYLE):
        axes = np.atleast_1d(fig.subplots(1, n, sharey=True, squeeze=False)[0])
        for ax, j in zip(axes, contexts):
            ax.axhline(0.0, color="0.4", lw=0.6, zorder=0)
            ax.axvline(0.0, color="0.4", lw=0.6, zorder=0)
            for g in range(G):
                ax.plot(alphas[win], dpc[win, j, g], color=colors[g], lw=2.4 if g == target else 1.8,
                        label=f"concept {g}" + (" (target)" if g == target else "") + ", sweep kernel")
                ax.plot(alphas[win], th[win, j, g], color="black", ls=(0, (3, 2)), lw=0.9,
                        label="tanh form (Thm 3.6)" if g == 0 else None)
            e = np.max(np.abs(dpc[:, j] - th[:, j]))
            ax.set_xlim(-extent, extent)
            ax.set_title(_context_label(sweep, j, target) + f"\nmax |kernel \u2212 tanh| = {e:.1e}")
            ax.set_xlabel(r"steering strength $\alpha$ (dimensionless)")
        axes[0].set_ylabel(r"$\Delta p(C \mid c_j, \alpha)$ (probability per token)")
        # Entries are drawn lines only: the kernel's curve per concept, then the tanh form.
        handles, labels = axes[0].get_legend_handles_labels()
        tanh = labels.index("tanh form (Thm 3.6)")
        handles.append(handles.pop(tanh))
        labels.append(labels.pop(tanh))
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        fig.suptitle(_with_subtitle(
            title or f"Fig. 4 ({PAPER}): concept curves, kernel vs tanh representation", subtitle))
    place_legends(fig)
    numbers["contexts_shown"] = contexts
    return fig, numbers


# ----------------------------------------------------------------------------- Thm 3.8


def _departure(alphas: np.ndarray, rel: np.ndarray, side: int) -> float | None:
    """Smallest |alpha| on one side where ΔCE leaves its quadratic law by DEPARTURE."""
    sel = (side * alphas > 0)
    a, r = side * alphas[sel], rel[sel]
    order = np.argsort(a)
    a, r = a[order], r[order]
    bad = np.flatnonzero(r > DEPARTURE)
    return float(side * a[bad[0]]) if bad.size else None


def check_delta_ce(near: dict, wide: dict | None, curvature: float, *,
                   delta_ce_theory_near=None, delta_ce_theory_wide=None) -> dict:
    """Numbers behind Fig. 5: ΔCE against (1/2) c alpha^2 with c = sum_j pi_j Var_j(M).

    Returns curvature, kernel_curvature (the kernel's d2 ΔCE at alpha = 0) and their relative
    gap, kernel_slope_at_0 (d ΔCE at 0: 0 under Assumption 2; with ce_against="data" it is
    the training error), max_rel_err_quadratic_within_{0.1,0.3,1,3} (|ΔCE - quad| / quad
    over 0 < |alpha| <= r, near and wide grids together), departure_alpha_{neg,pos} (first
    |alpha| on each side where that relative gap exceeds DEPARTURE), max_delta_ce (nats)
    and, if given, max |kernel - theory| on each grid.
    """
    c = float(curvature)
    if not (np.isfinite(c) and c > 0):
        raise ValueError(f"curvature must be a positive number, got {curvature!r}")
    a = np.asarray(near["alphas"], np.float64)
    dce = np.asarray(near["delta_ce"], np.float64)
    zero = np.flatnonzero(a == 0.0)
    out: dict = {"curvature": c, "departure_threshold": DEPARTURE}
    if zero.size and "d2_delta_ce" in near:
        kc = float(near["d2_delta_ce"][zero[0]])
        out["kernel_curvature"] = kc
        out["kernel_curvature_rel_err"] = abs(kc - c) / c
        out["kernel_slope_at_0"] = float(near["d_delta_ce"][zero[0]])
    quad = 0.5 * c * a * a
    nz = a != 0
    rel = np.abs(dce[nz] - quad[nz]) / quad[nz]
    src_a = a[nz]
    if wide is not None:
        # The near grid resolves the departure point finely; the wide one reaches further.
        wa = np.asarray(wide["alphas"], np.float64)
        far = np.abs(wa) > np.abs(a).max()
        wq = 0.5 * c * wa[far] ** 2
        rel = np.concatenate([rel, np.abs(np.asarray(wide["delta_ce"], np.float64)[far] - wq) / wq])
        src_a = np.concatenate([src_a, wa[far]])
    for r in (0.1, 0.3, 1.0, 3.0):
        sel = np.abs(src_a) <= r + 1e-12
        out[f"max_rel_err_quadratic_within_{r:g}"] = float(np.max(rel[sel])) if sel.any() else None
    src_rel = rel
    out["max_delta_ce"] = float(max(dce.max(), np.max(wide["delta_ce"]) if wide is not None else -np.inf))
    out["departure_alpha_neg"] = _departure(src_a, src_rel, -1)
    out["departure_alpha_pos"] = _departure(src_a, src_rel, 1)
    if delta_ce_theory_near is not None:
        out["max_abs_err_vs_theory_near"] = float(np.max(np.abs(dce - np.asarray(delta_ce_theory_near))))
    if wide is not None and delta_ce_theory_wide is not None:
        out["max_abs_err_vs_theory_wide"] = float(
            np.max(np.abs(np.asarray(wide["delta_ce"], np.float64) - np.asarray(delta_ce_theory_wide))))
    return out


def fig_delta_ce(near: dict, wide: dict | None, curvature: float, *, delta_ce_theory_near=None,
                 delta_ce_theory_wide=None, ratio_alpha: float | None = None, title: str | None = None,
                 subtitle: str | None = None) -> tuple[Figure, dict]:
    """Fig. 5: ΔCE near 0 with the quadratic law (1/2) c alpha^2 (Thm 3.8), and where it departs.

    Args:
      near: sweep on a fine grid around 0 (must contain alpha = 0 for the curvature check).
      wide: optional sweep on a wider grid: a second panel shows where the law departs, a
        third the ratio ΔCE / quadratic.
      curvature: theory.ce_curvature of the model's own probabilities.
      ratio_alpha: the ratio panel spans [-ratio_alpha, ratio_alpha] (default: a third of
        the wide grid, where the ratio's structure lies).
    Returns:
      (figure, check_delta_ce numbers).
    """
    numbers = check_delta_ce(near, wide, curvature, delta_ce_theory_near=delta_ce_theory_near,
                             delta_ce_theory_wide=delta_ce_theory_wide)
    c = float(curvature)
    a = np.asarray(near["alphas"], np.float64)
    dce = np.asarray(near["delta_ce"], np.float64)
    n = 1 if wide is None else 3
    fig = new_figure((3.9 * n + 0.4, 3.6))
    law = r"$\frac{1}{2}\,c\,\alpha^2$, $c=\sum_j \pi_j \mathrm{Var}_j(M)$" + f" = {c:.4g}"
    with matplotlib.rc_context(STYLE):
        axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
        ax = axes[0]
        ax.plot(a, dce, color="tab:blue", lw=2.2, label=r"$\Delta$CE (sweep kernel)")
        ax.plot(a, 0.5 * c * a * a, color="black", ls=(0, (3, 2)), lw=1.0, label=law)
        ax.set_xlim(a.min(), a.max())
        ax.set_title(r"near $\alpha = 0$: quadratic law (Thm 3.8)")
        ax.set_xlabel(r"steering strength $\alpha$ (dimensionless)")
        ax.set_ylabel(r"$\Delta\mathrm{CE}(\alpha)$ (nats)")
        ax.legend(loc="upper center", frameon=False)
        if wide is not None:
            wa = np.asarray(wide["alphas"], np.float64)
            wd = np.asarray(wide["delta_ce"], np.float64)
            wq = 0.5 * c * wa * wa
            ax = axes[1]
            ax.plot(wa, wd, color="tab:blue", lw=2.2, label=r"$\Delta$CE (sweep kernel)")
            ax.plot(wa, wq, color="black", ls=(0, (3, 2)), lw=1.0, label=r"$\frac{1}{2}c\alpha^2$")
            ax.axvspan(a.min(), a.max(), color="0.85", alpha=0.6, lw=0, label="left panel's range")
            ax.set_ylim(-0.04 * wd.max(), 1.5 * wd.max())  # headroom for the legend
            ax.set_xlim(wa.min(), wa.max())
            ax.set_title("wider range: the law is local only")
            ax.set_xlabel(r"steering strength $\alpha$ (dimensionless)")
            ax.set_ylabel(r"$\Delta\mathrm{CE}(\alpha)$ (nats)")
            ax.legend(loc="upper left", frameon=True, framealpha=0.95, edgecolor="none")
            ax = axes[2]
            nz = wa != 0
            ax.plot(wa[nz], wd[nz] / wq[nz], color="tab:blue", lw=1.8)
            ax.axhline(1.0, color="black", ls=(0, (3, 2)), lw=1.0)
            ax.axhspan(1 - DEPARTURE, 1 + DEPARTURE, color="tab:green", alpha=0.12, lw=0,
                       label=f"within {DEPARTURE:.0%} of the law")
            for key in ("departure_alpha_neg", "departure_alpha_pos"):
                if numbers[key] is not None:
                    ax.axvline(numbers[key], color="tab:red", lw=0.9, ls=":")
            neg, pos = numbers["departure_alpha_neg"], numbers["departure_alpha_pos"]
            ax.text(0.98, 0.97, "departs (>{:.0%}) at\nα = {} and {}".format(
                DEPARTURE, "n/a" if neg is None else f"{neg:.3g}", "n/a" if pos is None else f"{pos:.3g}"),
                transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.8", alpha=0.9))
            r_ext = float(np.max(np.abs(wa))) / 3 if ratio_alpha is None else float(ratio_alpha)
            ax.set_xlim(-r_ext, r_ext)
            ax.set_ylim(0, max(1.6, 1.1 * float(np.max((wd[nz] / wq[nz])[np.abs(wa[nz]) <= r_ext]))))
            ax.set_title(r"ratio $\Delta\mathrm{CE} \,/\, \frac{1}{2}c\alpha^2$")
            ax.set_xlabel(r"steering strength $\alpha$ (dimensionless)")
            ax.set_ylabel("ratio (dimensionless)")
            ax.legend(loc="lower center", frameon=False)
        fig.suptitle(_with_subtitle(title or f"Fig. 5 ({PAPER}): cross-entropy cost of steering", subtitle))
    place_legends(fig)
    return fig, numbers
