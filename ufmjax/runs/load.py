"""`load_run`: open any finished run folder by the model its config names."""

from __future__ import annotations

from ufmjax.runs import io
from ufmjax.runs.folders import check_finished
from ufmjax.runs.gpt import GPTRun, load_gpt_run
from ufmjax.runs.ufm import UFMRun, load_ufm_run

LOADERS = {"ufm": load_ufm_run, "gpt": load_gpt_run}


def load_run(run_dir) -> UFMRun | GPTRun:
    """Load a finished run folder (UFM or GPT), else RunError naming the folder."""
    cfg = check_finished(run_dir)
    if cfg["model"] not in LOADERS:
        raise io.RunError(f"run folder {str(run_dir)!r} is not a ufmjax run (model={cfg['model']!r})")
    return LOADERS[cfg["model"]](run_dir)
