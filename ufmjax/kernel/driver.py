"""The chunked, sharded driver: the point evaluator and the sweep over a grid.

Shape legend: A = alphas of the grid, C = alphas of one chunk, M = rows, V = vocabulary,
G = concepts, K = tracked tokens.

`Evaluator` compiles one closure with one `Measure` (on the path the closure allows: affine,
taylor or jvp) and evaluates every quantity with its derivatives at any alphas; `sweep` plans
a grid into chunks, shards each chunk's alpha axis over the devices (a 1-D
`jax.sharding.Mesh`), drives them through the evaluator (copying one chunk back while the
next runs) and hands each chunk to a sink: an in-memory dict by default, or one that writes it
to disk as it comes (`runs.sweepfile.SweepFile`). Grids are checked here too (`check_grid`,
`parse_grid`: a `Grid` is sized before it is built), and `top_tokens` picks the tokens a sweep
tracks at a named end of its grid. With one device this is the plain single-device
computation; the same code runs on many GPUs, a TPU slice or several hosts under
`jax.distributed` (each process passes the same grid and receives the whole result).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ufmjax import steering
from ufmjax.common import cast_floats
from ufmjax.kernel import affine
from ufmjax.kernel import head as head_mod
from ufmjax.kernel.grid import PREFIXES, QUANTITIES, Grid, check_alphas, check_order, is_auto, resolve_top_k
from ufmjax.kernel.measure import (Measure, Reference, logits_at_zero, make_measure, output_shape,
                                   reference_fn, reference_from_logits, traced)
from ufmjax.kernel.series import CALLS
from ufmjax.kernel.taylor import jvp_chunk_fn, taylor_chunk_fn
from ufmjax.steering import Steered

# Elements of one [C, M, V] intermediate the default chunk size aims at (8 MiB in float32): a
# dozen such arrays live at once with second derivatives; larger chunks fall out of the CPU's
# caches and run slower, not faster (measured on a GPT: 2.4x slower at 4x the size).
CHUNK_ELEMENTS = 1 << 21
MAX_CHUNK = 512
# The head path's per-alpha array is one vocabulary block of logit series [S, M, Vb]; a chunk
# holding about 2^20 of their elements ran fastest, measured side by side at V = 50,257, 4 rows
# and 128 alphas: values 0.16-0.18 ms per (alpha x prompt) at 64-128 a chunk (2^19-2^20) against
# 0.25 at 16; both derivatives 0.48-0.49 at 32-64 (2^20) against 0.61 at 128 and 0.58 at 16.
HEAD_CHUNK_ELEMENTS = 1 << 20
# Its model part keeps CHUNK_ELEMENTS: 2^22 ran 5-10% faster with every position steered on the
# GPT-2-sized model (4 prompts) but 1.7x SLOWER on the small GPT of `bench --sections gpt`
# (16 prompts x 64 positions, width 64: chunks of 16 and 5 alphas against 8 and 2).
# What separates the two is how often a chunk re-reads the weights (`weight_rows`): the model
# part's chunk is raised until its largest product with a weight sees WEIGHT_ROWS rows summed
# over the series' streams, while its largest intermediate stays within MAX_CHUNK_ELEMENTS.
# The small GPT has 1,024 rows per alpha already and keeps its chunks; the GPT-2-sized one
# (256 rows) goes from 1 to 3 alphas with both derivatives and from 5 to 8 for values.
# Counting the rows of one stream only gave 7 alphas with both derivatives, 2.5-3.5% slower
# than 3 in three side-by-side runs (all positions steered, 50,257 x 384, 6 layers: 3.38-3.41x
# the values' time against 3.28-3.29x; 2 and 4 alphas 3.26-3.32x).
WEIGHT_ROWS = 2048
MAX_CHUNK_ELEMENTS = 1 << 23
METHODS = ("auto", "affine", "head", "taylor", "jvp")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


# ---------------------------------------------------------------- arguments

def check_devices(devices) -> tuple:
    """The devices to shard alphas over (all visible ones for None), else ValueError naming devices."""
    if devices is None:
        return tuple(jax.devices())
    if isinstance(devices, jax.Device):
        return (devices,)
    try:
        devices = tuple(devices)
    except TypeError:
        raise ValueError(f"devices must be a sequence of jax devices, got {type(devices).__name__}") from None
    if not devices:
        raise ValueError("devices must name at least one device, got an empty sequence")
    for d in devices:
        if not isinstance(d, jax.Device):
            raise ValueError(f"devices must be jax devices (from jax.devices()), got {d!r}")
    if len(set(devices)) != len(devices):
        raise ValueError("devices must be distinct (a device listed twice)")
    return devices


def check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax_enable_x64 (ufmjax sweep --float64 sets it)")
    return dtype


def check_quantities(quantities) -> tuple | None:
    """Names of QUANTITIES to compute, as a tuple (None: all), else ValueError naming them."""
    if quantities is None:
        return None
    unknown = sorted(set(quantities) - set(QUANTITIES))
    if unknown:
        raise ValueError(f"quantities must be names of {sorted(QUANTITIES)}, got {unknown}")
    return tuple(quantities)


def resolve_method(fn, method: str, num_concepts: int, sharded: bool = False) -> str:
    """'auto' -> 'affine' for closures declared affine (few concepts), 'head' for closures
    declared with an unembedding (`steering.register_head`), else 'taylor'. A model sharded
    over its vocabulary (`sharded`) keeps 'taylor': its logits are already split over the
    devices, where the head path would slice blocks out of a split W."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "head" and steering.head_of(fn) is None:
        raise ValueError("method 'head' needs a closure declared with steering.register_head (a GPT's or a "
                         "pretrained model's); use 'taylor' for any closure")
    if method != "auto":
        return method
    if steering.is_affine(fn) and num_concepts <= affine.AFFINE_MAX_CONCEPTS:
        return "affine"
    return "head" if steering.head_of(fn) is not None and not sharded else "taylor"


