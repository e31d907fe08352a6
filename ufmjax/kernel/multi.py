"""Vector-valued steering strength: alpha in R^k, every quantity with its gradient and Hessian.

Shape legend: A = alpha points, C = points of one chunk, k = steering terms (so alpha is [k]),
B = bootstrap resamples (a batch of steering vectors), M = rows, V = vocabulary.

A k-term closure `fn(params, alpha_k) -> logits [M, V]` steers with h_l <- h_l + sum_i
alpha_i v_i (docs/theory.md, "Several vectors"). The point function is written for ONE point
alpha_k and vmapped over a chunk, as on the scalar path (`kernel.taylor`): one Taylor-series
pass through the model only, along the k coordinate directions (`series.direction_jets`: x,
its Jacobian J [k, M, V] and Hessian H [k, k, M, V] in alpha), and the softmax quantities from
them in closed form:

    g_i = J_i - E[J_i]                  (log p)_i, so p_i = p g_i
    Cov_ij = E[g_i g_j]                 the exponential tilt's covariance
    g_ij = H_ij - E[H_ij] - Cov_ij      (log p)_ij, so p_ij = p (g_i g_j + g_ij)

and every reduction of `measure.derivative_tree` applied per direction (or pair), the k = 1
case being exactly the scalar path's chain rule. Sweeps keep the scalar driver: chunks of
points sharded over the devices, streamed to a sink; the keys are `<q>` [A, ...], `grad_<q>`
[A, ..., k] and `hess_<q>` [A, ..., k, k].

Bootstrap (`batched`): top-level keys of the closure's params that carry a leading axis of B
resampled steering vectors; the point function is vmapped over them as well, so B vectors are
swept in one compiled pass (results [A, B, ...]) and the alpha = 0 reference, which no vector
changes, is computed once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ufmjax.common import cast_floats
from ufmjax.kernel import measure as ms_mod
from ufmjax.kernel.driver import (check_devices, check_dtype, check_quantities, default_chunk_size, drive, largest_intermediate, model_mesh,
                                  place, place_keeping, to_host)
from ufmjax.kernel.grid import MULTI_PREFIXES, check_order, check_points
from ufmjax.kernel.measure import Measure, Reference, make_measure, reference_of
from ufmjax.kernel.series import direction_jets
from ufmjax.kernel.taylor import count_trace, select
from ufmjax.steering import Steered


def multi_jets(fn, params, alpha_k, order: int):
    """(x, J [k, M, V], H [k, k, M, V])[: order + 1]: the logits and their first two
    derivatives in alpha_k. Both derivatives come from one Taylor-series pass along the k
    directions (`series.direction_jets`: 1 + k + k (k + 1) / 2 streams); the first alone from
    forward mode along them (`nested_multi_jets`)."""
    if order == 2:
        return direction_jets(fn, params, alpha_k, 2)
    return nested_multi_jets(fn, params, alpha_k, order)


def nested_multi_jets(fn, params, alpha_k, order: int):
    """multi_jets by nested forward mode along the k coordinate directions (the primal and
    the Jacobian computed once, not once per direction), the reference of the series pass.
    H is symmetrised: d_s(d_t x) and d_t(d_s x) agree only to rounding."""
    def f(a):
        return fn(params, a)

    if order == 0:
        return (f(alpha_k),)
    eye = jnp.eye(alpha_k.shape[0], dtype=alpha_k.dtype)

    def first(a):
        return jax.vmap(lambda t: jax.jvp(f, (a,), (t,)), out_axes=(None, 0))(eye)

    if order == 1:
        return first(alpha_k)
    (x, J), (_, H) = jax.vmap(lambda s: jax.jvp(first, (alpha_k,), (s,)), out_axes=((None, None), (0, 0)))(eye)
    return x, J, 0.5 * (H + jnp.swapaxes(H, 0, 1))


def _last(tree, n: int):
    """Move the n leading direction axes of every leaf to the end."""
    return jax.tree.map(lambda x: jnp.moveaxis(x, tuple(range(n)), tuple(range(x.ndim - n, x.ndim))), tree)


def multi_quantities(jets, ref: Reference, ms: Measure):
    """Quantities, gradients [..., k] and Hessians [..., k, k] from the logits' jets."""
    x_MxV = jets[0]
    logp_MxV = jax.nn.log_softmax(x_MxV, axis=-1)
    p_MxV = jnp.exp(logp_MxV)
    out = [ms_mod.values(logp_MxV, p_MxV, ref, ms)]
    if len(jets) == 1:
        return tuple(out)
    J_kxMxV = jets[1]
    g_kxMxV = J_kxMxV - jnp.sum(p_MxV * J_kxMxV, axis=-1, keepdims=True)
    pg_kxMxV = p_MxV * g_kxMxV
    zero_M = jnp.zeros(x_MxV.shape[:1], x_MxV.dtype)

    def first(pg, g):
        return ms_mod.derivative_tree(pg, g, zero_M, logp_MxV, ref, ms)

    out.append(_last(jax.vmap(first)(pg_kxMxV, g_kxMxV), 1))
    if len(jets) == 2:
        return tuple(out)
    H_kxkxMxV = jets[2]
    cov_kxkxM = jnp.einsum("imv,jmv->ijm", pg_kxMxV, g_kxMxV)
    g2_kxkxMxV = H_kxkxMxV - (jnp.sum(p_MxV * H_kxkxMxV, axis=-1) + cov_kxkxM)[..., None]
    q_kxkxMxV = p_MxV * (g_kxMxV[:, None] * g_kxMxV[None, :] + g2_kxkxMxV)

    def second(q, g2, cov):
        return ms_mod.derivative_tree(q, g2, cov, logp_MxV, ref, ms)

    # Symmetric to rounding: pair (i, j) and (j, i) are the same sums in another order.
    out.append(_last(jax.vmap(jax.vmap(second))(q_kxkxMxV, g2_kxkxMxV, cov_kxkxM), 2))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def multi_chunk_fn(fn, order: int, names: tuple | None = None, batched: tuple = ()):
    """jit(vmap(point)) over a chunk of points [C, k]; with `batched` keys, also vmapped over
    their leading axis of B steering vectors (results [C, B, ...])."""

    def point(alpha_k, params, ref, ms):
        return multi_quantities(multi_jets(fn, params, alpha_k, order), ref, ms)

    if batched:
        def inner(alpha_k, params, ref, ms):
            axes = {key: (0 if key in batched else None) for key in params}
            return jax.vmap(point, in_axes=(None, axes, None, None))(alpha_k, params, ref, ms)
    else:
        inner = point

    def chunk(alphas_Cxk, params, ref, ms):
        count_trace()
        return select(jax.vmap(inner, in_axes=(0, None, None, None))(alphas_Cxk, params, ref, ms), names)

    return jax.jit(chunk)


