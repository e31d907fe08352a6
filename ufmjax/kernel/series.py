"""One Taylor-series pass through a closure: value, first and second derivative in alpha together.

Nested forward mode (`jax.jvp` of `jax.jvp`) pushes FOUR streams through the model: the outer
tangent of the inner tangent is x'' but the outer tangent of the inner primal is x' again, a
second copy that XLA does not merge across nonlinear layers (measured on a 6-layer GPT: 3.96x
the values' flops where three streams need 3x). This module walks the closure's jaxpr once,
carrying for every alpha-dependent variable its triple (x, x', x''):

- an equation none of whose inputs depends on alpha (a weight, a cached prefix) runs once, as
  in the values pass, and its outputs carry no series: constant weights gain no terms;
- a LINEAR equation in its alpha-dependent inputs (a product with a constant weight, a sum, a
  reshape, a slice, ...) maps x' and x'' by the same linear map: three streams of products;
- any other equation (a product of two alpha-dependent factors, an exponential, a norm's
  rsqrt) gets, by the chain rule, y' = Df[x'] and y'' = D^2 f[x', x'] + Df[x''], written with
  `jax.jvp` on that one equation, so products gain exactly their cross terms;
- calls (`jit`) are walked inside; custom-derivative calls keep their own rule.

`series_jets(fn, params, alpha)` returns (x, x', x'') like `taylor.closure_jets`; it is a
plain JAX function (jit, vmap and sharding compose with it).
"""

from __future__ import annotations

import jax
import jax.extend.core as jex
import jax.numpy as jnp

# Primitives linear in every input (their second-order term is zero).
LINEAR = frozenset({
    "add", "sub", "neg", "reshape", "broadcast_in_dim", "transpose", "reduce_sum", "convert_element_type",
    "slice", "dynamic_slice", "concatenate", "squeeze", "expand_dims", "copy", "copy_p", "pad", "select_n",
    "gather", "dynamic_update_slice", "cumsum", "rev", "split", "real", "imag", "add_any", "reduce_precision",
})
# Primitives linear in each input separately (bilinear): linear when only one input varies.
BILINEAR = frozenset({"mul", "dot_general"})
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


def _floating(aval) -> bool:
    return jnp.issubdtype(getattr(aval, "dtype", jnp.int32), jnp.inexact)


def _bind(eqn, args):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _linear_in(eqn, moving) -> bool:
    name = eqn.primitive.name
    if name in LINEAR:
        # select_n is linear in its cases, not in the predicate (an integer or bool: never moving).
        return True
    if name in BILINEAR:
        return sum(moving) == 1
    if name == "div":
        return not moving[1]
    return False


def _eqn_series(eqn, args, series, order):
    """Outputs and their stacked series [order, ...] of one equation with moving inputs.

    The series of a variable is ONE array whose leading axis holds (x', x''): every linear map
    (above all a product with a constant weight) then runs once on both, as one larger product.
    """
    moving = [s is not None for s in series]
    idx = [i for i, m in enumerate(moving) if m]

    def g(*dyn):
        full = list(args)
        for i, d in zip(idx, dyn):
            full[i] = d
        return _bind(eqn, full)

    xs = tuple(args[i] for i in idx)
    stacks = tuple(series[i] for i in idx)
    outs = g(*xs)
    floating = [_floating(v.aval) for v in eqn.outvars]
    if not any(floating):  # a comparison, an argmax: integer or boolean outputs carry no series
        return outs, [None] * len(outs)
    d = jax.vmap(lambda *c: jax.jvp(g, xs, c)[1])(*stacks)  # Df[x'] and Df[x'']
    if order == 1 or _linear_in(eqn, moving):
        return outs, [x if f else None for x, f in zip(d, floating)]
    c1 = tuple(st[0] for st in stacks)
    if eqn.primitive.name in BILINEAR:  # both factors move: D^2 f[x', x'] = 2 f(x'_a, x'_b)
        dd = [2 * o for o in _bind(eqn, [c1[idx.index(i)] if m else a for i, (a, m) in enumerate(zip(args, moving))])]
    else:
        _, dd = jax.jvp(lambda *x: jax.jvp(g, x, c1)[1], xs, c1)
    return outs, [jnp.concatenate([a[:1], a[1:] + b[None]]) if f else None for a, b, f in zip(d, dd, floating)]


def eval_series(jaxpr, consts, args, series, order: int = 2):
    """Evaluate `jaxpr` on `args`; `series[i]` is the stacked [order, ...] (x', x'') of
    args[i], or None where it does not depend on alpha (a constant)."""
    env, ser = {}, {}

    def read(v):
        if isinstance(v, jex.Literal):
            return v.val, None
        return env[v], ser[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v], ser[v] = c, None
    for v, a, s in zip(jaxpr.invars, args, series):
        env[v], ser[v] = a, s
    for eqn in jaxpr.eqns:
        vals, sers = zip(*(read(v) for v in eqn.invars)) if eqn.invars else ((), ())
        vals, sers = list(vals), list(sers)
        if all(s is None for s in sers):
            outs, out_ser = _bind(eqn, vals), [None] * len(eqn.outvars)
        elif eqn.primitive.name in CALLS:
            closed = eqn.params["jaxpr"]
            outs, out_ser = eval_series(closed.jaxpr, closed.consts, vals, sers, order)
        else:
            outs, out_ser = _eqn_series(eqn, vals, sers, order)
        for v, o, s in zip(eqn.outvars, outs, out_ser):
            if isinstance(v, jex.DropVar):
                continue
            env[v] = o
            ser[v] = s if (s is not None and _floating(v.aval)) else None
    outs, out_ser = [], []
    for v in jaxpr.outvars:
        val, s = read(v)
        outs.append(val)
        out_ser.append(s)
    return outs, out_ser


def series_jets(fn, params, alpha, order: int = 2):
    """(x, dx/dalpha, d2x/dalpha2)[: order + 1] of fn(params, alpha) in one Taylor-series pass.

    `alpha` is a scalar or any array (then the derivatives are along the direction of ones,
    as `taylor.closure_jets`); `fn` returns one array.
    """
    if order == 0:
        return (fn(params, alpha),)
    flat, tree = jax.tree_util.tree_flatten((params, alpha))
    closed = jax.make_jaxpr(lambda *leaves: fn(*jax.tree_util.tree_unflatten(tree, leaves)))(*flat)
    start = jnp.stack([jnp.ones_like(alpha)] + [jnp.zeros_like(alpha)] * (order - 1))
    series = [None] * (len(flat) - 1) + [start]
    (out,), (s,) = eval_series(closed.jaxpr, closed.consts, flat, series, order)
    if s is None:  # the output does not depend on alpha
        return (out,) + tuple(jnp.zeros_like(out) for _ in range(order))
    return (out, *(s[i] for i in range(order)))