# ---------------------------------------------------------------- sizes and placement

def default_chunk_size(num_rows: int, vocab: int, num_devices: int = 1, intermediate: int = 0,
                       order: int = 0, target: int = CHUNK_ELEMENTS) -> int:
    """Largest chunk keeping one [C, M, V] intermediate near CHUNK_ELEMENTS, per device.

    `intermediate`: elements of the closure's largest intermediate for one alpha (a GPT's
    [B, T, 4 D] activations can dwarf its [M, V] logits); the chunk is sized to the larger.
    `order`: derivatives asked for; forward mode carries order + 1 streams through the model.
    `target`: elements of that intermediate per device (the head path sizes its vocabulary
    block's series to `HEAD_CHUNK_ELEMENTS` and the model's own arrays to CHUNK_ELEMENTS).
    """
    per_alpha = max(1, num_rows * vocab, intermediate) * (order + 1)
    per_device = max(1, min(MAX_CHUNK, target // per_alpha))
    return per_device * num_devices


def largest_intermediate(fn, params, dtype) -> int:
    """Elements of the largest ALPHA-DEPENDENT array `fn(params, alpha)` computes for one alpha.

    Only arrays that depend on alpha are per-alpha intermediates: under vmap over a chunk the
    others (a transposed unembedding [V, D], a cached prefix's products) are computed once
    and shared, so counting them shrank a 50,257-token model's chunk to one alpha.
    """
    return _moving_stats_of(fn, params, dtype)[0]


def weight_rows(fn, params, dtype) -> int:
    """Rows one alpha sends through the closure's largest product with a constant operand (a
    weight, or a cached key block): the moving operand's elements over its contracted ones;
    0 when there is no such product.

    Each chunk reads every such operand once per stream: with every position steered a
    GPT-2-sized block sees M * T = 256 rows per alpha, and a chunk of one alpha (what the
    element count gives with derivatives) ran a third slower than eight (measured side by side
    at 50,257 x 384, 6 layers: 12.2 ms per alpha x prompt at 1 alpha a chunk, 9.4 at 3, 8.2
    at 8)."""
    return _moving_stats_of(fn, params, dtype)[1][1]


def _moving_stats_of(fn, params, dtype):
    """`_moving_stats` of fn's program, traced once per closure and shapes."""
    def compute():
        flat, tree = jax.tree_util.tree_flatten((params, jnp.zeros((), dtype)))
        closed = jax.make_jaxpr(lambda *leaves: fn(*jax.tree_util.tree_unflatten(tree, leaves)))(*flat)
        return _moving_stats(closed.jaxpr, [False] * (len(flat) - 1) + [True])

    return traced("moving_stats", fn, params, dtype, compute)


# Primitives whose sub-program takes the equation's inputs one to one: the calls the series
# pass walks inside, and the custom-derivative and rematerialised calls.
ONE_TO_ONE = CALLS | {"custom_jvp_call", "custom_vjp_call", "checkpoint", "remat", "custom_lin"}


def _moving_stats(jaxpr, moving_in) -> tuple[int, tuple[int, int]]:
    """(largest output of an equation with an alpha-dependent input, (weight elements, rows)
    of the largest dot_general with one moving and one constant operand), sub-programs
    included: a call's inputs map one to one; a loop's or branch's are all taken as moving,
    and its products are not counted as weight products."""
    moving = {v for v, m in zip(jaxpr.invars, moving_in) if m}
    best, product = 0, (0, 0)
    for eqn in jaxpr.eqns:
        m_in = [not isinstance(v, jax.extend.core.Literal) and v in moving for v in eqn.invars]
        if not any(m_in):
            continue
        for v in eqn.outvars:
            moving.add(v)
            best = max(best, math.prod(getattr(v.aval, "shape", ())))
        if eqn.primitive.name == "dot_general" and sum(m_in) == 1:
            x, w = eqn.invars if m_in[0] else eqn.invars[::-1]
            (lc, rc), _ = eqn.params["dimension_numbers"]
            contracted = math.prod(x.aval.shape[d] for d in (lc if m_in[0] else rc))
            product = max(product, (math.prod(w.aval.shape), math.prod(x.aval.shape) // max(1, contracted)))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    # A call's inputs map one to one; a loop's carry can pick alpha up inside
                    # the body even when it enters constant, so all of a loop's inputs move.
                    one_to_one = eqn.primitive.name in ONE_TO_ONE and len(sub.invars) == len(m_in)
                    inner_best, inner_product = _moving_stats(sub, m_in if one_to_one else [True] * len(sub.invars))
                    best = max(best, inner_best)
                    if one_to_one:
                        product = max(product, inner_product)
    return best, product


def place(tree, sharding):
    """Put host or device arrays on `sharding`. Several processes (jax.distributed) each hold
    the same values, so every process builds the global array from its own copy. Leaves
    already laid out so are left as they are (a model's few hundred weights cost milliseconds
    of dispatch per sweep otherwise)."""
    if jax.process_count() == 1:
        def one(x):
            if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            return jax.device_put(x, sharding)

        return jax.tree.map(one, tree)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def model_mesh(tree):
    """The mesh of a model sharded over a "model" axis (`models.hf.shard`), found on the
    tree's leaves, or None. Such a mesh must also have an "alpha" axis: the sweep shards
    alphas over it and leaves the model's own sharding in place."""
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and "model" in sharding.mesh.axis_names:
            if "alpha" not in sharding.mesh.axis_names:
                raise ValueError("a model mesh needs an 'alpha' axis beside its 'model' axis")
            return sharding.mesh
    return None


def place_keeping(tree, mesh, replicated):
    """`place(tree, replicated)`, except leaves already laid out on `mesh` (a sharded model's
    weights), which stay where they are instead of being gathered onto every device."""
    if mesh is None:
        return place(tree, replicated)

    def one(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return place(x, replicated)

    return jax.tree.map(one, tree)


def to_host(value) -> np.ndarray:
    """A kernel result as numpy, gathered from every process when it spans several hosts."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


# ---------------------------------------------------------------- the point evaluator

class Evaluator:
    """One steered closure and one Measure, compiled once: every quantity and its derivatives.

    Args:
      steered: the model's `alpha -> logits [M, V]` closure.
      measure: what to compute (`make_measure`), in the evaluator's dtype.
      order: the most derivatives any call asks for (0, 1 or 2).
      method: "auto" (affine for closures declared affine, head for closures declared with an
        unembedding, else taylor), "affine", "head", "taylor" or "jvp" (the nested-jvp
        reference). All agree to rounding.
      dtype: float32 or float64.
      devices: the devices of the mesh (all visible devices by default).
      reference: the alpha = 0 Reference to measure against (computed from `steered` if None;
        the per-context optimiser passes the unsteered model's own).
      alphas_per_call: the chunk length the caller will use (sizes the affine row blocks).
      quantities: names of QUANTITIES to compute (all by default); the others are not
        computed at all (the optimiser needs four of the seven).
    """

    def __init__(self, steered: Steered, measure: Measure, *, order: int = 2, method: str = "auto",
                 dtype=jnp.float32, devices=None, reference: Reference | None = None, alphas_per_call: int = 1,
                 quantities=None, model_batch: int | None = None):
        self.dtype = check_dtype(dtype)
        self.order = check_order(order)
        self.fn = steered.fn
        self.quantities = check_quantities(quantities)
        self.model_batch = model_batch
        self.model_mesh = model_mesh(steered.params)
        self.method = resolve_method(self.fn, method, measure.num_concepts, self.model_mesh is not None)
        if self.model_mesh is not None:  # the model is sharded: its mesh carries the alphas too
            mesh = self.model_mesh
            self.devices = list(mesh.devices.flat)
        else:
            self.devices = list(check_devices(devices))
            mesh = Mesh(np.asarray(self.devices), ("alpha",))
        self.alpha_sharding = NamedSharding(mesh, PartitionSpec("alpha"))
        replicated = NamedSharding(mesh, PartitionSpec())
        if jnp.dtype(measure.onehot_VxG.dtype) != self.dtype:
            raise ValueError(f"measure was built in {jnp.dtype(measure.onehot_VxG.dtype)} but the evaluation runs in "
                             f"{self.dtype}: build it with make_measure(..., dtype={self.dtype})")
        params = cast_floats(steered.params, self.dtype)
        self.reference = reference_fn(self.fn)(params, measure) if reference is None else reference
        self.measure = place(measure, replicated)
        if self.method == "affine":
            M, V = measure.num_rows, int(measure.onehot_VxG.shape[0])
            per_device = max(1, -(-alphas_per_call // mesh.shape["alpha"]))
            self.row_block = affine.affine_row_block(M, V, per_device)
            self.point = alphas_per_call <= affine.POINT_ALPHAS
            self.parts = place(affine.affine_parts(self.fn, params, measure, self.order, moments=not self.point),
                               replicated)
            self.affine_reference = affine.affine_reference_fn(self.row_block, self.point)(self.parts, self.measure)
        else:
            self.params = place_keeping(params, self.model_mesh, replicated)
            self.reference = place(self.reference, replicated)

    def chunk(self, alphas_C, order: int | None = None):
        """Device results for a chunk of alphas (placed by the caller): one dict per order."""
        order = self.order if order is None else check_order(order)
        if order > self.order:
            raise ValueError(f"this evaluator was compiled for {self.order} derivatives, not {order}")
        if self.method == "affine":
            fn = affine.affine_chunk_fn(order, self.row_block, self.quantities, self.point)
            return fn(alphas_C, self.parts, self.affine_reference, self.measure)
        if self.method == "head":
            fn = head_mod.head_chunk_fn(self.fn, order, self.quantities, head_mod.VOCAB_BLOCK, self.model_batch,
                                        self.alpha_sharding.mesh.shape["alpha"])
        else:
            fn = (jvp_chunk_fn if self.method == "jvp" else taylor_chunk_fn)(self.fn, order, self.quantities)
        return fn(alphas_C, self.params, self.reference, self.measure)

    def at(self, alphas, order: int | None = None) -> dict[str, np.ndarray]:
        """Every quantity at `alphas` in one call: `<q>`, `d_<q>`, `d2_<q>` as numpy [A, ...]."""
        alphas = check_alphas(alphas)
        result = self.chunk(jnp.asarray(alphas, self.dtype), order)
        return {prefix + name: to_host(value) for prefix, tree in zip(PREFIXES, result)
                for name, value in tree.items()}

    def probs_base(self) -> np.ndarray:
        """Unsteered next-token probabilities [M, V]."""
        return np.exp(to_host(self.reference.logp_MxV))


# ---------------------------------------------------------------- the sweep

TOP_K_AT = ("max", "min", "both")


def auto_tokens(steered: Steered, alphas, tokens, dtype):
    """`tokens` as given, or for "auto" None (every token) up to ALL_TOKENS_UP_TO tokens and
    the DEFAULT_TOP_K most likely at the grid's largest alpha beyond."""
    if not is_auto(tokens):
        return tokens
    k = resolve_top_k("auto", output_shape(steered, dtype)[1])
    return None if k is None else top_tokens(steered, alphas, k, "max")


@functools.lru_cache(maxsize=64)
def _mean_probs_fn(fn):
    """jit((params, alpha) -> mean over rows of softmax(fn(params, alpha)))."""
    return jax.jit(lambda params, alpha: jax.nn.softmax(fn(params, alpha), axis=-1).mean(axis=0))


def top_tokens(steered: Steered, alphas, k: int, at: str = "max") -> np.ndarray:
    """The k tokens of largest mean steered probability (over rows) at a named end of the grid (Fig. 6).

    Args:
      steered: the model's `alpha -> logits [M, V]` closure.
      alphas: the grid (array-like or `Grid`); only its ends are evaluated.
      k: tokens per end, in [1, V].
      at: "max": at the grid's largest alpha (the target's direction on any grid through 0);
        "min": at its smallest; "both": the union of the k at each end (so up to 2k tokens).
    Returns:
      the tracked token ids, sorted, int64 [K].
    """
    if at not in TOP_K_AT:
        raise ValueError(f"top_k_at must be one of {', '.join(TOP_K_AT)}, got {at!r}")
    if isinstance(alphas, Grid):
        lo, hi = alphas.start, alphas.stop if alphas.num > 1 else alphas.start  # linspace's own ends
    else:
        arr = check_alphas(alphas)
        lo, hi = float(arr.min()), float(arr.max())
    ends = {"max": [hi], "min": [lo], "both": [lo, hi]}[at]
    chosen = []
    for a in ends:
        mean_p = np.asarray(_mean_probs_fn(steered.fn)(steered.params, jnp.asarray(a, jnp.result_type(float))))
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= mean_p.size:
            raise ValueError(f"top_k must be an integer in [1, {mean_p.size}], got {k!r}")
        chosen.append(np.argsort(-mean_p, kind="stable")[:k])
    return np.unique(np.concatenate(chosen)).astype(np.int64)


@dataclass(frozen=True)
class SweepPlan:
    """How a grid is cut: chunks of `chunk_size` alphas (a multiple of the device count)."""

    alphas: np.ndarray
    order: int
    method: str
    dtype: jnp.dtype
    devices: tuple
    chunk_size: int
    model_batch: int | None = None  # head path: alphas per device the model part takes at a time

    @property
    def num_chunks(self) -> int:
        return -(-self.alphas.size // self.chunk_size)

    def padded(self) -> np.ndarray:
        """The grid padded to whole chunks with its last alpha: one compiled shape for any grid."""
        A = self.alphas.size
        return np.concatenate([self.alphas, np.full(self.num_chunks * self.chunk_size - A, self.alphas[-1])])

    def chunk(self, i: int) -> np.ndarray:
        """Chunk i of `padded()`, built alone (a long grid is never copied whole)."""
        part = self.alphas[i * self.chunk_size:(i + 1) * self.chunk_size]
        return np.concatenate([part, np.full(self.chunk_size - part.size, self.alphas[-1])])


def plan_sweep(steered: Steered, alphas, measure: Measure, *, derivatives: int, chunk_size, dtype,
               devices, method: str) -> SweepPlan:
    """Check the sweep's arguments and cut the grid into chunks."""
    alphas = check_alphas(alphas)
    order = check_order(derivatives)
    mesh = model_mesh(steered.params)
    method = resolve_method(steered.fn, method, measure.num_concepts, mesh is not None)
    if mesh is not None:  # a sharded model: alphas go over its mesh's "alpha" axis
        devices, n_dev = tuple(mesh.devices.flat), mesh.shape["alpha"]
    else:
        devices = check_devices(devices)
        n_dev = len(devices)
    if chunk_size is None:
        M, V = measure.num_rows, int(measure.onehot_VxG.shape[0])
        if method == "affine":
            chunk_size = affine.default_affine_chunk_size(V, n_dev)
        elif method == "head":  # the logits are only ever one block [M, Vb] per alpha
            chunk_size = default_chunk_size(M, min(V, head_mod.VOCAB_BLOCK), n_dev, 0, order, HEAD_CHUNK_ELEMENTS)
        else:
            inter = largest_intermediate(steered.fn, cast_floats(steered.params, dtype), dtype)
            chunk_size = default_chunk_size(M, V, n_dev, inter, order)
        chunk_size = balanced_chunk(alphas.size, chunk_size, n_dev)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    # A chunk longer than the grid would only compute padding (a --chunk-size of 1e8 padded
    # 41 alphas to 1e8 and ran for ever): at most the grid, rounded up to the devices.
    chunk_size = min(int(chunk_size), -(-alphas.size // n_dev) * n_dev)
    chunk_size = int(-(-chunk_size // n_dev) * n_dev)
    model_batch = None  # head path: alphas per device the model part takes at a time (None: the whole chunk)
    if method == "head":
        model_batch = model_batch_size(steering.head_of(steered.fn).hidden, cast_floats(steered.params, dtype),
                                       dtype, order)
        if model_batch >= chunk_size // n_dev:
            model_batch = None  # the model part takes the whole chunk anyway
    return SweepPlan(alphas, order, method, jnp.dtype(dtype), devices, chunk_size, model_batch)


def balanced_chunk(num_alphas: int, chunk_size: int, n_dev: int) -> int:
    """A chunk of at most `chunk_size` alphas that cuts the grid into that many chunks evenly.

    The last chunk is padded with the grid's last alpha, so a chunk of 42 for 64 alphas
    computed 84 (a quarter of the work thrown away) where two of 32 compute 64. The chunk is
    rounded up to an eighth of a power of two, so any grid length compiles at most 8 shapes
    per octave (a short grid gets a chunk that just holds it, not a long padded one).
    """
    per_device = -(-num_alphas // n_dev)
    cap = max(1, chunk_size // n_dev)
    even = -(-per_device // -(-per_device // cap))
    granule = max(1, (1 << (even - 1).bit_length()) // 8)
    return min(-(-even // granule) * granule, cap) * n_dev


def model_batch_size(hidden, params, dtype, order: int) -> int:
    """Alphas the model part of a head closure takes at a time (per device).

    The element count (`default_chunk_size`), raised until the largest product with a
    constant operand sees WEIGHT_ROWS rows per batch summed over the order + 1 streams of
    the series (each stream's product runs on the same weight back to back; what must stay
    in cache between a product and the map that consumes it is every stream's intermediate),
    while the largest intermediate stays within MAX_CHUNK_ELEMENTS."""
    inter = largest_intermediate(hidden, params, dtype)
    batch = default_chunk_size(1, 1, 1, inter, order)
    rows = weight_rows(hidden, params, dtype) * (order + 1)
    if rows:
        batch = max(batch, min(-(-WEIGHT_ROWS // rows), default_chunk_size(1, 1, 1, inter, order, MAX_CHUNK_ELEMENTS)))
    return batch


class ArraySink(dict):
    """Where `drive` puts results by default: each output one in-memory numpy array [A, ...].

    A sink is a mutable mapping of output names to arrays with one more method,
    `allocate(name, shape, dtype)`, returning something that takes `x[lo:hi] = values` for
    consecutive slices of the first axis; `runs.sweepfile.SweepFile` is one that writes each
    slice to disk as it comes, so a sweep's memory does not grow with its grid.
    """

    def allocate(self, name: str, shape: tuple, dtype) -> np.ndarray:
        self[name] = np.empty(shape, dtype)
        return self[name]


def drive(evaluator: Evaluator, plan: SweepPlan, sink=None, progress=None):
    """Run every chunk of the plan; copy each back while the next one runs.

    Args:
      evaluator, plan: from `Evaluator` and `plan_sweep`.
      sink: where each output [A, ...] goes, chunk by chunk (`ArraySink` by default).
      progress: called with the number of alphas of each chunk once it is stored.
    Returns:
      the sink (by default a dict of numpy arrays [A, ...]).
    """
    sink = ArraySink() if sink is None else sink
    A, C = len(plan.alphas), plan.chunk_size  # [A] alphas, or [A, k] points (`kernel.multi`)
    prefixes = getattr(evaluator, "prefixes", PREFIXES)
    slots = {}

    def collect(i, result):
        lo, hi = i * C, min((i + 1) * C, A)
        for prefix, tree in zip(prefixes, result):
            for name, value in tree.items():
                value = to_host(value)
                if prefix + name not in slots:
                    slots[prefix + name] = sink.allocate(prefix + name, (A,) + value.shape[1:], value.dtype)
                slots[prefix + name][lo:hi] = value[: hi - lo]
        if progress is not None:
            progress(hi - lo)

    pending = None
    for i in range(plan.num_chunks):
        chunk = place(np.asarray(plan.chunk(i), plan.dtype), evaluator.alpha_sharding)
        result = evaluator.chunk(chunk, plan.order)  # dispatched asynchronously
        if pending is not None:
            collect(*pending)
        pending = (i, result)
    collect(*pending)
    return sink


def sweep(steered: Steered, alphas, *, concept_of=None, ce_target=None, weights=None, tokens="auto",
          measure: Measure | None = None, derivatives: int = 2, chunk_size: int | None = None,
          dtype=jnp.float32, devices=None, method: str = "auto", sink=None, progress=None):
    """Sweep a steered model over an alpha grid.

    Args:
      steered: the model's `alpha -> logits [M, V]` closure.
      alphas: 1-D grid of steering strengths (any length, any order: each alpha is evaluated on
        its own; processed in chunks).
      concept_of, ce_target, weights, tokens: what is measured (see `make_measure`), or
      measure: a Measure built already (then those four must be left out). tokens "auto"
        (default): every token of a vocabulary up to 1,024, else the 256 most likely at the
        grid's largest alpha (`kernel.grid.resolve_top_k`); None: every token.
      derivatives: 0, 1 or 2: how many derivatives in alpha to return.
      chunk_size: alphas per compiled call; by default sized to the problem and a multiple of
        the device count. Results do not depend on it.
      dtype: float32 (default) or float64 (requires jax_enable_x64).
      devices: devices to shard the alpha axis over; all visible devices by default.
      method: "auto", "affine", "taylor" or "jvp" (see `Evaluator`).
      sink: where the results go (see `ArraySink`); by default a dict in memory. A
        `runs.sweepfile.SweepFile` streams them to an .npz instead.
      progress: called with the number of alphas done after each chunk.
    Returns:
      dict of numpy arrays (the sink, when one is given): `alphas` [A], `tokens` [K],
      `concept_of` [V], `weights` [M], `probs_base` [M, V], and for each name of QUANTITIES
      its values `[A, ...]`, with `d_<name>` and `d2_<name>` for the derivatives asked for.
    """
    dtype = check_dtype(dtype)
    weights64 = None
    if measure is None:
        if concept_of is None:
            raise ValueError("sweep needs concept_of (or a measure)")
        tokens = auto_tokens(steered, alphas, tokens, dtype)
        logits0 = logits_at_zero(steered, dtype)  # once, for the CE target and the reference
        measure = make_measure(steered, concept_of=concept_of, ce_target=ce_target, weights=weights,
                               tokens=tokens, dtype=dtype, logits0=logits0)
        reference = reference_from_logits(logits0, measure)
        # The weights as given (float64), not as rounded into the measure's dtype.
        weights64 = (np.full(measure.num_rows, 1.0 / measure.num_rows) if weights is None
                     else np.asarray(weights, np.float64))
    elif any(x is not None for x in (concept_of, ce_target, weights)) or not (tokens is None or is_auto(tokens)):
        raise ValueError("give either measure or concept_of/ce_target/weights/tokens, not both")
    else:
        reference = None
    plan = plan_sweep(steered, alphas, measure, derivatives=derivatives, chunk_size=chunk_size, dtype=dtype,
                      devices=devices, method=method)
    evaluator = Evaluator(steered, measure, order=plan.order, method=plan.method, dtype=dtype,
                          devices=plan.devices, alphas_per_call=plan.chunk_size, reference=reference,
                          model_batch=plan.model_batch)
    out = drive(evaluator, plan, sink, progress)
    out.update(alphas=plan.alphas, tokens=np.asarray(measure.tokens_K).astype(np.int64),
               concept_of=np.argmax(np.asarray(measure.onehot_VxG), axis=1).astype(np.int64),
               weights=np.asarray(measure.weights_M, np.float64) if weights64 is None else weights64,
               probs_base=evaluator.probs_base())
    return dict(out) if sink is None else out