def check_batched(params, batched) -> tuple:
    """The bootstrap keys as a sorted tuple, each a top-level key of params with one common
    leading size B >= 1, else ValueError."""
    batched = tuple(sorted(batched))
    if not batched:
        return ()
    if not isinstance(params, dict):
        raise ValueError("bootstrap needs the closure's params to be a dict of arrays")
    sizes = set()
    for key in batched:
        if key not in params:
            raise ValueError(f"bootstrap key {key!r} is not a parameter of the closure")
        sizes |= {x.shape[0] if np.ndim(x) else None for x in jax.tree.leaves(params[key])}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"the bootstrap parameters {batched} must share one leading resample axis, got sizes {sizes}")
    return batched


def unbatched(params, batched):
    """Resample 0's parameters (what the alpha = 0 reference and the output shape need)."""
    return {key: (jax.tree.map(lambda x: x[0], value) if key in batched else value) for key, value in params.items()}


class MultiEvaluator:
    """One k-term closure and one Measure, compiled once: quantities, gradients and Hessians.

    Args:
      steered: `fn(params, alpha_k) -> logits [M, V]`.
      measure: what to compute (`make_measure` on `scalar_view(steered, k)`), in the dtype.
      k: the number of steering terms (alpha's length).
      order: the most derivatives any call asks for (0, 1 or 2).
      dtype, devices, quantities: as for `kernel.Evaluator`.
      batched: top-level params keys with a leading axis of B resampled vectors (bootstrap).
    """

    prefixes = MULTI_PREFIXES

    def __init__(self, steered: Steered, measure: Measure, *, k: int, order: int = 2, dtype=jnp.float32,
                 devices=None, quantities=None, batched=()):
        self.dtype = check_dtype(dtype)
        self.order = check_order(order)
        self.k = check_k(k)
        self.fn = steered.fn
        self.quantities = check_quantities(quantities)
        if jnp.dtype(measure.onehot_VxG.dtype) != self.dtype:
            raise ValueError(f"measure was built in {jnp.dtype(measure.onehot_VxG.dtype)}, not {self.dtype}")
        self.batched = check_batched(steered.params, batched)
        self.model_mesh = model_mesh(steered.params)
        if self.model_mesh is not None:
            mesh = self.model_mesh
            self.devices = list(mesh.devices.flat)
        else:
            self.devices = list(check_devices(devices))
            mesh = Mesh(np.asarray(self.devices), ("alpha",))
        self.alpha_sharding = NamedSharding(mesh, PartitionSpec("alpha"))
        replicated = NamedSharding(mesh, PartitionSpec())
        params = cast_floats(steered.params, self.dtype)
        base = unbatched(params, self.batched)
        self.reference = place(reference_of(self.fn(base, jnp.zeros((self.k,), self.dtype)), measure), replicated)
        self.measure = place(measure, replicated)
        self.params = place_keeping(params, self.model_mesh, replicated)

    def chunk(self, alphas_Cxk, order: int | None = None):
        """Device results for a chunk of points [C, k]: one dict per order."""
        order = self.order if order is None else check_order(order)
        if order > self.order:
            raise ValueError(f"this evaluator was compiled for {self.order} derivatives, not {order}")
        fn = multi_chunk_fn(self.fn, order, self.quantities, self.batched)
        return fn(alphas_Cxk, self.params, self.reference, self.measure)

    def at(self, points, order: int | None = None) -> dict[str, np.ndarray]:
        """Every quantity at `points` [A, k]: `<q>`, `grad_<q>`, `hess_<q>` as numpy [A, ...]."""
        points = check_points(points, self.k)
        result = self.chunk(jnp.asarray(points, self.dtype), order)
        return {prefix + name: to_host(value) for prefix, tree in zip(MULTI_PREFIXES, result)
                for name, value in tree.items()}

    def probs_base(self) -> np.ndarray:
        return np.exp(to_host(self.reference.logp_MxV))


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of steering terms) must be a positive integer, got {k!r}")
    return int(k)


