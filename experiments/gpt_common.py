"""Shared pieces of the GPT experiments: train-or-reuse a text run, sweep it on a scaled grid."""

from __future__ import annotations

import time
from pathlib import Path

from ufmjax.gptrun import (
    gpt_steering_vector,
    gpt_sweep,
    load_gpt_run,
    scaled_grid,
    steering_sets,
    summarize_sweep,
    sweep_rows,
    train_gpt_run,
)
from ufmjax.text import concept_index


def text_run(root, layers: int, *, steps: int | None = None, progress: bool = True):
    """Train (or reuse, or resume) a text GPT with `layers` blocks and the default widths."""
    from dataclasses import replace

    from ufmjax.gptrun import TEXT_TRAIN

    cfg = TEXT_TRAIN if steps is None else replace(TEXT_TRAIN, steps=steps, warmup=min(100, steps // 10),
                                                   eval_every=0, ckpt_every=0)
    out = Path(root) / f"text_L{layers}"
    train_gpt_run(out, "text", gpt={"layers": layers}, train_config=cfg, progress=progress)
    return load_gpt_run(out)


def scaled_sweep(run, layer: int, target="uppercase", *, positions: str = "all", reach: float = 50.0,
                 num: int = 401, top_k: int | None = None):
    """gpt_sweep on a grid reaching alpha |v| = reach * |h| (dense near 0, see scaled_grid),
    tracking every token (summarize_sweep picks the top 10 at the largest alpha itself)."""
    target = concept_index(target) if run.corpus == "text" else target
    steer_prompts, P, N = steering_sets(run, target)
    v = gpt_steering_vector(run.model, steer_prompts, P, N, layer)
    alphas = scaled_grid(run.model, sweep_rows(run)["prompts"], v, layer, reach, num)
    t0 = time.perf_counter()
    arrays, meta = gpt_sweep(run, alphas, target=target, layer=layer, positions=positions, top_k=top_k)
    meta["sweep_seconds"] = time.perf_counter() - t0
    return arrays, meta, summarize_sweep(arrays, target)
