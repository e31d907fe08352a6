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

from ufmjax.kernel.grid import check_order

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


class Plan:
    """What a series holds: k first-order rows (derivatives along k directions of alpha), then
    one second-order row per pair (ii[p], jj[p]) of directions (none for first order only).
    A scalar alpha to second order is k = 1 and the one pair (0, 0): rows (x', x'')."""

    def __init__(self, k: int, pairs=()):
        self.k = int(k)
        self.ii = tuple(int(i) for i, _ in pairs)
        self.jj = tuple(int(j) for _, j in pairs)
        self.second = len(pairs) > 0


def _eqn_series(eqn, args, series, plan: Plan):
    """Outputs and their series (a tuple of k + pairs rows) of one equation with moving inputs.

    The series of a variable is a tuple of rows: its k first-order rows, then its second-order
    rows. Each row goes through the equation's derivative on its own, so a chain of elementwise
    maps (LayerNorm, GELU, a softmax) fuses into one pass over each row and a product with a
    constant weight runs at the values' own shape; a stacked [rows, ...] array instead had to
    be concatenated again after every nonlinear map (measured: XLA wrote 4.7x the values' bytes
    in elementwise fusions for 3x the arithmetic). Second-order rows gain D^2 f[x'_i, x'_j].
    """
    moving = [s is not None for s in series]
    idx = [i for i, m in enumerate(moving) if m]

    def g(*dyn):
        full = list(args)
        for i, d in zip(idx, dyn):
            full[i] = d
        return _bind(eqn, full)

    xs = tuple(args[i] for i in idx)
    rows = [tuple(series[i][r] for i in idx) for r in range(len(series[idx[0]]))]  # per row, per input
    outs = g(*xs)
    floating = [_floating(v.aval) for v in eqn.outvars]
    if not any(floating):  # a comparison, an argmax: integer or boolean outputs carry no series
        return outs, [None] * len(outs)
    d = [jax.jvp(g, xs, row)[1] for row in rows]  # Df on every row: d[row][output]
    if plan.second and not _linear_in(eqn, moving):
        k = plan.k
        if eqn.primitive.name in BILINEAR:  # both factors move: D^2 f[a, b] = f(a_1, b_2) + f(b_1, a_2)
            x1, x2 = idx

            def cross(u, w):
                full = list(args)
                full[x1], full[x2] = u, w
                return _bind(eqn, full)

            for p, (i, j) in enumerate(zip(plan.ii, plan.jj)):
                a, b = rows[i], rows[j]
                if i == j:  # a = b: the two cross products are one product, twice
                    dd = [2 * q for q in cross(a[0], b[1])]
                else:
                    dd = [q + r for q, r in zip(cross(a[0], b[1]), cross(b[0], a[1]))]
                d[k + p] = [x + e for x, e in zip(d[k + p], dd)]
        else:
            for p, (i, j) in enumerate(zip(plan.ii, plan.jj)):
                dd = jax.jvp(lambda *x: jax.jvp(g, x, rows[i])[1], xs, rows[j])[1]
                d[k + p] = [x + e for x, e in zip(d[k + p], dd)]
    return outs, [tuple(r[o] for r in d) if f else None for o, f in enumerate(floating)]


def eval_series(jaxpr, consts, args, series, plan: Plan):
    """Evaluate `jaxpr` on `args`; `series[i]` is the series of args[i], a tuple of rows
    (`Plan`), or None where it does not depend on alpha (a constant)."""
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
            outs, out_ser = eval_series(closed.jaxpr, closed.consts, vals, sers, plan)
        else:
            outs, out_ser = _eqn_series(eqn, vals, sers, plan)
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


def _run(fn, params, alpha, start, plan: Plan):
    """fn's output and its series, alpha's own series being `start` [rows, *alpha.shape]."""
    flat, tree = jax.tree_util.tree_flatten((params, alpha))
    closed = jax.make_jaxpr(lambda *leaves: fn(*jax.tree_util.tree_unflatten(tree, leaves)))(*flat)
    series = [None] * (len(flat) - 1) + [tuple(start)]
    (out,), (s,) = eval_series(closed.jaxpr, closed.consts, flat, series, plan)
    if s is None:  # the output does not depend on alpha
        return out, jnp.zeros((start.shape[0],) + jnp.shape(out), jnp.result_type(out))
    return out, jnp.stack(s)


def series_jets(fn, params, alpha, order: int = 2):
    """(x, dx/dalpha, d2x/dalpha2)[: order + 1] of fn(params, alpha) in one Taylor-series pass.

    `alpha` is a scalar or any array (then the derivatives are along the direction of ones,
    as `taylor.closure_jets`); `fn` returns one array.
    """
    order = check_order(order)
    if order == 0:
        return (fn(params, alpha),)
    start = jnp.stack([jnp.ones_like(alpha)] + [jnp.zeros_like(alpha)] * (order - 1))
    out, s = _run(fn, params, alpha, start, Plan(1, [(0, 0)] if order == 2 else []))
    return (out, *(s[i] for i in range(order)))


def direction_jets(fn, params, alpha_k, order: int = 2):
    """(x, J [k, ...], H [k, k, ...])[: order + 1]: fn(params, alpha_k) and its gradient and
    Hessian in alpha_k [k], in one pass carrying x, the k first derivatives and the
    k (k + 1) / 2 distinct second ones (nested forward mode along k directions pushes
    k + k^2 tangent streams and computes every off-diagonal pair twice)."""
    order = check_order(order)
    if order == 0:
        return (fn(params, alpha_k),)
    k = alpha_k.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(i, k)] if order == 2 else []
    eye = jnp.eye(k, dtype=alpha_k.dtype)
    start = jnp.concatenate([eye, jnp.zeros((len(pairs), k), alpha_k.dtype)]) if pairs else eye
    out, s = _run(fn, params, alpha_k, start, Plan(k, pairs))
    if order == 1:
        return out, s
    ii, jj = (jnp.asarray(x, jnp.int32) for x in zip(*pairs))
    H = jnp.zeros((k, k) + s.shape[1:], s.dtype).at[ii, jj].set(s[k:]).at[jj, ii].set(s[k:])
    return out, s[:k], H
