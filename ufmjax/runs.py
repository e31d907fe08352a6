"""Run folders of trained models: train one, load one, sweep one.

A run folder holds `config.json` (written first), Orbax checkpoints under `checkpoints/`,
and `metrics.json` (written last: a folder without it is an unfinished run).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ufmjax import io
from ufmjax.data import ConceptData, DataConfig, select_steering_sets
from ufmjax.steering import ufm_steered, ufm_steering_vector
from ufmjax.sweep import sweep, top_tokens
from ufmjax.train import TrainConfig, restore_model, train
from ufmjax.ufm import UFM, UFMConfig, ufm_loss

UFM_TRAIN_DEFAULTS = TrainConfig(steps=2000, lr=0.05, clip=0.0, ckpt_every=500)


def versions() -> dict:
    import flax
    import optax

    from ufmjax import __version__

    return {"ufmjax": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version()}


def prepare_run_dir(out, force: bool = False) -> Path:
    """An empty (or forced-clean) folder for a new run; refuses to mix runs."""
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise io.RunError(f"out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not (out / io.CONFIG_FILE).is_file():
            raise io.RunError(f"out {str(out)!r} is a non-empty folder that is not a ufmjax run")
    out.mkdir(parents=True, exist_ok=True)
    return out


def same_config(saved: dict, config: dict) -> bool:
    """Whether a run folder's saved config is this one (versions aside; JSON turns tuples to lists)."""
    def norm(c):
        return json.loads(json.dumps({k: v for k, v in c.items() if k != "versions"}, default=io._json_default))

    return norm(saved) == norm(config)


def open_run(out, config: dict, force: bool = False) -> tuple[Path, dict | None]:
    """Open the run folder `out` for `config`: (folder, metrics if that run is already finished).

    A new folder gets `config.json` (written first); an existing run must hold the same
    configuration, else RunError; an unfinished one is left to resume from its checkpoints.
    """
    out = prepare_run_dir(out, force)
    cfg_path = out / io.CONFIG_FILE
    if not cfg_path.is_file():
        io.write_json_atomic(cfg_path, config)
        return out, None
    if not same_config(io.read_json(cfg_path), config):
        raise io.RunError(f"out {str(out)!r} holds a run with another configuration (use --force to replace it)")
    return out, io.read_json(out / io.METRICS_FILE) if io.run_finished(out) else None


def train_ufm_run(out, data_config: DataConfig, *, dim: int = 16, seed: int = 0,
                  train_config: TrainConfig = UFM_TRAIN_DEFAULTS, progress: bool = True,
                  force: bool = False) -> dict:
    """Train a UFM on the exact expected cross-entropy of a concept dataset; write a run folder.

    Re-running on a finished run with the same configuration returns its metrics (no work);
    an unfinished run resumes from its last checkpoint. Returns the metrics dict.
    """
    data = ConceptData(data_config)
    ufm_config = UFMConfig(vocab=data.vocab, contexts=data.num_contexts, dim=dim)
    config = {"model": "ufm", "data": data_config.to_dict(), "ufm": ufm_config.to_dict(),
              "train": train_config.to_dict(), "seed": seed, "versions": versions()}
    out, finished = open_run(out, config, force)
    if finished is not None:
        return finished

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
    logits = np.asarray(model(), dtype=np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(-np.dot(data.pi, np.sum(data.p_MxV * logp, axis=1)))


@dataclass
class UFMRun:
    path: Path
    config: dict
    data: ConceptData
    model: UFM
    metrics: dict


def load_run(run_dir):
    """Load a finished run (UFM here; GPT runs are handed to ufmjax.gptrun)."""
    cfg = io.load_run_config(run_dir)
    if not io.run_finished(run_dir):
        raise io.RunError(f"run folder {str(run_dir)!r} is unfinished (no {io.METRICS_FILE}); train it again to resume")
    if cfg["model"] == "gpt":
        from ufmjax import gptrun

        return gptrun.load_gpt_run(run_dir)
    data = ConceptData(DataConfig.from_dict(cfg["data"]))
    model = UFM(UFMConfig(**cfg["ufm"]), rngs=nnx.Rngs(0))
    restore_model(model, run_dir)
    return UFMRun(Path(run_dir), cfg, data, model, io.read_json(Path(run_dir) / io.METRICS_FILE))


def ufm_sweep(run: UFMRun, alphas, *, target: int, negatives: str = "contrastive",
              negative_concept: int | None = None, q: int | None = None, seed: int = 0,
              ce_against: str = "data", top_k: int | None = None, derivatives: int = 2,
              chunk_size: int | None = None, dtype=jnp.float32) -> tuple[dict[str, np.ndarray], dict]:
    """Steer a trained UFM toward `target` and sweep it. Returns (arrays, meta).

    `ce_against`: "data" measures cross-entropy against the true table p(z|c_j) with the
    context probabilities pi; "model" against the model's own unsteered distribution.
    """
    data = run.data
    P, N = select_steering_sets(data.context_concept, target, negatives, negative_concept, q, seed)
    v = ufm_steering_vector(run.model, P, N)
    steered = ufm_steered(run.model, v)
    if ce_against not in ("data", "model"):
        raise ValueError(f"ce_against must be 'data' or 'model', got {ce_against!r}")
    tokens = None if top_k is None else top_tokens(steered, alphas, top_k)
    arrays = sweep(steered, alphas, concept_of=data.concept_of,
                   ce_target=data.p_MxV if ce_against == "data" else None, weights=data.pi,
                   tokens=tokens, derivatives=derivatives, chunk_size=chunk_size, dtype=dtype)
    arrays.update(P=P, N=N, steering_vector=np.asarray(v), p_data=data.p_MxV,
                  context_concept=data.context_concept)
    meta = {"model": "ufm", "run": str(run.path), "target": int(target), "negatives": negatives,
            "negative_concept": negative_concept, "q": int(P.size), "seed": seed, "ce_against": ce_against,
            "dtype": str(jnp.dtype(dtype)), "derivatives": derivatives, "versions": versions()}
    return arrays, meta


def save_sweep(path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write a sweep's arrays and its JSON `meta` string into one .npz, atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"out must be a .npz file, got {str(path)!r}")
    io.save_npz_atomic(path, {**arrays, "meta": np.asarray(json.dumps(meta, default=io._json_default))})


def load_sweep(path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
        meta = json.loads(str(f["meta"]))
    return arrays, meta

