"""UFM runs: train a UFM on the exact expected cross-entropy, load it, steer it, sweep it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax.common import check_seed, log_softmax64
from ufmjax.data import ConceptData, DataConfig, select_steering_sets
from ufmjax.kernel.grid import resolve_top_k
from ufmjax.models.ufm import UFM, UFMConfig, ufm_loss, ufm_steered, ufm_steering_vector
from ufmjax.runs import io
from ufmjax.runs.folders import check_finished, open_run, run_lock, versions
from ufmjax.runs.steer import Steering, check_ce_against, sweep_grid
from ufmjax.runs.train import TrainConfig, check_final_checkpoint, restore_model, train

UFM_METRICS = ("final_ce", "entropy", "gap", "steps", "seconds")  # what a finished run reports
UFM_TRAIN_DEFAULTS = TrainConfig(steps=2000, lr=0.05, clip=0.0, ckpt_every=500)


def train_ufm_run(out, data_config: DataConfig, *, dim: int = 16, seed: int = 0,
                  train_config: TrainConfig = UFM_TRAIN_DEFAULTS, progress: bool = True,
                  force: bool = False) -> dict:
    """Train a UFM on the exact expected cross-entropy of a concept dataset; write a run folder.

    Re-running on a finished run with the same configuration returns its metrics (no work);
    an unfinished run resumes from its last checkpoint. Returns the metrics dict. Raises
    RunError when another ufmjax process trains into `out`, TrainingDiverged when the loss blows up.
    """
    seed = check_seed(seed)
    data = ConceptData(data_config)
    ufm_config = UFMConfig(vocab=data.vocab, contexts=data.num_contexts, dim=dim)
    config = {"model": "ufm", "data": data_config.to_dict(), "ufm": ufm_config.to_dict(),
              "train": train_config.to_dict(), "seed": seed, "versions": versions()}
    # The folder is locked from opening the run to writing metrics.json (one process per run).
    with run_lock(out, force):
        out, finished = open_run(out, config, force)
        if finished is not None:
            check_final_checkpoint(out, train_config.steps)  # a finished run must still be whole
            return io.check_metrics(finished, out, UFM_METRICS)

        model = UFM(ufm_config, rngs=nnx.Rngs(seed))
        batch = (jnp.asarray(data.p_MxV, jnp.float32), jnp.asarray(data.pi, jnp.float32))
        result = train(model, ufm_loss, train_config, batch_fn=lambda step: batch, run_dir=out,
                       progress=progress, desc="train ufm")
        final_ce = ufm_ce64(model, data)
        metrics = {"final_ce": final_ce, "entropy": data.entropy(), "gap": final_ce - data.entropy(),
                   "steps": result.steps, "seconds": result.seconds, "resumed_from": result.resumed_from}
        io.write_json_atomic(out / io.METRICS_FILE, metrics)
    return metrics


def ufm_ce64(model: UFM, data: ConceptData) -> float:
    """The model's exact expected cross-entropy, evaluated in float64 numpy."""
    logp = log_softmax64(np.asarray(model(), dtype=np.float64), axis=1)
    return float(-np.dot(data.pi, np.sum(data.p_MxV * logp, axis=1)))


@dataclass
class UFMRun:
    """A finished UFM run folder, loaded."""

    path: Path
    config: dict
    data: ConceptData
    model: UFM
    metrics: dict

    def steer(self, target: int, negatives: str = "contrastive", *, negative_concept: int | None = None,
              q: int | None = None, seed: int = 0, ce_against: str = "data", layer=None,
              positions: str | None = None, dtype=jnp.float32) -> Steering:
        """Steer the UFM toward concept `target` (Eq. 3 on the context embeddings).

        Rows are the m contexts; CE against p(z|c_j) ("data") or the unsteered model
        ("model"), weights pi. `layer` and `positions` are GPT notions: a UFM has neither.
        """
        if layer is not None:
            raise ValueError("layer applies to GPT runs only")
        if positions not in (None, "all"):
            raise ValueError("positions applies to GPT runs only")
        target = int_target(target, self.data.num_concepts)
        check_ce_against(ce_against)
        data = self.data
        P, N = select_steering_sets(data.context_concept, target, negatives, negative_concept, q, seed)
        v = ufm_steering_vector(self.model, P, N)
        meta = {"model": "ufm", "run": str(self.path), "target": target, "negatives": negatives,
                "negative_concept": negative_concept, "q": int(P.size), "seed": seed, "ce_against": ce_against}
        return Steering(ufm_steered(self.model, v), concept_of=data.concept_of,
                        ce_target=data.p_MxV if ce_against == "data" else None, weights=data.pi, P=P, N=N,
                        vector=np.asarray(v), target=target, dtype=jnp.dtype(dtype), meta=meta,
                        arrays={"p_data": data.p_MxV, "context_concept": data.context_concept},
                        features=_context_features(self.model, P, N))


