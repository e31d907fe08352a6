"""Numbers the laws and figures check, computed from kernel results (no matplotlib here).

- `peaks`: peak strengths of token bumps from the kernel's own derivatives (Thm 3.3);
- `gpt_probes`: Prop. 4.1, the local UFM, sampled concept presence and the model-size table;
- `rollout`: KL(steered || base) along steered rollouts, and a KL budget by Newton vs regula falsi.
"""

from ufmjax.analysis.gpt_probes import (
    LOCAL_UFM_KL,
    bump_stats,
    concept_presence,
    grid_extras,
    local_ufm,
    refine_validity_range,
    scaled_grid,
    sinh_grid,
    summarize_sweep,
    tanh_fit,
    validity_range,
)
from ufmjax.analysis.peaks import find_peaks
from ufmjax.analysis.rollout import (
    BudgetResult,
    RolloutKL,
    RolloutModel,
    budget_newton,
    budget_regula_falsi,
    compare_budget,
    gpt_rollout_model,
    hf_rollout_model,
    rollout_kl,
    summarize_kl,
)

__all__ = [
    "LOCAL_UFM_KL", "bump_stats", "concept_presence", "find_peaks", "grid_extras", "local_ufm",
    "refine_validity_range", "scaled_grid", "sinh_grid", "summarize_sweep", "tanh_fit", "validity_range",
    # rollout (its `rollout` function stays `analysis.rollout.rollout`: the name is the module's)
    "BudgetResult", "RolloutKL", "RolloutModel", "budget_newton", "budget_regula_falsi", "compare_budget",
    "gpt_rollout_model", "hf_rollout_model", "rollout_kl", "summarize_kl",
]
