"""The alpha-sweep kernel shared by every model.

Shape legend: A = alphas of the grid, C = alphas of one chunk, M = rows (contexts or text
positions), V = vocabulary, G = concepts, K = tracked tokens.

A model hands the kernel a `Steered` closure `fn(params, alpha) -> logits_MxV`. The kernel
writes the computation for ONE alpha (`_point`), takes its first and second derivatives in
alpha by nested forward-mode autodiff (`jax.jvp`: alpha is a scalar, so one forward pass
gives the slope of every output), vmaps it over a chunk of alphas, jit-compiles it once per
(closure, shapes), and walks the grid chunk by chunk so that device memory depends on the
chunk, never on the grid. Every reduction (tracked tokens, concept sums, CE, KL, entropy)
happens inside the kernel, so a [C, M, V] array never leaves the device.

The alpha axis of each chunk is sharded over all visible devices (a 1-D `jax.sharding.Mesh`);
with one device this is the plain single-device computation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ufmjax.steering import Steered

# Quantities the kernel returns per alpha, with their per-alpha shapes.
QUANTITIES = {
    "delta_p": "MxK",          # steered minus base probability of each tracked token
    "concept_prob": "MxG",     # F_C(alpha) = sum_{z in C} p_alpha(z)
    "delta_p_concept": "MxG",  # Def. 3.5: (F_C(alpha) - F_C(0)) / |C|
    "delta_ce": "",            # Def. 3.7: sum_j w_j (CE_j(alpha) - CE_j(0))
    "delta_ce_ctx": "M",       # CE_j(alpha) - CE_j(0), per row
    "kl": "M",                 # KL(p_alpha || p_0) per row
    "entropy": "M",            # H(p_alpha) per row
}

# Elements of one [C, M, V] intermediate the default chunk size aims at (32 MiB in float32):
# about a dozen such arrays live at once with second derivatives.
CHUNK_ELEMENTS = 1 << 23
MAX_CHUNK = 512

# Incremented each time the kernel is traced: tests use it to prove "no recompilation".
TRACE_COUNT = 0


def check_alphas(alphas) -> np.ndarray:
    """A 1-D, non-empty, finite alpha grid (as float64 numpy), else ValueError naming alphas."""
    arr = np.asarray(alphas, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"alphas must be a non-empty 1-D grid, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("alphas must be finite (found NaN or inf)")
    return arr


def parse_alphas(spec: str) -> np.ndarray:
    """'START:STOP:NUM' -> NUM evenly spaced alphas from START to STOP, both included."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"alphas must be START:STOP:NUM, got {spec!r}")
    try:
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"alphas must be START:STOP:NUM with numbers, got {spec!r}") from None
    if num < 1:
        raise ValueError(f"alphas NUM must be >= 1, got {num}")
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ValueError(f"alphas START and STOP must be finite, got {spec!r}")
    if num > 1 and stop <= start:
        raise ValueError(f"alphas STOP must exceed START (the grid is increasing), got {spec!r}")
    return check_alphas(np.linspace(start, stop, num))


def _quantities(logits_MxV, base, consts, label_targets: bool):
    """Every quantity of the theory at one alpha, reduced to at most [M, max(K, G)]."""
    logp_MxV = jax.nn.log_softmax(logits_MxV, axis=-1)
    p_MxV = jnp.exp(logp_MxV)
    tokens_K = consts["tokens"]
    F_MxG = p_MxV @ consts["onehot"]
    if label_targets:
        ce_M = -jnp.take_along_axis(logp_MxV, consts["targets"][:, None], axis=-1)[:, 0]
    else:
        ce_M = -jnp.sum(consts["targets"] * logp_MxV, axis=-1)
    dce_M = ce_M - base["ce"]
    return {
        "delta_p": p_MxV[:, tokens_K] - base["p_tokens"],
        "concept_prob": F_MxG,
        "delta_p_concept": (F_MxG - base["F"]) * consts["inv_size"],
        "delta_ce": jnp.dot(consts["weights"], dce_M),
        "delta_ce_ctx": dce_M,
        # p log p is taken as 0 where p underflows (alpha = +-1e6), never 0 * -inf.
        "kl": jnp.sum(p_MxV * (logp_MxV - base["logp"]), axis=-1),
        "entropy": -jnp.sum(p_MxV * logp_MxV, axis=-1),
    }