def _context_features(model: UFM, P, N):
    """The context embeddings of P and N (float64), whose means' difference is Eq. 3's v."""
    h_MxD = np.asarray(model.H[...], np.float64).T
    return h_MxD[np.asarray(P)], h_MxD[np.asarray(N)]


def int_target(target, num_concepts: int) -> int:
    """A concept index in [0, G), from an int or a string of digits, else ValueError naming it."""
    if isinstance(target, bool):
        raise ValueError(f"unknown target concept {target!r}: give a concept index")
    try:
        target = int(target)
    except (TypeError, ValueError):
        raise ValueError(f"unknown target concept {target!r}: give a concept index") from None
    if not 0 <= target < num_concepts:
        raise ValueError(f"unknown target concept {target}: this run has concepts 0..{num_concepts - 1}")
    return target


def load_ufm_run(run_dir) -> UFMRun:
    """Load a finished UFM run folder."""
    cfg = check_finished(run_dir)
    if cfg["model"] != "ufm":
        raise io.RunError(f"run folder {str(run_dir)!r} is not a UFM run (model={cfg['model']!r})")
    data = io.from_config(run_dir, "data", lambda: ConceptData(DataConfig.from_dict(cfg["data"])))
    ufm_config = io.from_config(run_dir, "ufm", lambda: UFMConfig(**cfg["ufm"]))
    if (ufm_config.vocab, ufm_config.contexts) != (data.vocab, data.num_contexts):
        raise io.RunError(f"run folder {str(run_dir)!r}: {io.CONFIG_FILE} field 'ufm' (vocab {ufm_config.vocab}, "
                          f"contexts {ufm_config.contexts}) does not match its data ({data.vocab}, {data.num_contexts})")
    # Shapes only: the checkpoint replaces every parameter (a UFM holds nothing else), so its
    # random initialisation would only cost a compile per new shape.
    model = nnx.eval_shape(lambda: UFM(ufm_config, rngs=nnx.Rngs(0)))
    restore_model(model, run_dir)
    return UFMRun(Path(run_dir), cfg, data, model, io.read_metrics(run_dir))


def ufm_sweep(run: UFMRun, alphas, *, target: int, negatives: str = "contrastive",
              negative_concept: int | None = None, q: int | None = None, seed: int = 0,
              ce_against: str = "data", top_k: int | None = None, top_k_at: str = "max", derivatives: int = 2,
              chunk_size: int | None = None, dtype=jnp.float32, layer=None,
              positions: str | None = None, max_output: int | None = None, sink=None,
              progress: bool = False, normalize: str = "raw", bootstrap: int | None = None,
              bootstrap_seed: int = 0, vector=None) -> tuple[dict[str, np.ndarray], dict]:
    """Steer a trained UFM toward `target` and sweep it. Returns (arrays, meta).

    `alphas`: an increasing grid, or a `kernel.Grid` (built once its output size is accepted).
    `ce_against`: "data" measures cross-entropy against the true table p(z|c_j) with the
    context probabilities pi; "model" against the model's own unsteered distribution.
    `top_k`, `top_k_at`: track only the k most likely tokens at the grid's "max" end (the
    target's direction), its "min" end, or "both" (`runs.steer.sweep_grid`).
    `max_output`: refuse (ValueError), before the grid is built, a sweep whose arrays would
    exceed this many bytes; None (default) for no limit (`ufmjax sweep` passes --max-output).
    `sink`: where the arrays go (a `runs.sweepfile.SweepFile` streams them to disk); a dict by default.
    `progress`: a progress bar over the grid.
    `layer` and `positions` are refused as `UFMRun.steer` refuses them (GPT options).
    `normalize`: the vector's norm convention (`runs.several.normalized`: raw, unit, residual,
    preserve). `bootstrap`: B resamples of P and N, swept in one pass, give `<key>_lo` /
    `<key>_hi` bands of every curve (`runs.several.bootstrap_bands`; seed `bootstrap_seed`).
    `vector`: a [D] vector (from a file) instead of Eq. 3's; the rows stay the run's.
    """
    from ufmjax.runs.several import add_bands, file_vector, normalized

    st = run.steer(target, negatives, negative_concept=negative_concept, q=q, seed=seed, ce_against=ce_against,
                   layer=layer, positions=positions, dtype=dtype)
    st = normalized(run, file_vector(st, vector), normalize)
    top_k = resolve_top_k(top_k, st.vocab)  # meta records what was tracked
    alphas, arrays = sweep_grid(st, alphas, top_k=top_k, top_k_at=top_k_at, derivatives=derivatives,
                                chunk_size=chunk_size, max_output=max_output, sink=sink, progress=progress,
                                desc="sweep ufm", bands=bootstrap is not None)
    meta = {**st.meta, "dtype": str(jnp.dtype(dtype)), "derivatives": derivatives, "top_k": top_k,
            "top_k_at": top_k_at, "versions": versions()}
    add_bands(arrays, meta, run, st, alphas, bootstrap, seed=bootstrap_seed, top_k=top_k, derivatives=derivatives,
              chunk_size=chunk_size, progress=progress)
    return arrays, meta
