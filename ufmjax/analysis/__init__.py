"""Numbers the laws and figures check, computed from kernel results (no matplotlib here).

- `peaks`: peak strengths of token bumps from the kernel's own derivatives (Thm 3.3);
- `gpt_probes`: Prop. 4.1, the local UFM, sampled concept presence and the model-size table.
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

__all__ = [
    "LOCAL_UFM_KL", "bump_stats", "concept_presence", "find_peaks", "grid_extras", "local_ufm",
    "refine_validity_range", "scaled_grid", "sinh_grid", "summarize_sweep", "tanh_fit", "validity_range",
]
