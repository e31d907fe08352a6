"""GPT runs: train a small GPT on concept data or bundled text, load it, steer and sweep it.

Shape legend: A = alphas, M = sweep rows (prompts), T = positions, V = vocabulary,
D = residual width, K = tracked tokens, Q = prompts of a steering set, B = generations.

The GPT goes through the SAME kernel as the UFM (`ufmjax.sweep.sweep`): `gpt.steered_closure`
hands it `alpha -> steered logits` with the prefix cached. Around the kernel this module adds
what only a transformer has: the Prop. 4.1 limit `LN(±v) W^T`, the "local UFM" of the model
(its jvp at alpha = 0 read as a UFM direction, `softmax(y(0) + alpha u)`), cross-entropy on
held-out text with every position steered, and sampled concept presence of steered
generations. `summarize_sweep` reduces one sweep to the numbers of the model-size table.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax import io
from ufmjax.data import ConceptData, DataConfig, select_steering_sets
from ufmjax.gpt import (
    GPT,
    GPTConfig,
    check_layer,
    check_positions,
    init_gpt,
    limit_logits,
    logits,
    mean_residual,
    next_token_loss,
    residual,
    steered_closure,
    steered_generate,
)
from ufmjax.runs import open_run, versions
from ufmjax.steering import Steered
from ufmjax.sweep import check_alphas, default_chunk_size, sweep, top_tokens
from ufmjax.text import CLASSES, TextConfig, TextCorpus, concept_index, steering_prompts
from ufmjax.train import TrainConfig, restore_model, train

CORPORA = ("concept", "text")

# Defaults of `ufmjax train gpt` (measured on 2 CPU cores: concept ~10 s, text ~1.5 min).
CONCEPT_GPT = {"layers": 1, "width": 32, "heads": 2, "mlp_ratio": 4}
CONCEPT_TRAIN = TrainConfig(steps=500, lr=3e-3, warmup=50, weight_decay=0.0, clip=1.0)
CONCEPT_BATCH = 256
TEXT_GPT = {"context": 64, "layers": 2, "width": 64, "heads": 4, "mlp_ratio": 4}
TEXT_TRAIN = TrainConfig(steps=1500, lr=3e-3, warmup=100, weight_decay=0.01, clip=1.0, eval_every=500)
TEXT_BATCH = 32

LOCAL_UFM_KL = 0.01  # nats: the validity threshold of the local UFM law (item 7 of issue #3)
TEXT_ROWS = 64       # held-out prompts of a text sweep
TEXT_CE_PROMPTS = 16 # held-out prompts whose every position enters the all-positions CE
PRESENCE_POINTS = 21 # alphas of the sampled-presence subgrid
PRESENCE_THRESHOLD = 0.5  # a generation "shows" the concept if this share of its tokens is in it
PRESENCE_SAMPLES = 64  # generations per alpha (the sweep's prompts, cycled)
LIMIT_PROBE = 1e4      # Prop. 4.1 is also probed at alpha = ±1e4, beyond any grid


# ---------------------------------------------------------------- training

def concept_batch_fn(data: ConceptData, batch: int, seed: int):
    """step -> (tokens [B, T], weights [B, T-1]): fresh concept sequences, loss on the last
    position only (the concept position, whose target follows Assumption 1)."""
    T = data.config.context_len + 1
    weight = jnp.zeros((batch, T - 1), jnp.float32).at[:, -1].set(1.0)

    def batch_fn(step):
        rng = np.random.default_rng([seed, step])  # a function of the step alone: exact resume
        return jnp.asarray(data.sample_sequences(rng, batch, fresh=True)), weight

    return batch_fn


def text_batch_fn(corpus: TextCorpus, batch: int, context: int, seed: int):
    """step -> (windows [B, context] of the train split, all positions weighted)."""
    weight = jnp.ones((batch, context - 1), jnp.float32)

    def batch_fn(step):
        rng = np.random.default_rng([seed, step])
        return jnp.asarray(corpus.sample_windows(rng, batch, context, "train")), weight

    return batch_fn


def all_concept_contexts(data: ConceptData, limit: int = 4096, seed: int = 0):
    """Every context the sampler can draw (s^(T-1) per concept) with its probability; a seeded
    sample of `limit` of them when there are more. Returns (contexts [M, T-1], concept [M], w [M])."""
    s = data.vocab // data.num_concepts
    n = s ** data.config.context_len
    codes = np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    digits = np.stack([(codes // s ** i) % s for i in range(data.config.context_len)], axis=1)
    concept_mass = np.bincount(data.context_concept, weights=data.pi, minlength=data.num_concepts)
    ctx, cc, w = [], [], []
    for g in range(data.num_concepts):
        ctx.append(g * s + digits)
        cc.append(np.full(len(codes), g))
        w.append(np.full(len(codes), concept_mass[g] / len(codes)))
    return np.concatenate(ctx).astype(np.int32), np.concatenate(cc), np.concatenate(w)


def concept_ce(model: GPT, data: ConceptData, contexts=None, concept=None, weights=None) -> float:
    """Exact expected next-token cross-entropy at the concept position, in float64:
    -sum_j w_j sum_z p(z|c_j) log softmax(GPT(c_j))_z (the fixed contexts with pi by default)."""
    if contexts is None:
        contexts, concept, weights = data.contexts, data.context_concept, data.pi
    if concept is None:
        p_MxV = data.p_MxV
    else:  # p(.|c) depends on c's concept only (Assumption 1): one row of the table per concept
        p_GxV = np.stack([data.p_MxV[data.contexts_of(g)[0]] for g in range(data.num_concepts)])
        p_MxV = p_GxV[np.asarray(concept)]
    y = logits(model, contexts)[:, -1].astype(np.float64)
    logp = y - y.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(-np.dot(weights, np.sum(p_MxV * logp, axis=1)))


def text_ce(model: GPT, windows_NxT) -> float:
    """Mean next-token cross-entropy of the GPT on positions 1..T-1 of each window."""
    y = logits(model, windows_NxT[:, :-1]).astype(np.float64)
    logp = y - y.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(logp, windows_NxT[:, 1:, None], axis=-1).mean())


def train_gpt_run(out, corpus: str = "concept", *, data_config: DataConfig | None = None,
                  text_config: TextConfig | None = None, gpt: dict | None = None,
                  train_config: TrainConfig | None = None, batch: int | None = None, seed: int = 0,
                  progress: bool = True, force: bool = False, stop_after: int | None = None) -> dict:
    """Train a GPT into a run folder (mirrors `runs.train_ufm_run`). Returns its metrics.

    Args:
      out: run folder. A finished run with the same configuration is returned as is; an
        unfinished one resumes from its newest verified checkpoint.
      corpus: "concept" (sequences of the concept dataset, loss at the concept position) or
        "text" (character windows of the bundled Python docs, loss at every position).
      data_config / text_config: the corpus.
      gpt: GPTConfig fields other than vocab (and, for concept data, context) to override.
      train_config, batch: optimiser, schedule and batch size (corpus defaults if None).
      seed: initialisation and batch seed.
      stop_after: stop after this many steps as if interrupted (tests); returns {} then.
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    gpt = dict(gpt or {})
    if corpus == "concept":
        data_config = data_config or DataConfig()
        source = ConceptData(data_config)
        T = data_config.context_len + 1
        fields = {**CONCEPT_GPT, "context": T, **gpt, "vocab": source.vocab}
        if fields["context"] < T:
            raise ValueError(f"context must be >= context_len + 1 = {T} on concept data, got {fields['context']}")
        train_config = train_config or CONCEPT_TRAIN
        batch = batch or CONCEPT_BATCH
        corpus_cfg = {"data": data_config.to_dict()}
    else:
        text_config = text_config or TextConfig()
        source = TextCorpus(text_config)
        fields = {**TEXT_GPT, **gpt, "vocab": source.vocab}
        train_config = train_config or TEXT_TRAIN
        batch = batch or TEXT_BATCH
        corpus_cfg = {"text": text_config.to_dict(), "text_sha256": source.sha256, "text_chars": len(source.text)}
    gpt_config = GPTConfig(**fields)
    if corpus == "text" and gpt_config.context < 2:
        raise ValueError(f"context must be >= 2 on text, got {gpt_config.context}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    config = {"model": "gpt", "corpus": corpus, **corpus_cfg, "gpt": gpt_config.to_dict(),
              "train": train_config.to_dict(), "batch": batch, "seed": seed, "versions": versions()}

    out, finished = open_run(out, config, force)
    if finished is not None:
        return finished

    model = init_gpt(gpt_config, seed)
    if corpus == "concept":
        every = all_concept_contexts(source)
        batch_fn = concept_batch_fn(source, batch, seed)

        def eval_fn(m):
            return {"ce": concept_ce(m, source, *every)}
    else:
        val = source.eval_windows(gpt_config.context)
        batch_fn = text_batch_fn(source, batch, gpt_config.context, seed)

        def eval_fn(m):
            return {"val_loss": text_ce(m, val)}

    result = train(model, next_token_loss, train_config, batch_fn=batch_fn, eval_fn=eval_fn, run_dir=out,
                   progress=progress, desc=f"train gpt ({corpus})", stop_after=stop_after)
    if result.steps < train_config.steps:
        return {}
    metrics = {"steps": result.steps, "seconds": result.seconds, "resumed_from": result.resumed_from,
               "final_train_loss": result.final_loss, "history": result.history,
               "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}
    if corpus == "concept":
        # The loss of the training distribution (every context the sampler draws) and of the
        # fixed contexts that are steered, both against the entropy bound.
        ce_all = concept_ce(model, source, *every)
        ce_fixed = concept_ce(model, source)
        metrics.update(final_ce=ce_all, final_ce_fixed=ce_fixed, entropy=source.entropy(),
                       gap=ce_all - source.entropy(), gap_fixed=ce_fixed - source.entropy())
    else:
        metrics.update(val_loss=text_ce(model, val), bigram_val_loss=source.bigram_ce(val),
                       unigram_val_loss=source.unigram_ce(val), val_windows=int(val.shape[0]))
        metrics["gain_over_bigram"] = metrics["bigram_val_loss"] - metrics["val_loss"]
    io.write_json_atomic(out / io.METRICS_FILE, metrics)
    return metrics


@dataclass
class GPTRun:
    path: Path
    config: dict
    corpus: str
    source: Any  # ConceptData or TextCorpus
    model: GPT
    metrics: dict


def load_gpt_run(run_dir) -> GPTRun:
    """Load a finished GPT run folder."""
    cfg = io.load_run_config(run_dir)
    if cfg["model"] != "gpt":
        raise io.RunError(f"run folder {str(run_dir)!r} is not a GPT run (model={cfg['model']!r})")
    if not io.run_finished(run_dir):
        raise io.RunError(f"run folder {str(run_dir)!r} is unfinished (no {io.METRICS_FILE}); train it again to resume")
    if cfg["corpus"] == "concept":
        source = ConceptData(DataConfig.from_dict(cfg["data"]))
    else:
        source = TextCorpus(TextConfig.from_dict(cfg["text"]))
        if source.sha256 != cfg["text_sha256"]:
            raise io.RunError(f"run folder {str(run_dir)!r} was trained on another pydoc corpus "
                              f"(another Python version); its vocabulary no longer matches")
    model = init_gpt(GPTConfig.from_dict(cfg["gpt"]))
    restore_model(model, run_dir)
    return GPTRun(Path(run_dir), cfg, cfg["corpus"], source, model, io.read_json(Path(run_dir) / io.METRICS_FILE))


# ---------------------------------------------------------------- what the sweep steers

def default_layer(model: GPT) -> int:
    """The middle of the residual stream, ceil(L / 2) (L for a 1-layer model)."""
    return math.ceil(model.config.layers / 2)


def text_prompt_len(model: GPT) -> int:
    return max(1, min(32, model.config.context // 2))


def steering_sets(run: GPTRun, target, negatives: str = "contrastive", negative_concept=None,
                  q: int | None = None, seed: int = 0):
    """Steering prompts of a run: (steer_prompts [2Q or M, T], P, N) with P, N indices into it.

    Concept data: the dataset's contexts, P and N chosen as for the UFM (`select_steering_sets`).
    Text: `text.steering_prompts` (case-flipped spans for upper/lowercase), stacked P then N.
    """
    if run.corpus == "concept":
        P, N = select_steering_sets(run.source.context_concept, target, negatives, negative_concept, q, seed)
        return run.source.contexts, P, N
    if negative_concept is not None:
        raise ValueError("negative_concept applies to concept-data runs only (text negatives are "
                         "case-flipped or density-ranked spans)")
    Pp, Np = steering_prompts(run.source, target, negatives, 32 if q is None else q,
                              text_prompt_len(run.model), seed)
    q = Pp.shape[0]
    return np.concatenate([Pp, Np]), np.arange(q), np.arange(q, 2 * q)


def gpt_steering_vector(model: GPT, steer_prompts, P, N, layer: int) -> np.ndarray:
    """Eq. 3 over token-averaged residuals at layer l (Sec. 4); P, N index steer_prompts."""
    from ufmjax.steering import diff_of_means

    if len(P) == 0 or len(N) == 0:
        raise ValueError("P and N prompt sets must be non-empty")
    return diff_of_means(mean_residual(model, steer_prompts, layer), P, N)


def gpt_chunk_size(model: GPT, rows: int, positions: int) -> int:
    """Alphas per compiled call for a GPT closure.

    The kernel's default sizes chunks by the [C, M, V] logits; inside a GPT the [C, M, T, F]
    MLP activations (F = mlp_ratio * D) are what is large, so the chunk keeps those near
    2^23 elements (32 MiB in float32) instead.
    """
    per_alpha = rows * positions * model.config.mlp_ratio * model.config.width
    return int(np.clip((1 << 23) // max(per_alpha, 1), 8, 512))


# ---------------------------------------------------------------- beyond the kernel

def _cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                        else jnp.asarray(x), tree)


@functools.lru_cache(maxsize=64)
def _direction_fn(fn):
    """(params) -> (y(0), u = dy/dalpha at 0): the local UFM of a closure, by one jvp."""

    def f(params):
        dtype = next(x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
        zero = jnp.zeros((), dtype)
        return jax.jvp(lambda a: fn(params, a), (zero,), (jnp.ones_like(zero),))

    return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _extras_fn(fn):
    def point(alpha, params, y0_MxV, u_MxV, lim_2xV):
        y = fn(params, alpha)
        # Item 7: KL(GPT || local UFM law softmax(y(0) + alpha u)), per row.
        logp = jax.nn.log_softmax(y, axis=-1)
        logq = jax.nn.log_softmax(y0_MxV + alpha * u_MxV, axis=-1)
        kl_M = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
        # Prop. 4.1: distance to LN(sign(alpha) v) W^T, largest over rows and tokens.
        lim_V = jnp.where(alpha >= 0, lim_2xV[0], lim_2xV[1])
        return jnp.max(jnp.abs(y - lim_V)), kl_M

    return jax.jit(jax.vmap(point, in_axes=(0, None, None, None, None)))


def local_ufm(steered: Steered, dtype=jnp.float32):
    """y(0) [M, V] and the local-UFM direction u = dy/dalpha(0) [M, V] of a closure."""
    y0, u = _direction_fn(steered.fn)(_cast(steered.params, dtype))
    return np.asarray(y0), np.asarray(u)


def grid_extras(steered: Steered, alphas, limits_2xV, weights=None, chunk_size=None, dtype=jnp.float32) -> dict:
    """Prop. 4.1 distance and local-UFM KL along a grid (chunked like the kernel).

    Returns limit_distance [A], local_ufm_kl [A] (weighted mean over rows), local_ufm_kl_max
    [A], local_ufm_direction [M, V].
    """
    alphas = check_alphas(alphas)
    params = _cast(steered.params, dtype)
    y0, u = _direction_fn(steered.fn)(params)
    M, V = y0.shape
    w = np.full(M, 1.0 / M) if weights is None else np.asarray(weights, np.float64)
    C = chunk_size or default_chunk_size(M, V)
    A = alphas.size
    padded = np.concatenate([alphas, np.full(-(-A // C) * C - A, alphas[-1])])
    fn = _extras_fn(steered.fn)
    lim = jnp.asarray(limits_2xV, dtype)
    dist, kl = [], []
    for i in range(0, padded.size, C):
        d, k = fn(jnp.asarray(padded[i:i + C], dtype), params, y0, u, lim)
        dist.append(np.asarray(d))
        kl.append(np.asarray(k))
    kl_AxM = np.concatenate(kl)[:A].astype(np.float64)
    return {"limit_distance": np.concatenate(dist)[:A].astype(np.float64), "local_ufm_kl": kl_AxM @ w,
            "local_ufm_kl_max": kl_AxM.max(axis=1), "local_ufm_direction": np.asarray(u)}


def refine_validity_range(steered: Steered, alphas, kl_A, threshold: float = LOCAL_UFM_KL, *,
                          weights=None, dtype=jnp.float32, chunk_size=None, rounds: int = 3):
    """`validity_range`, with each finite end refined between the last grid point that passes
    and the first that fails: `rounds` passes of one compiled chunk of alphas each."""
    alphas = check_alphas(alphas)
    lo, hi, censored = validity_range(alphas, kl_A, threshold)
    params = _cast(steered.params, dtype)
    y0, u = _direction_fn(steered.fn)(params)
    M, V = y0.shape
    w = np.full(M, 1.0 / M) if weights is None else np.asarray(weights, np.float64)
    C = chunk_size or default_chunk_size(M, V)
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


# ---------------------------------------------------------------- the sweep

def sweep_rows(run: GPTRun) -> dict:
    """The rows a sweep of this run evaluates and what they are measured against.

    Concept data: the dataset's contexts, CE against p(z|c_j), weights pi (as for the UFM).
    Text: TEXT_ROWS held-out prompts spread over the validation split, CE against the
    character that follows each.
    """
    model = run.model
    if run.corpus == "concept":
        data = run.source
        return {"prompts": data.contexts, "weights": data.pi, "ce_target": data.p_MxV,
                # One new token: the concept position is the only one the data defines.
                "concept_of": data.concept_of, "new_tokens": min(1, model.config.context - data.contexts.shape[1]),
                "extra": {"p_data": data.p_MxV, "context_concept": data.context_concept}}
    n = text_prompt_len(model)
    windows = run.source.spaced_windows(n + 1, TEXT_ROWS, "val")
    return {"prompts": windows[:, :-1], "weights": None, "ce_target": windows[:, -1],
            "concept_of": run.source.concept_of, "new_tokens": min(16, model.config.context - n),
            "extra": {"labels": windows[:, -1]}}


def gpt_sweep(run: GPTRun, alphas, *, target, negatives: str = "contrastive", negative_concept=None,
              q: int | None = None, seed: int = 0, layer: int | None = None, positions: str = "all",
              ce_against: str = "data", top_k: int | None = None, derivatives: int = 2,
              chunk_size: int | None = None, dtype=jnp.float32, extras: bool = True,
              presence: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Steer a trained GPT toward concept `target` at layer `layer` and sweep it. Returns (arrays, meta).

    Args:
      run: a loaded GPT run.
      alphas: the grid (any 1-D finite grid; the experiments use `scaled_grid`).
      target: concept index (text: also a class name, e.g. "uppercase").
      negatives, negative_concept, q, seed: the steering sets (`steering_sets`).
      layer: residual layer in [0, L] (default ceil(L/2)); positions: "all" or "last".
      ce_against: "data" (concept: p(z|c_j); text: the observed next character) or "model".
      top_k: track only the k most likely tokens at the largest alpha (Fig. 6).
      derivatives, chunk_size, dtype: as for the kernel.
      extras: also compute the Prop. 4.1 limit, the local UFM and (text) all-position CE.
      presence: also sample steered generations on a 21-point subgrid.
    Returns:
      arrays: the kernel's keys (as for the UFM) and P, N (indices into steer_prompts),
        steering_vector, prompts [M, T] (the rows), steer_prompts; concept data: p_data,
        context_concept; text: labels [M]. With extras: limit_logits [2, V] (LN(±v) W^T),
        limit_distance [A], limit_probe_alphas / limit_probe_distance [2] (at ±1e4),
        local_ufm_direction [M, V] (u), local_ufm_kl [A] (pi-weighted mean over rows),
        local_ufm_kl_max [A], local_ufm_range [2], local_ufm_censored [2]; text:
        text_delta_ce [A] (every position of held-out text steered) with d_ / d2_,
        text_kl [A], text_concept_prob [A]. With presence: presence_alphas [A'],
        concept_presence [A'], concept_share [A'].
      meta: a JSON-able dict (model "gpt", corpus, layer, positions, target, ...).
    """
    t0 = time.perf_counter()
    model = run.model
    layer = default_layer(model) if layer is None else check_layer(model, layer)
    positions = check_positions(positions)
    if ce_against not in ("data", "model"):
        raise ValueError(f"ce_against must be 'data' or 'model', got {ce_against!r}")
    alphas = check_alphas(alphas)
    if run.corpus == "text":
        target = concept_index(target)
    steer_prompts, P, N = steering_sets(run, target, negatives, negative_concept, q, seed)
    v = gpt_steering_vector(model, steer_prompts, P, N, layer)

    rows = sweep_rows(run)
    prompts, weights, concept_of = rows["prompts"], rows["weights"], rows["concept_of"]
    ce_target = rows["ce_target"] if ce_against == "data" else None
    extra = rows["extra"]
    new_tokens = rows["new_tokens"]

    steered = steered_closure(model, prompts, v, layer, positions, dtype=dtype)
    if chunk_size is None:
        chunk_size = gpt_chunk_size(model, len(prompts), prompts.shape[1] if positions == "all" else 1)
    tokens = None
    if top_k is not None:
        # Fig. 6 tracks the most likely tokens at the largest alpha in the target's direction.
        tokens = top_tokens(steered, [alphas.max()] if alphas.max() > 0 else alphas, top_k)
    arrays = sweep(steered, alphas, concept_of=concept_of, ce_target=ce_target, weights=weights,
                   tokens=tokens, derivatives=derivatives, chunk_size=chunk_size, dtype=dtype)
    arrays.update(P=np.asarray(P), N=np.asarray(N), steering_vector=np.asarray(v),
                  prompts=np.asarray(prompts), steer_prompts=np.asarray(steer_prompts), **extra)
    meta: dict[str, Any] = {
        "model": "gpt", "corpus": run.corpus, "run": str(run.path), "target": int(target),
        "target_name": CLASSES[target] if run.corpus == "text" else f"concept {target}",
        "negatives": negatives, "negative_concept": negative_concept, "q": len(P), "seed": seed,
        "layer": layer, "layers": model.config.layers, "positions": positions, "ce_against": ce_against,
        "dtype": str(jnp.dtype(dtype)), "derivatives": derivatives, "versions": versions()}

    if extras:
        lim = limit_logits(model, v)
        ex = grid_extras(steered, alphas, lim, arrays["weights"], chunk_size, dtype)
        lo, hi, censored = refine_validity_range(steered, alphas, ex["local_ufm_kl"], weights=arrays["weights"],
                                                 dtype=dtype, chunk_size=chunk_size)
        probe = np.asarray([-LIMIT_PROBE, LIMIT_PROBE])
        arrays.update(limit_probe_alphas=probe,
                      limit_probe_distance=grid_extras(steered, probe, lim, arrays["weights"], 2, dtype)["limit_distance"])
        arrays.update(limit_logits=lim, limit_distance=ex["limit_distance"], local_ufm_kl=ex["local_ufm_kl"],
                      local_ufm_kl_max=ex["local_ufm_kl_max"], local_ufm_direction=ex["local_ufm_direction"],
                      local_ufm_range=np.asarray([lo, hi]), local_ufm_censored=np.asarray(censored))
        meta["local_ufm_threshold"] = LOCAL_UFM_KL
        if run.corpus == "text":
            # Sec. 4: CE on held-out text with EVERY position steered; rows = (prompt, position).
            w = run.source.spaced_windows(text_prompt_len(model) + 1, TEXT_CE_PROMPTS, "val")
            all_pos = steered_closure(model, w[:, :-1], v, layer, "all", rows="all", dtype=dtype)
            tx = sweep(all_pos, alphas, concept_of=concept_of, ce_target=w[:, 1:].reshape(-1),
                       tokens=np.asarray([0]), derivatives=derivatives, dtype=dtype,
                       chunk_size=gpt_chunk_size(model, w.shape[0], w.shape[1] - 1))
            arrays["text_delta_ce"] = tx["delta_ce"]
            arrays["text_kl"] = tx["kl"].mean(axis=1)
            arrays["text_concept_prob"] = tx["concept_prob"][:, :, target].mean(axis=1)
            for prefix in ("d_", "d2_")[:derivatives]:
                arrays[prefix + "text_delta_ce"] = tx[prefix + "delta_ce"]
            meta["text_ce_rows"] = int(w.shape[0] * (w.shape[1] - 1))
    if presence and new_tokens >= 1:
        idx = np.unique(np.linspace(0, alphas.size - 1, min(PRESENCE_POINTS, alphas.size)).round().astype(int))
        pa = alphas[idx]
        gen_prompts = prompts[np.arange(PRESENCE_SAMPLES) % len(prompts)]
        pr = concept_presence(model, gen_prompts, v, layer, pa, target, concept_of, positions=positions,
                              new_tokens=new_tokens, seed=seed)
        arrays.update(presence_alphas=pa, concept_presence=pr["presence"], concept_share=pr["share"])
        meta["presence"] = {"generations_per_alpha": len(gen_prompts), "new_tokens": int(new_tokens),
                            "threshold": PRESENCE_THRESHOLD}
    meta["seconds"] = time.perf_counter() - t0
    return arrays, meta


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
    """The model-size table's numbers for one sweep (Thm 3.3, 3.6, 3.8, Prop. 4.1, item 7)."""
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
    s = float(np.median(np.linalg.norm(h, axis=-1)) / max(np.linalg.norm(v_D), 1e-12))
    t = np.linspace(-np.arcsinh(reach), np.arcsinh(reach), num)
    return s * np.sinh(t)


def text_run(root, layers: int, *, steps: int | None = None, progress: bool = True) -> GPTRun:
    """Train (or reuse, or resume) a text GPT with `layers` blocks at `root/text_L<layers>`."""
    cfg = TEXT_TRAIN if steps is None else replace(TEXT_TRAIN, steps=steps, warmup=min(100, steps // 10),
                                                   eval_every=0, ckpt_every=0)
    out = Path(root) / f"text_L{layers}"
    train_gpt_run(out, "text", gpt={"layers": layers}, train_config=cfg, progress=progress)
    return load_gpt_run(out)


def scaled_sweep(run: GPTRun, layer: int, target="uppercase", *, positions: str = "all", reach: float = 50.0,
                 num: int = 401, top_k: int | None = None, presence: bool = True):
    """gpt_sweep on a grid reaching alpha |v| = reach * |h| (dense near 0, see scaled_grid),
    tracking every token (summarize_sweep picks the top 10 at the largest alpha itself).
    Returns (arrays, meta, summary)."""
    target = concept_index(target) if run.corpus == "text" else target
    steer_prompts, P, N = steering_sets(run, target)
    v = gpt_steering_vector(run.model, steer_prompts, P, N, layer)
    alphas = scaled_grid(run.model, sweep_rows(run)["prompts"], v, layer, reach, num)
    t0 = time.perf_counter()
    arrays, meta = gpt_sweep(run, alphas, target=target, layer=layer, positions=positions, top_k=top_k,
                             presence=presence)
    meta["sweep_seconds"] = time.perf_counter() - t0
    return arrays, meta, summarize_sweep(arrays, target)


# ---------------------------------------------------------------- CLI hooks

def add_train_args(p) -> None:
    """Options of `ufmjax train gpt`."""
    p.add_argument("--corpus", choices=CORPORA, default="concept",
                   help="concept: the concept dataset; text: characters of Python's bundled docs")
    p.add_argument("--layers", type=int, default=None, help="blocks L (concept 1, text 2)")
    p.add_argument("--width", type=int, default=None, help="residual width D (concept 32, text 64)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (concept 2, text 4)")
    p.add_argument("--mlp-ratio", type=int, default=None, help="MLP width / D (4)")
    p.add_argument("--tied", action="store_true", help="tie the unembedding to the token embedding")
    p.add_argument("--norm", choices=["layernorm", "rmsnorm"], default="layernorm")
    p.add_argument("--context", type=int, default=None,
                   help="positions (text: window length, 64; concept: context_len + 1)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (concept 500, text 1500)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (concept 256, text 32)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (3e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (concept 50, text 100)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW decay (concept 0, text 0.01)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every k steps (text 500)")
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every k steps (default: eval-every)")
    p.add_argument("--val-frac", type=float, default=0.1, help="text: validation share (the end of the text)")
    p.add_argument("--vocab", type=int, default=9, help="concept: vocabulary size V")
    p.add_argument("--concepts", type=int, default=3, help="concept: number of concepts G")
    p.add_argument("--eps", type=float, default=0.05, help="concept: off-concept mass")
    p.add_argument("--context-len", type=int, default=4, help="concept: tokens per context (T-1)")
    p.add_argument("--contexts-per-concept", type=int, default=4, help="concept: steered contexts per concept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def configs_from_args(args):
    """(gpt overrides, TrainConfig, batch) from parsed `train gpt` arguments."""
    gpt = {k: getattr(args, a) for k, a in (("layers", "layers"), ("width", "width"), ("heads", "heads"),
                                            ("mlp_ratio", "mlp_ratio"), ("context", "context"))
           if getattr(args, a) is not None}
    gpt.update(tied=bool(args.tied), norm=args.norm)
    base = CONCEPT_TRAIN if args.corpus == "concept" else TEXT_TRAIN
    changes = {k: getattr(args, a) for k, a in (("steps", "steps"), ("lr", "lr"), ("warmup", "warmup"),
                                                ("weight_decay", "weight_decay"), ("eval_every", "eval_every"),
                                                ("ckpt_every", "ckpt_every"))
               if getattr(args, a) is not None}
    if "steps" in changes and "warmup" not in changes:
        changes["warmup"] = min(base.warmup, changes["steps"] // 10)
    if "steps" in changes and "eval_every" not in changes and base.eval_every >= changes["steps"]:
        changes["eval_every"] = 0
    train_cfg = replace(base, **changes)
    if args.ckpt_every is None:
        train_cfg = replace(train_cfg, ckpt_every=train_cfg.eval_every)
    return gpt, train_cfg, args.batch


def cli_train(args) -> dict:
    """`ufmjax train gpt ...`: train, then print one summary line."""
    gpt, train_cfg, batch = configs_from_args(args)
    if args.corpus == "concept":
        kw = {"data_config": DataConfig(vocab=args.vocab, concepts=args.concepts, eps=args.eps,
                                        context_len=args.context_len,
                                        contexts_per_concept=args.contexts_per_concept, seed=args.seed)}
    else:
        kw = {"text_config": TextConfig(val_frac=args.val_frac)}
    metrics = train_gpt_run(args.out, args.corpus, gpt=gpt, train_config=train_cfg, batch=batch, seed=args.seed,
                            progress=not args.quiet, force=args.force, **kw)
    if args.corpus == "concept":
        print(f"final_ce={metrics['final_ce']:.6f} entropy={metrics['entropy']:.6f} gap={metrics['gap']:.2e} nats "
              f"(fixed contexts gap={metrics['gap_fixed']:.2e})  {metrics['seconds']:.1f}s  ({args.out})")
    else:
        print(f"val_loss={metrics['val_loss']:.4f} bigram={metrics['bigram_val_loss']:.4f} "
              f"unigram={metrics['unigram_val_loss']:.4f} nats/char  {metrics['seconds']:.1f}s  ({args.out})")
    return metrics


def cli_sweep(args, alphas, dtype):
    """`ufmjax sweep RUN ...` on a GPT run: (arrays, meta) in the UFM's .npz format plus extras."""
    from ufmjax.runs import load_run

    run = load_run(args.run)
    return gpt_sweep(run, alphas, target=args.target, negatives=args.negatives,
                     negative_concept=args.negative_concept, q=args.q, seed=args.seed, layer=args.layer,
                     positions=args.positions, ce_against=args.ce_against, top_k=args.top_k,
                     chunk_size=args.chunk_size, dtype=dtype)
