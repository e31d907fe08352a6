"""ufmjax: a JAX differentiable simulator of activation-steering strength.

`import ufmjax as uj` gives the names a notebook needs:

    run = uj.load_run("runs/ufm")                      # a UFM or GPT run folder
    hf = uj.load_hf("path/to/hf/snapshot")             # or a pretrained model (steer(prompts=...))
    st = run.steer(target=0)                           # closure, measure, P, N, vector, meta
    out = uj.sweep(st.steered, alphas, measure=st.measure())
    best = uj.optimize(st.problem(), uj.Objective("budget", budget=0.05))

Shape letters used across the package (each module restates the ones it uses): A alphas,
C alphas of one chunk, M rows (contexts, prompts or text positions), V vocabulary, G concepts,
K tracked tokens, D residual width, T positions, B prompts.

The names below are loaded on first use, so `import ufmjax.theory` (numpy only) or
`import ufmjax.data` does not pull in JAX, Flax or matplotlib.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Steered": "ufmjax.steering",
    "diff_of_means": "ufmjax.steering",
    "Measure": "ufmjax.kernel",
    "Evaluator": "ufmjax.kernel",
    "make_measure": "ufmjax.kernel",
    "sweep": "ufmjax.kernel",
    "Problem": "ufmjax.optimize",
    "Objective": "ufmjax.optimize",
    "Steering": "ufmjax.runs",
    "load_run": "ufmjax.runs",
    "load_hf": "ufmjax.runs",
    "train_ufm_run": "ufmjax.runs",
    "train_gpt_run": "ufmjax.runs",
    "reference_config": "ufmjax.data",
    "DataConfig": "ufmjax.data",
    "reproduce": "ufmjax.report",
}
# `optimize` is a subpackage whose module is callable: `uj.optimize(problem, objective)`.
_SUBPACKAGES = ("analysis", "common", "data", "kernel", "models", "optimize", "report", "runs", "steering",
                "theory")

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"ufmjax.{name}")
    else:
        raise AttributeError(f"module 'ufmjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
