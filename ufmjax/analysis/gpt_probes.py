"""What only a transformer has, measured around the kernel (Sec. 4; docs/theory.md, Sec. 6).

Shape legend: A = alphas, M = rows (prompts), V = vocabulary, D = residual width, B = generations.

- Prop. 4.1: the distance of the steered logits to their limit LN(+-v) W^T along a grid;
- the local UFM: the closure's jvp at alpha = 0 read as a UFM direction u, the KL of the
  model to softmax(y(0) + alpha u), and the range of alpha where it stays below a threshold;
- sampled concept presence of steered generations (the paper's judge, exact for token classes);
- the model-size table's numbers of one sweep (bumps, peak order, tanh fit, local quadratic
  law, plateau). No matplotlib here: `ufmjax.report` draws.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ufmjax.common import cast_floats, float_dtype_of
from ufmjax.kernel import check_alphas, default_chunk_size
from ufmjax.models.gpt import GPT, residual, steered_generate
from ufmjax.steering import Steered

LOCAL_UFM_KL = 0.01       # nats: the validity threshold of the local UFM law
PRESENCE_THRESHOLD = 0.5  # a generation "shows" the concept if this share of its tokens is in it


@functools.lru_cache(maxsize=64)
def _direction_fn(fn):
    """(params) -> (y(0), u = dy/dalpha at 0): the local UFM of a closure, by one jvp."""

    def f(params):
        zero = jnp.zeros((), float_dtype_of(params))
        return jax.jvp(lambda a: fn(params, a), (zero,), (jnp.ones_like(zero),))

    return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _extras_fn(fn):
    def point(alpha, params, y0_MxV, u_MxV, lim_2xV):
        y = fn(params, alpha)
        # The local UFM (docs/theory.md, Sec. 6): KL(GPT || local UFM law softmax(y(0) + alpha u)), per row.
        logp = jax.nn.log_softmax(y, axis=-1)
        logq = jax.nn.log_softmax(y0_MxV + alpha * u_MxV, axis=-1)
        kl_M = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
        # Prop. 4.1: distance to LN(sign(alpha) v) W^T, largest over rows and tokens.
        lim_V = jnp.where(alpha >= 0, lim_2xV[0], lim_2xV[1])
        return jnp.max(jnp.abs(y - lim_V)), kl_M

    return jax.jit(jax.vmap(point, in_axes=(0, None, None, None, None)))


def local_ufm(steered: Steered, dtype=jnp.float32):
    """y(0) [M, V] and the local-UFM direction u = dy/dalpha(0) [M, V] of a closure."""
    y0, u = _direction_fn(steered.fn)(cast_floats(steered.params, dtype))
    return np.asarray(y0), np.asarray(u)


def grid_extras(steered: Steered, alphas, limits_2xV, weights=None, chunk_size=None, dtype=jnp.float32) -> dict:
    """Prop. 4.1 distance and local-UFM KL along a grid (chunked like the kernel).

    Returns limit_distance [A], local_ufm_kl [A] (weighted mean over rows), local_ufm_kl_max
    [A], local_ufm_direction [M, V].
    """
    alphas = check_alphas(alphas)
    params = cast_floats(steered.params, dtype)
    y0, u = _direction_fn(steered.fn)(params)
    M, V = y0.shape
    w = np.full(M, 1.0 / M) if weights is None else np.asarray(weights, np.float64)
    A = alphas.size
    C = min(chunk_size or default_chunk_size(M, V), A)  # a chunk past the grid is only padding
    padded = np.concatenate([alphas, np.full(-(-A // C) * C - A, alphas[-1])])
    fn = _extras_fn(steered.fn)
    lim = jnp.asarray(limits_2xV, dtype)
    dist, kl_mean, kl_max = [], [], []
    for i in range(0, padded.size, C):
        d, k = fn(jnp.asarray(padded[i:i + C], dtype), params, y0, u, lim)
        dist.append(np.asarray(d))
        k = np.asarray(k, np.float64)  # [C, M], reduced over rows now: memory flat in the grid
        kl_mean.append(k @ w)
        kl_max.append(k.max(axis=1))
    return {"limit_distance": np.concatenate(dist)[:A].astype(np.float64),
            "local_ufm_kl": np.concatenate(kl_mean)[:A], "local_ufm_kl_max": np.concatenate(kl_max)[:A],
            "local_ufm_direction": np.asarray(u)}


def refine_validity_range(steered: Steered, alphas, kl_A, threshold: float = LOCAL_UFM_KL, *,
                          weights=None, dtype=jnp.float32, chunk_size=None, rounds: int = 3):
    """`validity_range`, with each finite end refined between the last grid point that passes
    and the first that fails: `rounds` passes of one compiled chunk of alphas each."""
    alphas = check_alphas(alphas)
    lo, hi, censored = validity_range(alphas, kl_A, threshold)
    params = cast_floats(steered.params, dtype)
    y0, u = _direction_fn(steered.fn)(params)
    M, V = y0.shape
    w = np.full(M, 1.0 / M) if weights is None else np.asarray(weights, np.float64)
    # Points per refinement round: one chunk, at most the default one (a --chunk-size of 1e8
    # must not make each round 1e8 points).
    C = min(chunk_size or default_chunk_size(M, V), default_chunk_size(M, V))
    fn = _extras_fn(steered.fn)
    lim = jnp.zeros((2, V), dtype)

    def kl_at(a_C):
        _, k = fn(jnp.asarray(a_C, dtype), params, y0, u, lim)
        return np.asarray(k, np.float64) @ w

    ends = []
    for end, cens, step in ((lo, censored[0], -1), (hi, censored[1], 1)):
        if cens:
            ends.append(end)
            continue
        i = int(np.flatnonzero(alphas == end)[0])
        ok, bad = end, alphas[i + step]
        for _ in range(rounds):
            a_C = np.linspace(ok, bad, max(C, 3))
            passing = kl_at(a_C) < threshold
            # The first failing point along the way from ok to bad (passing[0] holds).
            j = int(np.argmin(passing)) if not passing.all() else a_C.size - 1
            ok, bad = a_C[max(j - 1, 0)], a_C[j]
        ends.append(float(ok))
    return ends[0], ends[1], censored


def validity_range(alphas, kl_A, threshold: float = LOCAL_UFM_KL):
    """The widest grid interval around alpha = 0 on which kl stays below `threshold`.

    Returns (lo, hi, censored): censored[i] is True when that end is the grid's end (the law
    holds further than the grid reaches).
    """
    alphas, kl_A = np.asarray(alphas), np.asarray(kl_A)
    i0 = int(np.argmin(np.abs(alphas)))
    ok = kl_A < threshold
    if not ok[i0]:
        return 0.0, 0.0, (False, False)
    lo = i0
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    hi = i0
    while hi < alphas.size - 1 and ok[hi + 1]:
        hi += 1
    return float(alphas[lo]), float(alphas[hi]), (lo == 0, hi == alphas.size - 1)


def concept_presence(model: GPT, prompts, v_D, layer: int, alphas, target: int, concept_of, *,
                     positions: str = "all", new_tokens: int = 16, seed: int = 0,
                     threshold: float = PRESENCE_THRESHOLD) -> dict:
    """Sampled concept presence: the share of steered generations that show the concept.

    The paper asks an LLM judge whether each steered generation shows the concept; here the
    concept is a token class, so the judge is exact: a generation shows it when at least
    `threshold` of its new tokens belong to the class. One generation per prompt and alpha,
    with the same random numbers at every alpha (common random numbers: smooth curves).
    Returns presence [A] and share [A] (the mean share of concept tokens).
    """
    gen = steered_generate(model, prompts, v_D, layer, alphas, new_tokens, jax.random.key(seed), positions)
    in_concept = np.asarray(concept_of)[gen] == target  # [A, B, new]
    share = in_concept.mean(axis=2)
    return {"presence": (share >= threshold).mean(axis=1), "share": share.mean(axis=1)}


# ---------------------------------------------------------------- the model-size table

def bump_stats(arrays, target: int, top: int = 10, tol: float = 1e-3) -> dict:
    """Bumps of next-token probabilities (Thm 3.3): a curve Δp(z|c_j, alpha) over the grid with
    an interior peak that rises and falls by more than `tol`.

    Returns bump_share: the share of (row, token) curves with a bump among the `top` tokens of
    largest mean probability at the grid's largest alpha (Fig. 6); and precede: the share of rows
    having bumps of both kinds where every off-target peak comes before every target peak
    (Thm 3.3's peak order), over all tracked tokens (sweep with tokens=None to track them all).
    """
    dp = np.asarray(arrays["delta_p"])  # [A, M, K]
    alphas = np.asarray(arrays["alphas"])
    tokens = np.asarray(arrays["tokens"])
    w = np.asarray(arrays["weights"])
    # Mean steered probability of each tracked token at the largest alpha.
    p_top = (np.asarray(arrays["probs_base"])[:, tokens] + dp[np.argmax(alphas)]).T @ w
    top_k = np.sort(np.argsort(-p_top, kind="stable")[:top])
    in_target = np.asarray(arrays["concept_of"])[tokens] == target  # [K]
    i = dp.argmax(axis=0)  # [M, K]
    peak = dp.max(axis=0)
    bump = (i > 0) & (i < dp.shape[0] - 1) & (peak - dp[0] > tol) & (peak - dp[-1] > tol)
    order = []
    for m in range(dp.shape[1]):
        off, on = alphas[i[m][bump[m] & ~in_target]], alphas[i[m][bump[m] & in_target]]
        if off.size and on.size:
            order.append(off.max() < on.min())
    return {"bump_share": float(bump[:, top_k].mean()), "top_tokens": tokens[top_k].tolist(),
            "bumps_all_tokens": float(bump.mean()),
            "precede": float(np.mean(order)) if order else float("nan"), "precede_rows": len(order)}


def tanh_fit(x, y):
    """Least-squares a + b tanh((x - c) / d) by a grid over (c, d) with (a, b) solved exactly.
    Returns (R^2, (a, b, c, d))."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    span = x.max() - x.min()
    sst = np.sum((y - y.mean()) ** 2)
    if sst == 0:
        return 1.0, (y.mean(), 0.0, 0.0, 1.0)
    best = (-np.inf, None)
    for c in np.linspace(x.min(), x.max(), 81):
        for d in span * np.geomspace(1e-3, 2, 60):
            t = np.tanh((x - c) / d)
            X = np.stack([np.ones_like(t), t], axis=1)
            coef, *_ = np.linalg.lstsq(X, y, rcond=None)
            r2 = 1 - np.sum((X @ coef - y) ** 2) / sst
            if r2 > best[0]:
                best = (r2, (coef[0], coef[1], c, d))
    return float(best[0]), tuple(float(z) for z in best[1])


def summarize_sweep(arrays, target: int, window: float | None = None) -> dict:
    """The model-size table's numbers for one sweep (Thm 3.3, 3.6, 3.8, Prop. 4.1, the local UFM)."""
    alphas = np.asarray(arrays["alphas"])
    amax = np.abs(alphas).max()
    out = bump_stats(arrays, target)
    F = np.asarray(arrays["concept_prob"])[:, :, target] @ np.asarray(arrays["weights"])
    out["tanh_r2"], _ = tanh_fit(alphas, F)
    # ΔCE near 0 (Thm 3.8's local law): b alpha + k alpha^2 on |alpha| <= window, by default the
    # local-UFM validity range; k against the kernel's exact ΔCE''(0) / 2.
    if window is None:
        window = min(-arrays["local_ufm_range"][0], arrays["local_ufm_range"][1]) \
            if "local_ufm_range" in arrays else 0.05 * amax
    sel = np.abs(alphas) <= window
    dce = np.asarray(arrays["delta_ce"])
    out["quad_window"], out["quad_points"] = float(window), int(sel.sum())
    out["quad_r2"] = out["quad_k_vs_d2"] = float("nan")
    if sel.sum() >= 5:  # fewer points than that fit anything
        X = np.stack([alphas[sel], alphas[sel] ** 2], axis=1)
        coef, *_ = np.linalg.lstsq(X, dce[sel], rcond=None)
        sst = np.sum((dce[sel] - dce[sel].mean()) ** 2)
        out["quad_r2"] = float(1 - np.sum((X @ coef - dce[sel]) ** 2) / sst) if sst > 0 else 1.0
        i0 = int(np.argmin(np.abs(alphas)))
        if "d2_delta_ce" in arrays:
            k0 = 0.5 * float(arrays["d2_delta_ce"][i0])
            out["quad_k_vs_d2"] = float(coef[1] / k0) if k0 else float("nan")
    # Plateau (Prop. 4.1): slope of ΔCE at the grid's ends relative to its largest slope.
    if "d_delta_ce" in arrays:
        slope = np.abs(np.asarray(arrays["d_delta_ce"]) * amax)
        out["plateau_slope"] = float(max(slope[0], slope[-1]) / max(slope.max(), 1e-30))
    out["dce_ends"] = [float(dce[0]), float(dce[-1])]
    if "limit_distance" in arrays:
        out["limit_distance_end"] = float(max(arrays["limit_distance"][0], arrays["limit_distance"][-1]))
        if "limit_probe_distance" in arrays:
            out["limit_distance_1e4"] = float(np.max(arrays["limit_probe_distance"]))
        lo, hi = arrays["local_ufm_range"]
        out["local_ufm_range"] = [float(lo), float(hi)]
        out["local_ufm_range_rel"] = [float(lo / amax), float(hi / amax)]
    if "concept_presence" in arrays:
        out["presence_ends"] = [float(arrays["concept_presence"][0]), float(arrays["concept_presence"][-1])]
    return out


def scaled_grid(model: GPT, prompts, v_D, layer: int, reach: float = 50.0, num: int = 401) -> np.ndarray:
    """An alpha grid dense near 0 that reaches alpha |v| = reach * |h| (the median norm of the
    residual stream at layer l over the prompts' positions): alpha = s sinh(t), t uniform, so
    the bumps near 0 and the Prop. 4.1 plateau are both resolved."""
    h = residual(model, prompts, layer)
    return sinh_grid(float(np.median(np.linalg.norm(h, axis=-1))), float(np.linalg.norm(v_D)), reach, num)


def sinh_grid(h_norm: float, v_norm: float, reach: float, num: int) -> np.ndarray:
    """alpha = s sinh(t), t uniform, s = h_norm / |v|: dense near 0, reaching alpha |v| =
    reach * h_norm (the grid of `scaled_grid`, for any model that gives the two norms)."""
    s = h_norm / max(v_norm, 1e-12)
    t = np.linspace(-np.arcsinh(reach), np.arcsinh(reach), num)
    return s * np.sinh(t)


