"""One optax training loop for every model (UFM on the exact loss, GPT on sampled batches).

The model is split once (`nnx.split`) and the step is a pure jitted function of
(params, optimizer state, batch); the batch of step k comes from `batch_fn(k)`, a function
of k alone, so a run resumed from a checkpoint at step k replays exactly the steps an
uninterrupted run would have taken.

Resuming always converges: checkpoints that fail their SHA-256 manifest are moved aside
(`io.set_aside_unverified`) before the newest verified one is restored, so the steps they held
can be saved again. Training that diverges stops with `TrainingDiverged` before anything of
it is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ufmjax.runs import io
from ufmjax.runs.io import TrainingDiverged
from ufmjax.runs.progress import Progress


# A loss is checked (one device sync) every CHECK_EVERY steps, before each checkpoint and at
# the end, never every step. It has diverged when it is not finite, or when it exceeds both
# DIVERGED_FACTOR x its first value and DIVERGED_LOSS: a cross-entropy starts near log V
# (about 2-6 nats here) and only falls, so a healthy run never comes within orders of
# magnitude of 1e4 nats, while the factor keeps a loss of a larger scale (a user's loss_fn)
# from being judged on the absolute bar alone.
CHECK_EVERY = 100
DIVERGED_FACTOR = 1e3
DIVERGED_LOSS = 1e4




# Incremented each time a training step is traced: tests use it to prove that the step
# compiles once per model shape, optimiser and loss (not again on resume or a second run).
STEP_TRACES = 0


def diverged(loss: float, first: float) -> bool:
    """Whether a loss has diverged from its first value (see CHECK_EVERY)."""
    return not math.isfinite(loss) or (loss > DIVERGED_FACTOR * abs(first) and loss > DIVERGED_LOSS)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-2
    warmup: int = 0
    schedule: str = "cosine"      # "cosine" (to final_lr_frac * lr) or "constant"
    final_lr_frac: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0             # global-norm clipping; 0 disables it
    b1: float = 0.9
    b2: float = 0.999
    eval_every: int = 0           # 0: evaluate at the end only
    ckpt_every: int = 0           # 0: checkpoint at the end only (when a run folder is given)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for name in ("weight_decay", "clip", "eval_every", "ckpt_every", "final_lr_frac"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup, cosine (or constant) decay and global-norm clipping."""
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=cfg.warmup,
            decay_steps=cfg.steps, end_value=cfg.final_lr_frac * cfg.lr)
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup, 1)), optax.constant_schedule(cfg.lr)],
            [cfg.warmup]) if cfg.warmup else cfg.lr
    parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip > 0 else []
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


@functools.lru_cache(maxsize=32)
def _compiled_step(graphdef, loss_fn, cfg: TrainConfig):
    """(optimizer, jitted step) for one model structure, loss and optimiser configuration.

    Cached at module level: a step defined inside `train` was a new function on every call,
    so each resume (and each run of a sweep of runs in one process) compiled it again (3-4 s
    on a small GPT). The non-trained state goes in as an argument, not a closure."""
    tx = make_optimizer(cfg)

    def loss_of(p, rest, batch):
        return loss_fn(nnx.merge(graphdef, p, rest), batch)

    @jax.jit
    def step_fn(p, rest, s, batch):
        global STEP_TRACES
        STEP_TRACES += 1
        loss, grads = jax.value_and_grad(loss_of)(p, rest, batch)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    return tx, step_fn


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    history: list[dict]
    seconds: float
    resumed_from: int | None


