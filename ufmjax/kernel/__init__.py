"""The alpha-sweep kernel shared by every model.

Shape legend: A = alphas of the grid, C = alphas of one chunk, M = rows (contexts or text
positions), V = vocabulary, G = concepts, K = tracked tokens.

A model hands the kernel a `Steered` closure `fn(params, alpha) -> logits [M, V]`; the kernel
knows no model. What to compute is a validated `Measure` (`make_measure`); an `Evaluator`
compiles one closure with one measure and returns every quantity of the theory with its first
and second derivatives in alpha at any alphas (the optimiser's point evaluations); `sweep`
walks a grid in chunks through an evaluator, sharded over the devices, so memory depends on
the chunk, never on the grid. Every reduction (tracked tokens, concept sums, CE, KL, entropy)
happens inside the compiled call. Four paths, equal to rounding:

- "affine" (`ufmjax.kernel.affine`; closures declared with `steering.register_affine`, the
  UFM): closed forms from one matrix product of moments, no autodiff;
- "head" (`ufmjax.kernel.head`; closures declared with their unembedding through
  `steering.register_head`: the GPTs and pretrained models): the series through the model up
  to the final hidden state, then the vocabulary walked in blocks, the head's product and
  every softmax sum together, so the [M, V] logits are never held;
- "taylor" (`ufmjax.kernel.taylor`; any closure): through the model only (forward
  mode for the first derivative, one Taylor-series pass, `ufmjax.kernel.series`, for both), the
  softmax part in closed form;
- "jvp": the reference, nested `jax.jvp` through everything.

Several steering terms (`ufmjax.kernel.multi`): alpha is a vector in R^k, every quantity
comes with its gradient [k] and Hessian [k, k] (one Taylor-series pass along the k directions), over
any [A, k] points; bootstrap resamples of the steering vectors are a batch axis of the same
compiled pass.

Modules: `grid` (alpha grids, argument checks and output sizes, numpy only), `measure`
(Measure, Reference, quantities at one alpha), `series`, `taylor`, `head`, `affine`, `multi`, `driver` (Evaluator, plan /
drive of a sweep, chunk sizes, placement on devices). Names are loaded on first use, so
`ufmjax.kernel.grid` (and the CLI's checks before any work) imports no JAX.
"""

import importlib

from ufmjax.common import lazy_exports

# public name -> submodule, loaded on first use.
_EXPORTS = {
    **dict.fromkeys(("AffineParts", "AffineReference", "default_affine_chunk_size", "upper_envelope"), "affine"),
    **dict.fromkeys(("METHODS", "TOP_K_AT", "ArraySink", "Evaluator", "SweepPlan", "check_devices", "check_dtype",
                     "default_chunk_size", "drive", "largest_intermediate", "plan_sweep", "sweep", "top_tokens"),
                    "driver"),
    **dict.fromkeys(("PREFIXES", "QUANTITIES", "Grid", "check_alphas", "check_grid", "grid_size", "grid_values",
                     "output_bytes", "parse_alphas", "parse_grid", "MULTI_PREFIXES", "ProductGrid", "check_points",
                     "multi_output_bytes", "parse_product_grid", "resolve_top_k"), "grid"),
    **dict.fromkeys(("MultiEvaluator", "multi_sweep", "multi_top_tokens", "scalar_view"), "multi"),
    **dict.fromkeys(("Measure", "Reference", "make_measure", "quantities", "reference_fn", "reference_of"),
                    "measure"),
    "closure_jets": "taylor",
    "nested_jets": "taylor",
    "series_jets": "series",
}
_SUBMODULES = ("affine", "driver", "grid", "head", "measure", "multi", "series", "taylor")
__all__ = sorted([*_EXPORTS, "trace_count"])


def trace_count() -> int:
    """How many times a kernel chunk has been traced in this process (tests: no recompilation)."""
    return importlib.import_module("ufmjax.kernel.taylor").TRACE_COUNT


__getattr__ = lazy_exports("ufmjax.kernel", _EXPORTS, _SUBMODULES)
