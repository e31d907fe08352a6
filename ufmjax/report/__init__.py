"""What a person reads: the paper's figures, and `reproduce` with its report.

- `plots`: matplotlib drawing of sweep results (no global state, atomic PNG writes);
- `figures`: the UFM figures (Figs. 3, B.1, 4, 5) with the numbers each checks;
- `gpt_figures`: Fig. A.4 for a text GPT;
- `reproduce`: the main job (train, sweep, check every law, optimise, write report.md).
"""

from ufmjax.report.figures import FIGURE_FILES, check_summary, train_or_load, ufm_figures
from ufmjax.report.gpt_figures import fig_a4
from ufmjax.report.reproduce import reproduce

__all__ = ["FIGURE_FILES", "check_summary", "fig_a4", "reproduce", "train_or_load", "ufm_figures"]