def _base_state(fn, params, consts, label_targets: bool):
    """Unsteered (alpha = 0) reference values every steered quantity is measured against."""
    logits_MxV = fn(params, jnp.zeros((), consts["onehot"].dtype))
    logp_MxV = jax.nn.log_softmax(logits_MxV, axis=-1)
    p_MxV = jnp.exp(logp_MxV)
    if label_targets:
        ce_M = -jnp.take_along_axis(logp_MxV, consts["targets"][:, None], axis=-1)[:, 0]
    else:
        ce_M = -jnp.sum(consts["targets"] * logp_MxV, axis=-1)
    return {"logp": logp_MxV, "p_tokens": p_MxV[:, consts["tokens"]],
            "F": p_MxV @ consts["onehot"], "ce": ce_M}


@functools.lru_cache(maxsize=64)
def _base_fn(fn):
    return jax.jit(functools.partial(_base_state, fn), static_argnames=("label_targets",))


@functools.lru_cache(maxsize=64)
def _chunk_fn(fn, order: int, label_targets: bool):
    """jit(vmap(point)) for one closure: values and `order` derivatives in alpha."""

    def point(alpha, params, base, consts):
        def f(a):
            return _quantities(fn(params, a), base, consts, label_targets)

        one = jnp.ones_like(alpha)
        if order == 0:
            return (f(alpha),)
        if order == 1:
            return jax.jvp(f, (alpha,), (one,))

        def f_and_slope(a):
            return jax.jvp(f, (a,), (one,))

        # Nested forward mode: the tangent of (f, f') is (f', f'').
        (y, dy), (_, d2y) = jax.jvp(f_and_slope, (alpha,), (one,))
        return y, dy, d2y

    def chunk(alphas_C, params, base, consts):
        global TRACE_COUNT
        TRACE_COUNT += 1
        return jax.vmap(point, in_axes=(0, None, None, None))(alphas_C, params, base, consts)

    return jax.jit(chunk)


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x),
        tree)


def default_chunk_size(num_rows: int, vocab: int, num_devices: int = 1) -> int:
    """Largest chunk keeping one [C, M, V] intermediate near CHUNK_ELEMENTS, per device."""
    per_device = max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // max(1, num_rows * vocab)))
    return per_device * num_devices


def top_tokens(steered: Steered, alphas, k: int) -> np.ndarray:
    """The k tokens of largest mean steered probability at the grid's largest |alpha| (Fig. 6)."""
    alphas = check_alphas(alphas)
    a = alphas[np.argmax(np.abs(alphas))]
    logits = steered.fn(steered.params, jnp.asarray(a, jnp.result_type(float)))
    mean_p = np.asarray(jax.nn.softmax(logits, axis=-1).mean(axis=0))
    if not 1 <= k <= mean_p.size:
        raise ValueError(f"top_k must be in [1, {mean_p.size}], got {k}")
    return np.sort(np.argsort(-mean_p, kind="stable")[:k])