def train(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], jax.Array], cfg: TrainConfig, *,
          batch_fn: Callable[[int], Any] | None = None, eval_fn: Callable[[nnx.Module], dict] | None = None,
          run_dir=None, progress: bool = True, desc: str = "train",
          stop_after: int | None = None) -> TrainResult:
    """Train `model` in place.

    Args:
      model: an NNX module; its nnx.Param leaves are trained.
      loss_fn: loss_fn(model, batch) -> scalar.
      cfg: optimiser and schedule.
      batch_fn: step -> batch (a pytree of arrays); None for full-batch losses (batch=None).
      eval_fn: model -> dict of floats, run every cfg.eval_every steps and at the end.
      run_dir: where checkpoints go; training resumes from its newest verified checkpoint, after
        moving aside (with one warning line) the checkpoints that fail their manifest.
      progress: show a progress bar.
      desc: progress bar label.
      stop_after: stop (as if interrupted) once this many steps are done; for tests.
    Returns:
      TrainResult with the final loss and the evaluation history.
    Raises:
      TrainingDiverged: the loss became non-finite or blew up (see `diverged`); no checkpoint
        is written from that point on.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # eval_every and ckpt_every do not change an update: runs differing only there share a step.
    tx, step_fn = _compiled_step(graphdef, loss_fn, dataclasses.replace(cfg, eval_every=0, ckpt_every=0))
    opt_state = tx.init(params)
    start, resumed_from = 0, None
    if run_dir is not None:
        moved = io.set_aside_unverified(run_dir)
        good = io.verified_steps(run_dir)
        if moved:
            where = ", ".join(repr(str(d)) for _, d in moved)
            io.warn(f"run folder {str(run_dir)!r}: checkpoints {[s for s, _ in moved]} fail their SHA-256 manifest "
                    f"(truncated or corrupted); moved aside to {where}; resuming from "
                    + (f"step {good[0]}" if good else "the start"))
        if good:
            template = {"params": params, "opt": opt_state, "step": jnp.zeros((), jnp.int32)}
            start, tree = io.restore_checkpoint(run_dir, template, good[0])
            params, opt_state = tree["params"], tree["opt"]
            resumed_from = start

    def checkpoint(step):
        if run_dir is not None:
            io.save_checkpoint(run_dir, step, {"params": params, "opt": opt_state,
                                               "step": jnp.asarray(step, jnp.int32)})

    def evaluate(step, loss):
        nnx.update(model, params)
        entry = {"step": step, "loss": float(loss)}
        if eval_fn is not None:
            entry.update({k: float(v) for k, v in eval_fn(model).items()})
        history.append(entry)

    def check(step, loss) -> float:
        value = float(loss)
        if diverged(value, first):
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {value:.4g}, from {first:.4g} at the start; try a "
                f"smaller --lr than {cfg.lr:g} (with --force to replace this run); no metrics were written")
        return value

    history: list[dict] = []
    loss = jnp.nan
    first = math.nan
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    t0 = time.perf_counter()
    with Progress(cfg.steps, desc, enabled=progress) as bar:
        bar.update(start)
        for step in range(start, end):
            batch = None if batch_fn is None else batch_fn(step)
            params, opt_state, loss = step_fn(params, rest, opt_state, batch)
            done = step + 1
            if step == start:
                first = float(loss)  # the loss before this process's first update
                if not math.isfinite(first):
                    check(done, loss)
            saving = bool(cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps)
            value = check(done, loss) if done % CHECK_EVERY == 0 or saving or done == end else None
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                evaluate(done, loss)
            if saving:
                checkpoint(done)
            bar.update(1, **({"loss": value} if done % CHECK_EVERY == 0 else {}))
    if end == cfg.steps and start < cfg.steps:
        evaluate(cfg.steps, loss)
        checkpoint(cfg.steps)
    nnx.update(model, params)
    return TrainResult(steps=end, final_loss=float(loss), history=history,
                       seconds=time.perf_counter() - t0, resumed_from=resumed_from)


def check_final_checkpoint(run_dir, step: int) -> int:
    """`step` if the finished run's final checkpoint passes its SHA-256 manifest, else
    CheckpointError saying how to recover (the run is never taken from an older step)."""
    if not io.verify_step(run_dir, step):
        raise io.CheckpointError(
            f"run folder {str(run_dir)!r}: its final checkpoint (step {step}, the one {io.METRICS_FILE} "
            f"describes) is missing or fails its SHA-256 manifest (truncated or corrupted); retrain it "
            f"with --force (ufmjax train ... --force --out {str(run_dir)})")
    return step


def restore_model(model: nnx.Module, run_dir, step: int | None = None) -> int:
    """Load the parameters of a run's checkpoint into `model`; returns the step.

    Args:
      model: a module shaped as the run's model.
      run_dir: the run folder.
      step: the step to load; None for a finished run's final step (train.steps, the one its
        metrics.json describes), or for an unfinished run its newest verified checkpoint.
    Raises:
      CheckpointError: the checkpoint is missing or fails its SHA-256 manifest (a finished run's
        final checkpoint is never replaced by an older one), or cannot be read into `model`.
    """
    _, params, _ = nnx.split(model, nnx.Param, ...)
    # The optimizer state is saved beside the parameters, so the template holds one too.
    cfg = io.load_run_config(run_dir)
    train_cfg = io.from_config(run_dir, "train", lambda: TrainConfig(**cfg["train"]))
    if step is None and io.run_finished(run_dir):
        step = check_final_checkpoint(run_dir, train_cfg.steps)
    tx = make_optimizer(train_cfg)
    # Shapes only (eval_shape): running tx.init would compile its ops for every new model shape.
    template = {"params": params, "opt": jax.eval_shape(tx.init, params),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    step, tree = io.restore_checkpoint(run_dir, template, step)
    nnx.update(model, tree["params"])
    return step