@functools.lru_cache(maxsize=64)
def _at_zero_fn(fn, k: int):
    def one(params, alpha):
        return fn(params, jnp.zeros((k,), jnp.result_type(alpha)) + alpha)
    return one


def scalar_view(steered: Steered, k: int, batched=()) -> Steered:
    """The closure along the diagonal alpha_k = (a, ..., a) for resample 0: what `make_measure`
    and `top_tokens` read (the output shape, the alpha = 0 distribution, the grid's ends)."""
    return Steered(_at_zero_fn(steered.fn, check_k(k)), unbatched(steered.params, tuple(batched)))


@functools.lru_cache(maxsize=64)
def _point_fn(fn, k: int):
    def one(params, point_k):
        return fn(params, point_k)
    return jax.jit(one)


def multi_top_tokens(steered: Steered, points, k_top: int, *, k: int, at: str = "max", batched=()) -> np.ndarray:
    """`kernel.top_tokens` of a k-term sweep: the k_top most likely tokens (mean over rows) at
    the point of largest ("max") or smallest ("min") coordinate sum, or both ends' union."""
    from ufmjax.kernel.driver import TOP_K_AT

    if at not in TOP_K_AT:
        raise ValueError(f"top_k_at must be one of {', '.join(TOP_K_AT)}, got {at!r}")
    points = check_points(points, k)
    s = points.sum(axis=1)
    ends = {"max": [int(np.argmax(s))], "min": [int(np.argmin(s))], "both": [int(np.argmin(s)), int(np.argmax(s))]}[at]
    params = unbatched(steered.params, tuple(batched))
    chosen = []
    for i in ends:
        logits = _point_fn(steered.fn, k)(params, jnp.asarray(points[i], jnp.result_type(float)))
        mean_p = np.asarray(jax.nn.softmax(logits, axis=-1).mean(axis=0))
        if isinstance(k_top, bool) or not isinstance(k_top, (int, np.integer)) or not 1 <= k_top <= mean_p.size:
            raise ValueError(f"top_k must be an integer in [1, {mean_p.size}], got {k_top!r}")
        chosen.append(np.argsort(-mean_p, kind="stable")[:k_top])
    return np.unique(np.concatenate(chosen)).astype(np.int64)