def sweep(steered: Steered, alphas, *, concept_of, ce_target=None, weights=None, tokens=None,
          derivatives: int = 2, chunk_size: int | None = None, dtype=jnp.float32,
          devices=None) -> dict[str, np.ndarray]:
    """Sweep a steered model over an alpha grid.

    Args:
      steered: the model's `alpha -> logits [M, V]` closure.
      alphas: 1-D grid of steering strengths (any length; processed in chunks).
      concept_of: [V] concept index of each token (concepts 0..G-1).
      ce_target: what cross-entropy is measured against: None for the model's own unsteered
        distribution (Assumption 2), a float [M, V] table of next-token distributions, or an
        int [M] array of observed next tokens (held-out text).
      weights: [M] weights of the rows in delta_ce (context probabilities pi); uniform by default.
      tokens: [K] token ids to report delta_p for; all V tokens by default.
      derivatives: 0, 1 or 2: how many derivatives in alpha to return (forward-mode autodiff).
      chunk_size: alphas per compiled call; by default sized to the problem and a multiple of
        the device count. Results do not depend on it.
      dtype: float32 (default) or float64 (requires jax_enable_x64).
      devices: devices to shard the alpha axis over; all visible devices by default.
    Returns:
      dict of numpy arrays: `alphas` [A], `tokens` [K], `concept_of` [V], `weights` [M],
      `probs_base` [M, V], and for each name of QUANTITIES its values `[A, ...]`, with
      `d_<name>` and `d2_<name>` for the derivatives that were asked for.
    """
    alphas = check_alphas(alphas)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax_enable_x64 (ufmjax sweep --float64 sets it)")
    if derivatives not in (0, 1, 2):
        raise ValueError(f"derivatives must be 0, 1 or 2, got {derivatives!r}")
    fn = steered.fn
    params = _cast_floats(steered.params, dtype)
    logits0 = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((), dtype))
    if len(logits0.shape) != 2:
        raise ValueError(f"the steered closure must return logits [M, V], got shape {logits0.shape}")
    M, V = logits0.shape

    concept_of = np.asarray(concept_of)
    if concept_of.shape != (V,) or not np.issubdtype(concept_of.dtype, np.integer) or concept_of.min() < 0:
        raise ValueError(f"concept_of must be {V} non-negative integer concept ids, got shape {concept_of.shape}")
    G = int(concept_of.max()) + 1
    sizes = np.bincount(concept_of, minlength=G)
    if np.any(sizes == 0):
        raise ValueError(f"concept_of leaves concepts {np.flatnonzero(sizes == 0).tolist()} empty")
    tokens = np.arange(V) if tokens is None else np.asarray(tokens).reshape(-1)
    if tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"tokens must be a non-empty list of token ids in [0, {V})")
    if weights is None:
        weights = np.full(M, 1.0 / M)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (M,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be {M} finite non-negative numbers")

    if ce_target is None:
        targets = jax.nn.softmax(fn(params, jnp.zeros((), dtype)), axis=-1)
        label_targets = False
    else:
        targets = np.asarray(ce_target)
        label_targets = np.issubdtype(targets.dtype, np.integer)
        if label_targets:
            if targets.shape != (M,) or targets.min() < 0 or targets.max() >= V:
                raise ValueError(f"ce_target labels must be {M} token ids in [0, {V})")
            targets = jnp.asarray(targets, jnp.int32)
        else:
            if targets.shape != (M, V) or not np.all(np.isfinite(targets)):
                raise ValueError(f"ce_target must be a finite [{M}, {V}] table or {M} labels")
            targets = jnp.asarray(targets, dtype)

    consts = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "onehot": jnp.asarray(np.eye(G)[concept_of], dtype),
        "inv_size": jnp.asarray(1.0 / sizes, dtype),
        "targets": targets,
        "weights": jnp.asarray(weights, dtype),
    }
    base = _base_fn(fn)(params, consts, label_targets=label_targets)

    devices = list(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    if chunk_size is None:
        chunk_size = default_chunk_size(M, V, n_dev)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(-(-chunk_size // n_dev) * n_dev)  # a multiple of the device count
    mesh = Mesh(np.asarray(devices), ("alpha",))
    alpha_sharding = NamedSharding(mesh, PartitionSpec("alpha"))
    replicated = NamedSharding(mesh, PartitionSpec())
    params, base, consts = jax.device_put((params, base, consts), replicated)

    # Pad the grid to whole chunks by repeating its last alpha: one compiled shape for any grid.
    A = alphas.size
    n_chunks = -(-A // chunk_size)
    padded = np.concatenate([alphas, np.full(n_chunks * chunk_size - A, alphas[-1])])
    kernel = _chunk_fn(fn, derivatives, label_targets)
    prefixes = ("", "d_", "d2_")[: derivatives + 1]
    out: dict[str, np.ndarray] = {}

    def collect(i, result):
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, A)
        for prefix, tree in zip(prefixes, result):
            for name, value in tree.items():
                value = np.asarray(value)
                key = prefix + name
                if key not in out:
                    out[key] = np.empty((A,) + value.shape[1:], value.dtype)
                out[key][lo:hi] = value[: hi - lo]

    pending = None
    for i in range(n_chunks):
        chunk = jax.device_put(jnp.asarray(padded[i * chunk_size:(i + 1) * chunk_size], dtype), alpha_sharding)
        result = kernel(chunk, params, base, consts)  # dispatched asynchronously
        if pending is not None:
            collect(*pending)  # copy the previous chunk back while this one runs
        pending = (i, result)
    collect(*pending)

    out.update(
        alphas=alphas,
        tokens=tokens.astype(np.int64),
        concept_of=concept_of.astype(np.int64),
        weights=weights,
        probs_base=np.asarray(jnp.exp(base["logp"])),
    )
    return out


def find_peaks(steered: Steered, alphas, *, concept_of, tokens=None, newton_steps: int = 8,
               dtype=jnp.float32) -> np.ndarray:
    """Peak strengths of the token bumps, from the kernel's own derivatives.

    A token's bump peaks where d delta_p / d alpha changes sign from + to - (Thm 3.3). Each
    sign change on the grid is refined by Newton steps on d delta_p / d alpha, whose slope is
    the kernel's second derivative, kept inside its grid bracket.

    Args:
      steered, concept_of, tokens, dtype: as for `sweep`.
      alphas: the grid that brackets the peaks.
      newton_steps: Newton iterations after bracketing.
    Returns:
      [M, K] peak alphas; NaN where the grid holds no interior maximum (monotone tokens).
    """
    alphas = check_alphas(alphas)
    grid = sweep(steered, alphas, concept_of=concept_of, tokens=tokens, derivatives=1, dtype=dtype)
    slope_AxMxK = grid["d_delta_p"]
    M, K = slope_AxMxK.shape[1:]
    # The first + to - sign change of the slope (a bump has exactly one, Thm 3.3).
    change = (slope_AxMxK[:-1] > 0) & (slope_AxMxK[1:] <= 0)
    has = change.any(axis=0)
    i = np.argmax(change, axis=0)
    lo, hi = alphas[i], alphas[np.minimum(i + 1, alphas.size - 1)]
    s_lo = np.take_along_axis(slope_AxMxK, i[None], 0)[0]
    s_hi = np.take_along_axis(slope_AxMxK, np.minimum(i + 1, alphas.size - 1)[None], 0)[0]
    # Start from the secant root of the bracket, then Newton on the slope.
    x = np.where(has, lo - s_lo * (hi - lo) / np.where(s_hi != s_lo, s_hi - s_lo, 1.0), np.nan)
    rows, cols = np.nonzero(has)
    if rows.size == 0:
        return x
    tok = np.arange(K) if tokens is None else np.asarray(tokens)
    for _ in range(newton_steps):
        xs = x[rows, cols]
        at = sweep(steered, xs, concept_of=concept_of, tokens=tok, derivatives=2, dtype=dtype)
        idx = np.arange(xs.size)
        f = at["d_delta_p"][idx, rows, cols]
        df = at["d2_delta_p"][idx, rows, cols]
        step = np.where(df < 0, f / np.where(df != 0, df, 1.0), 0.0)
        new = np.clip(xs - step, lo[rows, cols], hi[rows, cols])
        x[rows, cols] = new
    return x
