"""The generic kernel paths: forward mode through the model, the softmax part in closed form.

Shape legend: C = alphas of one chunk, M = rows, V = vocabulary.

"taylor" (any closure, e.g. a GPT): the point function for ONE alpha, vmapped over a chunk;
forward mode (`jax.jvp`; for both derivatives one Taylor-series pass, `kernel.series`)
through the MODEL only, then the softmax quantities differentiated by hand from x, x', x''
(docs/theory.md, "How the kernel computes derivatives"). "jvp": the reference, nested `jax.jvp` through everything.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ufmjax.kernel import measure as ms_mod
from ufmjax.kernel.measure import Measure, Reference
from ufmjax.kernel.series import series_jets

# Incremented each time a kernel chunk is traced: tests use it to prove "no recompilation".
TRACE_COUNT = 0


def count_trace() -> None:
    global TRACE_COUNT
    TRACE_COUNT += 1


def closure_jets(fn, params, alpha, order: int):
    """(x, dx/dalpha, d2x/dalpha2)[: order + 1] of the logits: one forward-mode pass for the
    first derivative, one Taylor-series pass (`kernel.series`) for both: three streams
    through the model where nested forward mode (`nested_jets`) pushes four."""
    if order == 2:
        return series_jets(fn, params, alpha, 2)
    return nested_jets(fn, params, alpha, order)


def nested_jets(fn, params, alpha, order: int):
    """(x, dx/dalpha, d2x/dalpha2)[: order + 1] of the logits, by nested forward mode."""
    one = jnp.ones_like(alpha)
    if order == 0:
        return (fn(params, alpha),)

    def f1(a):
        return jax.jvp(lambda b: fn(params, b), (a,), (one,))

    if order == 1:
        return f1(alpha)
    # The tangent of (x, x') is (x', x''); XLA merges the two copies of x'.
    (x, dx), (_, d2x) = jax.jvp(f1, (alpha,), (one,))
    return x, dx, d2x


def taylor_quantities(jets, ref: Reference, ms: Measure):
    """Quantities and their derivatives from the logits' own Taylor coefficients in alpha.

    With x = logits, x' and x'' their first two derivatives, (log p)' = g = x' - E[x'],
    (log p)'' = g2 = x'' - E[x''] - Var(x'), p' = p g, p'' = p (g^2 + g2): the chain rule the
    nested jvp through `quantities` would apply, without pushing two tangents through every
    reduction of it (they cost more than the model on a large vocabulary).
    """
    x_MxV = jets[0]
    logp_MxV = jax.nn.log_softmax(x_MxV, axis=-1)
    p_MxV = jnp.exp(logp_MxV)
    out = [ms_mod.values(logp_MxV, p_MxV, ref, ms)]
    if len(jets) == 1:
        return tuple(out)
    dx_MxV = jets[1]
    g_MxV = dx_MxV - jnp.sum(p_MxV * dx_MxV, axis=-1, keepdims=True)
    pg_MxV = p_MxV * g_MxV
    zero_M = jnp.zeros(x_MxV.shape[:1], x_MxV.dtype)
    out.append(ms_mod.derivative_tree(pg_MxV, g_MxV, zero_M, logp_MxV, ref, ms))
    if len(jets) == 2:
        return tuple(out)
    var_M = jnp.sum(pg_MxV * g_MxV, axis=-1)
    d2x_MxV = jets[2]
    g2_MxV = d2x_MxV - (jnp.sum(p_MxV * d2x_MxV, axis=-1) + var_M)[:, None]
    q_MxV = p_MxV * (g_MxV * g_MxV + g2_MxV)
    out.append(ms_mod.derivative_tree(q_MxV, g2_MxV, var_M, logp_MxV, ref, ms))
    return tuple(out)


def select(trees, names):
    """Keep only the quantities `names` (None: all) of each tree: inside jit, XLA then drops
    the arithmetic of the others."""
    if names is None:
        return trees
    return tuple({k: t[k] for k in names} for t in trees)


def vmapped_chunk(point, names):
    """jit of `point` (one alpha) vmapped over a chunk of alphas, keeping the quantities `names`."""

    def chunk(alphas_C, params, ref, ms):
        count_trace()
        return select(jax.vmap(point, in_axes=(0, None, None, None))(alphas_C, params, ref, ms), names)

    return jax.jit(chunk)


@functools.lru_cache(maxsize=64)
def taylor_chunk_fn(fn, order: int, names: tuple | None = None):
    """jit(vmap(point)) for one closure: values and `order` derivatives in alpha (of `names`)."""

    def point(alpha, params, ref, ms):
        return taylor_quantities(closure_jets(fn, params, alpha, order), ref, ms)

    return vmapped_chunk(point, names)


@functools.lru_cache(maxsize=64)
def jvp_chunk_fn(fn, order: int, names: tuple | None = None):
    """The reference kernel: nested jax.jvp through the whole of `quantities`."""

    def point(alpha, params, ref, ms):
        def f(a):
            return ms_mod.quantities(fn(params, a), ref, ms)

        one = jnp.ones_like(alpha)
        if order == 0:
            return (f(alpha),)
        if order == 1:
            return jax.jvp(f, (alpha,), (one,))

        def f_and_slope(a):
            return jax.jvp(f, (a,), (one,))

        # Nested forward mode: the tangent of (f, f') is (f', f'').
        (y, dy), (_, d2y) = jax.jvp(f_and_slope, (alpha,), (one,))
        return y, dy, d2y

    return vmapped_chunk(point, names)