class MultiPlan:
    """A k-term sweep's points cut into chunks of `chunk_size` (a multiple of the devices)."""

    def __init__(self, points: np.ndarray, order: int, dtype, chunk_size: int):
        self.alphas, self.order, self.dtype, self.chunk_size = points, order, jnp.dtype(dtype), chunk_size

    @property
    def num_chunks(self) -> int:
        return -(-len(self.alphas) // self.chunk_size)

    def chunk(self, i: int) -> np.ndarray:
        part = self.alphas[i * self.chunk_size:(i + 1) * self.chunk_size]
        pad = np.repeat(self.alphas[-1:], self.chunk_size - len(part), axis=0)
        return np.concatenate([part, pad])


def multi_chunk_size(steered: Steered, measure: Measure, k: int, order: int, n_dev: int, dtype, batched=()) -> int:
    """Points per chunk: the scalar rule with 1 + k + k^2 streams through the model (order 2),
    times the B resamples of a bootstrap."""
    M, V = measure.num_rows, int(measure.onehot_VxG.shape[0])
    batch = jax.tree.leaves(steered.params[batched[0]])[0].shape[0] if batched else 1
    view = scalar_view(steered, k, batched)
    inter = largest_intermediate(view.fn, cast_floats(view.params, dtype), dtype)
    streams = (1, 1 + k, 1 + k + k * k)[order]
    return default_chunk_size(M * batch, V, n_dev, inter * batch, streams - 1)


def multi_sweep(steered: Steered, points, *, k: int, concept_of=None, ce_target=None, weights=None, tokens=None,
                measure: Measure | None = None, derivatives: int = 2, chunk_size: int | None = None,
                dtype=jnp.float32, devices=None, batched=(), sink=None, progress=None):
    """Sweep a k-term closure over alpha points [A, k] (a product grid, or any points).

    Args as for `kernel.sweep`, plus k (the terms) and `batched` (bootstrap keys, see the
    module docstring). Returns the sink: `alphas` [A, k], `tokens`, `concept_of`, `weights`,
    `probs_base` and, for each quantity, `<q>` [A, (B,) ...], `grad_<q>` [..., k] and
    `hess_<q>` [..., k, k] up to `derivatives`.
    """
    dtype = check_dtype(dtype)
    k = check_k(k)
    order = check_order(derivatives)
    points = check_points(points, k)
    batched = check_batched(steered.params, batched)
    if measure is None:
        if concept_of is None:
            raise ValueError("multi_sweep needs concept_of (or a measure)")
        measure = make_measure(scalar_view(steered, k, batched), concept_of=concept_of, ce_target=ce_target,
                               weights=weights, tokens=tokens, dtype=dtype)
    elif any(x is not None for x in (concept_of, ce_target, weights, tokens)):
        raise ValueError("give either measure or concept_of/ce_target/weights/tokens, not both")
    evaluator = MultiEvaluator(steered, measure, k=k, order=order, dtype=dtype, devices=devices, batched=batched)
    n_dev = evaluator.alpha_sharding.mesh.shape["alpha"]
    if chunk_size is None:
        chunk_size = multi_chunk_size(steered, measure, k, order, n_dev, dtype, batched)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    per_device = -(-len(points) // n_dev)
    chunk_size = int(-(-min(int(chunk_size), per_device * n_dev) // n_dev) * n_dev)
    plan = MultiPlan(points, order, dtype, chunk_size)
    out = drive(evaluator, plan, sink, progress)
    out.update(alphas=points, tokens=np.asarray(measure.tokens_K).astype(np.int64),
               concept_of=np.argmax(np.asarray(measure.onehot_VxG), axis=1).astype(np.int64),
               weights=np.asarray(measure.weights_M, np.float64), probs_base=evaluator.probs_base())
    return dict(out) if sink is None else out
