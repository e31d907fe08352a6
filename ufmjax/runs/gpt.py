"""GPT runs: train a small GPT on concept data or bundled text, load it, steer and sweep it.

Shape legend: A = alphas, M = sweep rows (prompts), T = positions, V = vocabulary,
D = residual width, K = tracked tokens, Q = prompts of a steering set, B = generations.

The GPT goes through the SAME kernel as the UFM: `GPTRun.steer` builds the prefix-cached
closure `alpha -> steered logits` (`models.gpt.steered_closure`) with its rows and CE
reference; `gpt_sweep` sweeps it and, when asked, adds what only a transformer has (the
Prop. 4.1 limit, the local UFM, CE on held-out text with every position steered, sampled
concept presence; `ufmjax.analysis.gpt_probes`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax.analysis.gpt_probes import (
    PRESENCE_THRESHOLD,
    concept_presence,
    scaled_grid,
    summarize_sweep,
)
from ufmjax.common import check_seed, log_softmax64
from ufmjax.data import CLASSES, CORPORA, ConceptData, DataConfig, TextConfig, TextCorpus, concept_index, select_steering_sets
from ufmjax.data.text import steering_prompts
from ufmjax.kernel.grid import resolve_top_k
from ufmjax.models.gpt import (
    GPT,
    GPTConfig,
    check_layer,
    check_positions,
    init_gpt,
    limit_logits,
    logits,
    mean_residual,
    next_token_loss,
    steered_closure,
)
from ufmjax.runs import io
from ufmjax.runs.folders import check_finished, open_run, run_lock, versions
from ufmjax.runs.progress import Progress
from ufmjax.runs.steer import Steering, add_probes, add_text_ce, check_ce_against, probe_size, sweep_grid
from ufmjax.runs.train import TrainConfig, check_final_checkpoint, restore_model, train
from ufmjax.runs.ufm import int_target
from ufmjax.steering import diff_of_means


# Defaults of `ufmjax train gpt` (measured on 2 CPU cores: concept ~10 s, text ~1.5 min).
CONCEPT_GPT = {"layers": 1, "width": 32, "heads": 2, "mlp_ratio": 4}
CONCEPT_TRAIN = TrainConfig(steps=500, lr=3e-3, warmup=50, weight_decay=0.0, clip=1.0)
CONCEPT_BATCH = 256
TEXT_GPT = {"context": 64, "layers": 2, "width": 64, "heads": 4, "mlp_ratio": 4}
TEXT_TRAIN = TrainConfig(steps=1500, lr=3e-3, warmup=100, weight_decay=0.01, clip=1.0, eval_every=500)
TEXT_BATCH = 32

# What a finished run reports (and `ufmjax train gpt` prints).
GPT_METRICS = {"concept": ("final_ce", "entropy", "gap", "gap_fixed", "seconds"),
               "text": ("val_loss", "bigram_val_loss", "unigram_val_loss", "seconds")}
TEXT_ROWS = 64       # held-out prompts of a text sweep
TEXT_CE_PROMPTS = 16 # held-out prompts whose every position enters the all-positions CE
PRESENCE_POINTS = 21 # alphas of the sampled-presence subgrid
PRESENCE_SAMPLES = 64  # generations per alpha (the sweep's prompts, cycled)


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
    logp = log_softmax64(logits(model, contexts)[:, -1], axis=1)
    return float(-np.dot(weights, np.sum(p_MxV * logp, axis=1)))


def text_ce(model: GPT, windows_NxT) -> float:
    """Mean next-token cross-entropy of the GPT on positions 1..T-1 of each window."""
    logp = log_softmax64(logits(model, windows_NxT[:, :-1]), axis=-1)
    return float(-np.take_along_axis(logp, windows_NxT[:, 1:, None], axis=-1).mean())


def train_gpt_run(out, corpus: str = "concept", *, data_config: DataConfig | None = None,
                  text_config: TextConfig | None = None, gpt: dict | None = None,
                  train_config: TrainConfig | None = None, batch: int | None = None, seed: int = 0,
                  progress: bool = True, force: bool = False, stop_after: int | None = None) -> dict:
    """Train a GPT into a run folder (mirrors `train_ufm_run`). Returns its metrics.

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
    Raises:
      RunError: another ufmjax process trains into `out` (or `out` cannot hold this run).
      TrainingDiverged: the loss blew up; no final checkpoint or metrics are written.
    """
    seed = check_seed(seed)
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
        batch = CONCEPT_BATCH if batch is None else batch  # 0 is an error, not the default
        corpus_cfg = {"data": data_config.to_dict()}
    else:
        text_config = text_config or TextConfig()
        source = TextCorpus(text_config)
        fields = {**TEXT_GPT, **gpt, "vocab": source.vocab}
        train_config = train_config or TEXT_TRAIN
        batch = TEXT_BATCH if batch is None else batch
        corpus_cfg = {"text": text_config.to_dict(), "text_sha256": source.sha256, "text_chars": len(source.text)}
    gpt_config = GPTConfig(**fields)
    if corpus == "text" and gpt_config.context < 2:
        raise ValueError(f"context must be >= 2 on text, got {gpt_config.context}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    config = {"model": "gpt", "corpus": corpus, **corpus_cfg, "gpt": gpt_config.to_dict(),
              "train": train_config.to_dict(), "batch": batch, "seed": seed, "versions": versions()}

    # The folder is locked from opening the run to writing metrics.json (one process per run).
    with run_lock(out, force):
        out, finished = open_run(out, config, force)
        if finished is not None:
            check_final_checkpoint(out, train_config.steps)  # a finished run must still be whole
            return io.check_metrics(finished, out, GPT_METRICS[corpus])

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
    """A finished GPT run folder, loaded."""

    path: Path
    config: dict
    corpus: str
    source: Any  # ConceptData or TextCorpus
    model: GPT
    metrics: dict

    def target_index(self, target) -> int:
        """A concept index: concept data takes indices; text also class names (e.g. uppercase)."""
        if self.corpus == "text":
            return concept_index(int(target) if str(target).isdigit() else target)
        return int_target(target, self.source.num_concepts)

    def steer(self, target, negatives: str = "contrastive", *, negative_concept: int | None = None,
              q: int | None = None, seed: int = 0, ce_against: str = "data", layer: int | None = None,
              positions: str | None = None, dtype=jnp.float32) -> Steering:
        """Steer the GPT toward concept `target` at residual layer `layer` (default ceil(L/2)).

        The vector is Eq. 3 over token-averaged residuals of the steering prompts; the rows are
        `sweep_rows(run)` (the concept contexts, or held-out text prompts); `positions` "all"
        (default) or "last"; the prefix below the layer is computed once, in `dtype`.
        """
        model = self.model
        layer = default_layer(model) if layer is None else check_layer(model, layer)
        positions = check_positions("all" if positions is None else positions)
        check_ce_against(ce_against)
        target = self.target_index(target)
        steer_prompts, P, N = steering_sets(self, target, negatives, negative_concept, q, seed)
        if len(P) == 0 or len(N) == 0:
            raise ValueError("P and N prompt sets must be non-empty")
        feats = mean_residual(model, steer_prompts, layer)  # Eq. 3's per-prompt terms
        v = diff_of_means(feats, P, N)
        rows = sweep_rows(self)
        meta = {"model": "gpt", "corpus": self.corpus, "run": str(self.path), "target": int(target),
                "target_name": CLASSES[target] if self.corpus == "text" else f"concept {target}",
                "negatives": negatives, "negative_concept": negative_concept, "q": len(P), "seed": seed,
                "layer": layer, "layers": model.config.layers, "positions": positions, "ce_against": ce_against}
        arrays = {"prompts": np.asarray(rows.prompts), "steer_prompts": np.asarray(steer_prompts), **rows.extra}
        return Steering(steered_closure(model, rows.prompts, v, layer, positions, dtype=dtype),
                        concept_of=rows.concept_of, ce_target=rows.ce_target if ce_against == "data" else None,
                        weights=rows.weights, P=np.asarray(P), N=np.asarray(N), vector=np.asarray(v),
                        target=int(target), dtype=jnp.dtype(dtype), meta=meta, arrays=arrays,
                        features=(np.asarray(feats, np.float64)[P], np.asarray(feats, np.float64)[N]))


def load_gpt_run(run_dir) -> GPTRun:
    """Load a finished GPT run folder."""
    cfg = check_finished(run_dir)
    if cfg["model"] != "gpt":
        raise io.RunError(f"run folder {str(run_dir)!r} is not a GPT run (model={cfg['model']!r})")
    if cfg["corpus"] == "concept":
        source = io.from_config(run_dir, "data", lambda: ConceptData(DataConfig.from_dict(cfg["data"])))
    else:
        source = io.from_config(run_dir, "text", lambda: TextCorpus(TextConfig.from_dict(cfg["text"])))
        if source.sha256 != cfg["text_sha256"]:
            raise io.RunError(f"run folder {str(run_dir)!r} was trained on another pydoc corpus "
                              f"(another Python version); its vocabulary no longer matches")
    gpt_config = io.from_config(run_dir, "gpt", lambda: GPTConfig.from_dict(cfg["gpt"]))
    if gpt_config.vocab != source.vocab:
        raise io.RunError(f"run folder {str(run_dir)!r}: {io.CONFIG_FILE} field 'gpt' has vocab {gpt_config.vocab}, "
                          f"its corpus {source.vocab}")
    model = io.from_config(run_dir, "gpt", lambda: init_gpt(gpt_config))
    restore_model(model, run_dir)
    return GPTRun(Path(run_dir), cfg, cfg["corpus"], source, model, io.read_metrics(run_dir))


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


# ---------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class SweepRows:
    """The rows a sweep of a GPT run evaluates and what they are measured against."""

    prompts: np.ndarray       # [M, T] token ids
    weights: Any              # [M] (concept data: pi) or None (uniform)
    ce_target: np.ndarray     # [M, V] table (concept data) or [M] next tokens (text)
    concept_of: np.ndarray    # [V]
    new_tokens: int           # tokens generated per prompt for sampled concept presence
    extra: dict               # arrays a sweep file carries: p_data/context_concept or labels


def sweep_rows(run: GPTRun) -> SweepRows:
    """Concept data: the dataset's contexts, CE against p(z|c_j), weights pi (as for the UFM).
    Text: TEXT_ROWS held-out prompts spread over the validation split, CE against the
    character that follows each."""
    model = run.model
    if run.corpus == "concept":
        data = run.source
        # One new token: the concept position is the only one the data defines.
        return SweepRows(data.contexts, data.pi, data.p_MxV, data.concept_of,
                         min(1, model.config.context - data.contexts.shape[1]),
                         {"p_data": data.p_MxV, "context_concept": data.context_concept})
    n = text_prompt_len(model)
    windows = run.source.spaced_windows(n + 1, TEXT_ROWS, "val")
    return SweepRows(windows[:, :-1], None, windows[:, -1], run.source.concept_of,
                     min(16, model.config.context - n), {"labels": windows[:, -1]})


def gpt_sweep(run: GPTRun, alphas, *, target, negatives: str = "contrastive", negative_concept=None,
              q: int | None = None, seed: int = 0, layer: int | None = None, positions: str | None = "all",
              ce_against: str = "data", top_k: int | None = None, top_k_at: str = "max", derivatives: int = 2,
              chunk_size: int | None = None, dtype=jnp.float32, limits: bool = False, local_ufm: bool = False,
              text_ce: bool = False, presence: bool = False, max_output: int | None = None, sink=None,
              progress: bool = False, normalize: str = "raw", bootstrap: int | None = None,
              bootstrap_seed: int = 0, vector=None) -> tuple[dict[str, np.ndarray], dict]:
    """Steer a trained GPT toward concept `target` at layer `layer` and sweep it. Returns (arrays, meta).

    Args:
      run: a loaded GPT run.
      alphas: an increasing grid or a `kernel.Grid` (the experiments use `scaled_grid`).
      target, negatives, negative_concept, q, seed, layer, positions, ce_against: the steering
        (`GPTRun.steer`).
      top_k, top_k_at: track only the k most likely tokens at the grid's "max" end (the
        target's direction; Fig. 6), its "min" end, or "both" (`runs.steer.sweep_grid`).
      derivatives, chunk_size, dtype: as for the kernel.
      limits: also the Prop. 4.1 distance to LN(+-v) W^T along the grid and at alpha = +-1e4.
      local_ufm: also the local UFM's KL along the grid and its validity range.
      text_ce: (text runs) also CE on held-out text with every position steered.
      presence: also sample steered generations on a 21-point subgrid.
      max_output: refuse (ValueError), before the grid is built, a sweep whose arrays would
        exceed this many bytes; None for no limit (`ufmjax sweep` passes --max-output).
      sink: where the arrays go (a `runs.sweepfile.SweepFile` streams the kernel's to disk;
        the probes are computed in memory, [A] each after their reduction over rows).
      progress: progress bars over the grid (the kernel's sweep and the text CE).
      normalize: the vector's norm convention (`runs.several.normalized`); with "preserve"
        the probes of additive steering (limits, local UFM, text CE, presence) are left out.
      bootstrap, bootstrap_seed: B resamples of P and N give `<key>_lo` / `<key>_hi` bands of
        every kernel curve (`runs.several.bootstrap_bands`).
      vector: a [D] vector (from a file) instead of Eq. 3's, added at `layer`.
    Returns:
      arrays: the kernel's keys (as for the UFM) and P, N (indices into steer_prompts),
        steering_vector, prompts [M, T] (the rows), steer_prompts; concept data: p_data,
        context_concept; text: labels [M]. limits: limit_logits [2, V], limit_distance [A],
        limit_probe_alphas / limit_probe_distance [2]. local_ufm: local_ufm_direction [M, V]
        (u), local_ufm_kl [A] (weighted mean over rows), local_ufm_kl_max [A],
        local_ufm_range [2], local_ufm_censored [2]. text_ce: text_delta_ce [A] with d_ /
        d2_, text_kl [A], text_concept_prob [A]. presence: presence_alphas [A'],
        concept_presence [A'], concept_share [A'].
      meta: a JSON-able dict (model "gpt", corpus, layer, positions, target, ...).
    """
    from ufmjax.runs.several import add_bands, file_vector, normalized

    t0 = time.perf_counter()
    st = run.steer(target, negatives, negative_concept=negative_concept, q=q, seed=seed, ce_against=ce_against,
                   layer=layer, positions=positions, dtype=dtype)
    st = normalized(run, file_vector(st, vector), normalize)
    if normalize == "preserve":  # the probes below are laws of additive steering
        limits = local_ufm = text_ce = presence = False
    model, layer, positions, target = run.model, st.meta["layer"], st.meta["positions"], st.target
    prompts = st.arrays["prompts"]
    if chunk_size is None:
        chunk_size = gpt_chunk_size(model, len(prompts), prompts.shape[1] if positions == "all" else 1)
    with_text = text_ce and run.corpus == "text"
    extra = probe_size(st, limits=limits, local_ufm=local_ufm, text_ce_derivatives=derivatives if with_text else None,
                       presence=PRESENCE_POINTS if presence else 0)
    top_k = resolve_top_k(top_k, st.vocab)  # meta records what was tracked
    alphas, arrays = sweep_grid(st, alphas, top_k=top_k, top_k_at=top_k_at, derivatives=derivatives,
                                chunk_size=chunk_size, max_output=max_output, extra=extra, sink=sink,
                                progress=progress, desc="sweep gpt", bands=bootstrap is not None)
    meta: dict[str, Any] = {**st.meta, "dtype": str(jnp.dtype(dtype)), "derivatives": derivatives, "top_k": top_k,
                            "top_k_at": top_k_at, "versions": versions()}
    add_bands(arrays, meta, run, st, alphas, bootstrap, seed=bootstrap_seed, top_k=top_k, derivatives=derivatives,
              chunk_size=chunk_size, progress=progress)
    if limits or local_ufm:  # a few seconds on a text GPT: a bar (elapsed time) says what runs
        with Progress(1, "limit and local-UFM probes", enabled=progress) as bar:
            _add_probes(arrays, meta, run.model, st, alphas, chunk_size, limits, local_ufm)
            bar.update(1)
    if with_text:
        _add_text_ce(arrays, meta, run, st, alphas, derivatives, progress)
    new_tokens = sweep_rows(run).new_tokens
    if presence and new_tokens >= 1:
        idx = np.unique(np.linspace(0, alphas.size - 1, min(PRESENCE_POINTS, alphas.size)).round().astype(int))
        pa = alphas[idx]
        gen_prompts = prompts[np.arange(PRESENCE_SAMPLES) % len(prompts)]
        with Progress(1, f"concept presence ({len(gen_prompts)} generations x {pa.size} alphas)",
                      enabled=progress) as bar:
            pr = concept_presence(model, gen_prompts, st.vector, layer, pa, target, st.concept_of,
                                  positions=positions, new_tokens=new_tokens, seed=seed)
            bar.update(1)
        arrays.update(presence_alphas=pa, concept_presence=pr["presence"], concept_share=pr["share"])
        meta["presence"] = {"generations_per_alpha": len(gen_prompts), "new_tokens": int(new_tokens),
                            "threshold": PRESENCE_THRESHOLD}
    meta["seconds"] = time.perf_counter() - t0
    return arrays, meta


def _add_probes(arrays, meta, model: GPT, st: Steering, alphas, chunk_size, limits: bool, local_ufm: bool) -> None:
    """Prop. 4.1 (the limits LN(+-v) W^T) and the local UFM along the grid, into arrays/meta."""
    add_probes(arrays, meta, st, alphas, chunk_size, limit_logits(model, st.vector) if limits else None, local_ufm)


def _add_text_ce(arrays, meta, run: GPTRun, st: Steering, alphas, derivatives: int, progress: bool = False) -> None:
    """Sec. 4: CE on held-out text with EVERY position steered; rows = (prompt, position)."""
    model = run.model
    w = run.source.spaced_windows(text_prompt_len(model) + 1, TEXT_CE_PROMPTS, "val")
    all_pos = steered_closure(model, w[:, :-1], st.vector, st.meta["layer"], "all", rows="all", dtype=st.dtype)
    add_text_ce(arrays, meta, st, all_pos, w[:, 1:].reshape(-1), alphas, derivatives,
                gpt_chunk_size(model, w.shape[0], w.shape[1] - 1), progress)


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
    st = run.steer(target, layer=layer, positions=positions)
    target = st.target
    alphas = scaled_grid(run.model, st.arrays["prompts"], st.vector, layer, reach, num)
    t0 = time.perf_counter()
    arrays, meta = gpt_sweep(run, alphas, target=target, layer=layer, positions=positions, top_k=top_k,
                             limits=True, local_ufm=True, text_ce=True, presence=presence)
    meta["sweep_seconds"] = time.perf_counter() - t0
    return arrays, meta, summarize_sweep(arrays, target)


