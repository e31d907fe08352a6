"""Peak strengths of token bumps, found from the sweep kernel's own derivatives (Thm 3.3).

Shape legend: A = alphas of the bracketing grid, M = rows, K = tracked tokens, J = bumps.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ufmjax.steering import Steered
from ufmjax.kernel import check_alphas, sweep


def find_peaks(steered: Steered, alphas, *, concept_of, tokens=None, tol: float = 1e-12,
               max_steps: int = 60, dtype=jnp.float32) -> np.ndarray:
    """Peak strengths alpha_(j,z) of the token bumps, from the kernel's derivatives.

    A bump peaks where d delta_p / d alpha changes sign from + to - (Thm 3.3: at most once).
    The first such change on the grid brackets the peak; a safeguarded Newton iteration on the
    slope (its derivative is the kernel's second derivative) shrinks the bracket, falling back
    to bisection whenever the Newton step would leave it, so it converges even where the slope
    is convex. All bumps are refined together: one kernel call per iteration.

    Args:
      steered, concept_of, tokens, dtype: as for `ufmjax.kernel.sweep`.
      alphas: the grid that brackets the peaks.
      tol: stop once every bracket or Newton step is below tol * (1 + |alpha|).
      max_steps: most iterations.
    Returns:
      [M, K] peak alphas; NaN where the grid holds no interior maximum (monotone tokens).
    """
    alphas = check_alphas(alphas)
    grid = sweep(steered, alphas, concept_of=concept_of, tokens=tokens, derivatives=1, dtype=dtype)
    slope_AxMxK = grid["d_delta_p"]
    # A real sign change, not rounding: once all mass sits on an extremal token its slope is
    # 0 up to a few ulps of either sign, which must not count as a peak.
    noise = np.finfo(slope_AxMxK.dtype).eps * 1e3 * np.abs(slope_AxMxK).max(axis=0)
    s0, s1 = slope_AxMxK[:-1], slope_AxMxK[1:]
    change = (s0 > 0) & (s1 < 0) & (s0 - s1 > noise)
    peaks = np.full(slope_AxMxK.shape[1:], np.nan)
    rows, cols = np.nonzero(change.any(axis=0))
    if rows.size == 0:
        return peaks
    first = np.argmax(change, axis=0)[rows, cols]
    lo, hi = alphas[first].copy(), alphas[first + 1].copy()
    tok = np.arange(slope_AxMxK.shape[2]) if tokens is None else np.asarray(tokens)
    x = 0.5 * (lo + hi)
    idx = np.arange(x.size)
    for _ in range(max_steps):
        at = sweep(steered, x, concept_of=concept_of, tokens=tok, derivatives=2, dtype=dtype)
        f = at["d_delta_p"][idx, rows, cols]
        df = at["d2_delta_p"][idx, rows, cols]
        # Keep f(lo) > 0 >= f(hi): the peak stays inside [lo, hi].
        lo = np.where(f > 0, x, lo)
        hi = np.where(f > 0, hi, x)
        newton = x - f / np.where(df != 0, df, -np.inf)
        inside = (df < 0) & (newton > lo) & (newton < hi)
        new = np.where(inside, newton, 0.5 * (lo + hi))
        done = np.abs(new - x) <= tol * (1 + np.abs(x))
        x = new
        if np.all(done | (hi - lo <= tol * (1 + np.abs(x)))):
            break
    peaks[rows, cols] = x
    return peaks
