"""Alpha grids and output sizes, in numpy alone: the CLI checks a grid and sizes a sweep's
output before it imports JAX, so a request that cannot run is refused at once.

Shape legend: A = alphas, M = rows, V = vocabulary, G = concepts, K = tracked tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The quantities every sweep returns, by name, with their shape per alpha (letters of the
# legend; "" a scalar). `kernel.measure` computes them.
QUANTITIES = {
    "delta_p": "MxK",          # Def. 3.1: steered minus base probability of each tracked token
    "concept_prob": "MxG",     # F_C(alpha) = sum_{z in C} p_alpha(z)
    "delta_p_concept": "MxG",  # Def. 3.5: (F_C(alpha) - F_C(0)) / |C|
    "delta_ce": "",            # Def. 3.7: sum_j w_j (CE_j(alpha) - CE_j(0))
    "delta_ce_ctx": "M",       # CE_j(alpha) - CE_j(0), per row
    "kl": "M",                 # KL(p_alpha || p_0) per row
    "entropy": "M",            # H(p_alpha) per row
}
# Key prefixes of the value and of the first and second derivatives in alpha.
PREFIXES = ("", "d_", "d2_")


def check_alphas(alphas) -> np.ndarray:
    """A 1-D, non-empty, finite grid of real alphas (as float64 numpy), else ValueError naming alphas.

    Any order is accepted: each alpha is evaluated on its own, and point evaluations (Newton
    iterates of `analysis.find_peaks`, the optimiser's points) are not sorted. Grids that a
    sweep file is made of go through `check_grid`, which also wants them increasing.
    """
    raw = np.asarray(alphas)
    if raw.dtype.kind == "c":
        raise ValueError("alphas must be real numbers, got complex values (a complex alpha is not a steering "
                         "strength; take .real explicitly if that is what is meant)")
    # ml_dtypes' floats (bfloat16, float8_*) are kind "V" in numpy, but real numbers all the same.
    if raw.dtype.kind not in "iufO" and not raw.dtype.name.startswith(("float", "bfloat")):
        raise ValueError(f"alphas must be real numbers, got an array of {raw.dtype}")
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("alphas must be real numbers, got values that are not numbers") from None
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"alphas must be a non-empty 1-D grid, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("alphas must be finite (found NaN or inf)")
    return arr


def check_grid(alphas) -> np.ndarray:
    """`check_alphas`, and strictly increasing: the grid of a sweep (its ends are where
    `top_tokens` looks, its neighbours bracket the local UFM's validity range), as the CLI's
    START:STOP:NUM always is."""
    arr = check_alphas(alphas)
    bad = np.flatnonzero(np.diff(arr) <= 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"alphas must be a strictly increasing grid, got alphas[{i}] = {arr[i]:.17g} >= "
                         f"alphas[{i + 1}] = {arr[i + 1]:.17g} (sort it, or use kernel.sweep for points)")
    return arr


@dataclass(frozen=True)
class Grid:
    """NUM evenly spaced alphas from START to STOP (both included), checked but not built, so
    a sweep can size its output (`size`) before `values()` allocates NUM float64s."""

    start: float
    stop: float
    num: int

    @property
    def size(self) -> int:
        return self.num

    def values(self) -> np.ndarray:
        """The grid, as np.linspace(start, stop, num) [A]."""
        return check_grid(np.linspace(self.start, self.stop, self.num))


def parse_grid(spec: str) -> Grid:
    """'START:STOP:NUM' -> a checked `Grid` (nothing allocated), else ValueError naming alphas."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"alphas must be START:STOP:NUM, got {spec!r}")
    try:
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"alphas must be START:STOP:NUM with numbers (NUM an integer), got {spec!r}") from None
    if num < 1:
        raise ValueError(f"alphas NUM must be >= 1, got {num}")
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ValueError(f"alphas START and STOP must be finite, got {spec!r}")
    if num > 1:
        if stop <= start:
            raise ValueError(f"alphas STOP must exceed START (the grid is increasing), got {spec!r}")
        if not math.isfinite(stop - start):
            # np.linspace would compute STOP - START = inf and fill the grid with inf and NaN.
            raise ValueError(f"alphas START:STOP spans more than float64 holds (STOP - START overflows), "
                             f"got {spec!r}: use a narrower range")
        if (stop - start) / (num - 1) < np.spacing(max(abs(start), abs(stop))):
            raise ValueError(f"alphas START:STOP is too narrow for NUM distinct float64 values, got {spec!r}")
    return Grid(start, stop, num)


def parse_alphas(spec: str) -> np.ndarray:
    """'START:STOP:NUM' -> NUM evenly spaced alphas from START to STOP, both included."""
    return parse_grid(spec).values()


def grid_size(alphas) -> int:
    """How many alphas a grid (array-like or `Grid`) holds, without building a Grid."""
    return alphas.size if isinstance(alphas, Grid) else int(np.size(alphas))


def grid_values(alphas) -> np.ndarray:
    """A grid (array-like or `Grid`) as a checked, strictly increasing float64 array."""
    return alphas.values() if isinstance(alphas, Grid) else check_grid(alphas)


def check_order(order) -> int:
    if order not in (0, 1, 2):
        raise ValueError(f"derivatives must be 0, 1 or 2, got {order!r}")
    return int(order)



def output_bytes(*, rows: int, vocab: int, concepts: int, tokens: int, derivatives: int = 2,
                 dtype="float32") -> tuple[int, int]:
    """Bytes of the arrays `sweep` returns, uncompressed: (per alpha, independent of the grid).

    Per alpha: every name of QUANTITIES at each of the derivatives + 1 orders in `dtype`, and
    the alpha itself (float64); fixed: tokens [K], concept_of [V], weights [M] (int64 and
    float64) and probs_base [M, V] (`dtype`).
    """
    item = np.dtype(dtype).itemsize
    letters = {"M": rows, "K": tokens, "G": concepts}
    per_order = sum(math.prod(letters[c] for c in shape.split("x") if c) for shape in QUANTITIES.values())
    per_alpha = per_order * (check_order(derivatives) + 1) * item + 8
    return per_alpha, 8 * (tokens + vocab + rows) + rows * vocab * item


# The tracked tokens by default ("auto"): every token of a vocabulary up to ALL_TOKENS_UP_TO
# (a UFM, a GPT trained here: results as before), else the DEFAULT_TOP_K most likely at the
# grid's largest alpha. Tracking all 50,257 tokens of a GPT-2 vocabulary made every sweep's
# output (and memory) grow as A x M x V and cost 17-24% of the kernel's time.
AUTO = "auto"
ALL_TOKENS_UP_TO = 1024
DEFAULT_TOP_K = 256


def is_auto(top_k) -> bool:
    """Whether `top_k` (or a sweep's `tokens`) is the "auto" default, whatever its type."""
    return isinstance(top_k, str) and top_k == AUTO


def resolve_top_k(top_k, vocab: int):
    """None (every token) or k: "auto" is None up to ALL_TOKENS_UP_TO tokens, else DEFAULT_TOP_K."""
    if isinstance(top_k, str):
        if top_k != AUTO:
            raise ValueError(f"top_k must be a positive integer, None (every token) or 'auto', got {top_k!r}")
        return None if int(vocab) <= ALL_TOKENS_UP_TO else DEFAULT_TOP_K
    return top_k


def tracked_count(vocab: int, top_k, top_k_at: str = "max") -> int:
    """How many tokens a sweep tracks, at most: every token, or the top-k at one end of the
    grid (`top_k_at` "max" or "min"), or at both ends (up to 2k); "auto" as `resolve_top_k`."""
    top_k = resolve_top_k(top_k, vocab)
    if top_k is None:
        return int(vocab)
    return min(int(vocab), int(top_k) * (2 if top_k_at == "both" else 1))


# ---------------------------------------------------------------- vector-valued alpha (k terms)

# Key prefixes of the value, the gradient [..., k] and the Hessian [..., k, k] of a k-term sweep.
MULTI_PREFIXES = ("", "grad_", "hess_")


def check_points(points, k: int | None = None) -> np.ndarray:
    """Alpha points of a k-term sweep as float64 [A, k] (a 1-D array is k = 1), finite, else
    ValueError naming alphas. Any order: every point is evaluated on its own."""
    raw = np.asarray(points)
    if raw.dtype.kind not in "iuf" and not raw.dtype.name.startswith(("float", "bfloat")):
        raise ValueError(f"alphas must be real numbers, got an array of {raw.dtype}")
    arr = np.asarray(raw, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"alphas must be a non-empty [A, k] array of points, got shape {arr.shape}")
    if k is not None and arr.shape[1] != k:
        raise ValueError(f"alphas must have one column per steering term ({k}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("alphas must be finite (found NaN or inf)")
    return arr


@dataclass(frozen=True)
class ProductGrid:
    """The product of one `Grid` per steering term, sized before it is built: point i of the
    [A, k] array is the grids' values at the multi-index np.unravel_index(i, shape) ('ij'
    order: the last term's grid varies fastest)."""

    grids: tuple

    @property
    def k(self) -> int:
        return len(self.grids)

    @property
    def shape(self) -> tuple:
        return tuple(g.num for g in self.grids)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def values(self) -> np.ndarray:
        """The [A, k] points."""
        axes = np.meshgrid(*[g.values() for g in self.grids], indexing="ij")
        return np.stack([a.reshape(-1) for a in axes], axis=1)


def parse_product_grid(spec: str, k: int | None = None) -> ProductGrid:
    """'S:E:N,S:E:N,...' (one grid per steering term) -> a checked `ProductGrid`; with `k`, the
    number of grids must be k (else ValueError naming alphas)."""
    grids = tuple(parse_grid(part) for part in spec.split(","))
    if k is not None and len(grids) != k:
        raise ValueError(f"alphas gives {len(grids)} grid(s) for {k} steering terms: give one START:STOP:NUM per "
                         f"--vector, separated by commas (or a single grid for a single term)")
    return ProductGrid(grids)


def multi_output_bytes(*, k: int, rows: int, vocab: int, concepts: int, tokens: int, derivatives: int = 2,
                       dtype="float32", batch: int = 1) -> tuple[int, int]:
    """`output_bytes` of a k-term sweep: each quantity with its gradient (k) and Hessian (k x k)
    per point, `batch` times (bootstrap resamples also get their bands: 2 more copies); the
    points themselves are k float64s."""
    item = np.dtype(dtype).itemsize
    letters = {"M": rows, "K": tokens, "G": concepts}
    per_order = sum(math.prod(letters[c] for c in shape.split("x") if c) for shape in QUANTITIES.values())
    streams = (1, 1 + k, 1 + k + k * k)[check_order(derivatives)]
    copies = 1 if batch == 1 else 3
    per_alpha = per_order * streams * item * copies + 8 * k
    return per_alpha, 8 * (tokens + vocab + rows) + rows * vocab * item
