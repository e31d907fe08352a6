"""The alpha-sweep kernel shared by every model.

Shape legend: A = alphas of the grid, C = alphas of one chunk, M = rows (contexts or text
positions), V = vocabulary, G = concepts, K = tracked tokens.

A model hands the kernel a `Steered` closure `fn(params, alpha) -> logits [M, V]`; the kernel
knows no model. What to compute is a validated `Measure` (`make_measure`); an `Evaluator`
compiles one closure with one measure and returns every quantity of the theory with its first
and second derivatives in alpha at any alphas (the optimiser's point evaluations); `sweep`
walks a grid in chunks through an evaluator, sharded over the devices, so memory depends on
the chunk, never on the grid. Every reduction (tracked tokens, concept sums, CE, KL, entropy)
happens inside the compiled call. Three paths, equal to rounding:

- "affine" (`ufmjax.kernel.affine`; closures declared with `steering.register_affine`, the
  UFM): closed forms from one matrix product of moments, no autodiff;
- "taylor" (`ufmjax.kernel.taylor`; any closure, e.g. a GPT): forward mode through the model
  only, the softmax part in closed form;
- "jvp": the reference, nested `jax.jvp` through everything.

Modules: `measure` (Measure, Reference, quantities at one alpha), `taylor`, `affine`, `driver`
(Evaluator, plan / drive of a sweep, chunk sizes, placement on devices).
"""

from ufmjax.kernel import taylor
from ufmjax.kernel.affine import AffineParts, AffineReference, default_affine_chunk_size, upper_envelope
from ufmjax.kernel.driver import (
    METHODS,
    TOP_K_AT,
    ArraySink,
    Evaluator,
    Grid,
    SweepPlan,
    check_alphas,
    check_devices,
    check_dtype,
    check_grid,
    default_chunk_size,
    drive,
    grid_size,
    grid_values,
    largest_intermediate,
    output_bytes,
    parse_alphas,
    parse_grid,
    plan_sweep,
    sweep,
    top_tokens,
)
from ufmjax.kernel.measure import (
    PREFIXES,
    QUANTITIES,
    Measure,
    Reference,
    make_measure,
    quantities,
    reference_fn,
    reference_of,
)
from ufmjax.kernel.taylor import closure_jets


def trace_count() -> int:
    """How many times a kernel chunk has been traced in this process (tests: no recompilation)."""
    return taylor.TRACE_COUNT


__all__ = [
    "AffineParts", "AffineReference", "ArraySink", "Evaluator", "Grid", "METHODS", "Measure", "PREFIXES",
    "QUANTITIES", "Reference", "SweepPlan", "TOP_K_AT", "check_alphas", "check_devices", "check_dtype",
    "check_grid", "closure_jets", "default_affine_chunk_size", "default_chunk_size", "drive", "grid_size",
    "grid_values", "largest_intermediate", "make_measure", "output_bytes", "parse_alphas", "parse_grid",
    "plan_sweep", "quantities", "reference_fn", "reference_of", "sweep", "top_tokens", "trace_count",
    "upper_envelope",
]
