"""Several steering terms on a run, norm conventions, and bootstrap bands.

Shape legend: A = alpha points, k = steering terms, B = bootstrap resamples, D = residual width,
M = rows, V = vocabulary.

- `steer_terms(run, terms)`: a `MultiSteering` (k-term closure, alpha in R^k) for a UFM or GPT
  run, `steer_terms_hf` for a pretrained model; `multi_steering_sweep` sweeps it over [A, k]
  points into the k-term keys (`grad_<q>` [..., k], `hess_<q>` [..., k, k]).
- `normalized(st, norm)`: a single term's vector under a norm convention (raw, unit,
  residual, preserve; docs/theory.md "Several vectors") with the scalar kernel's keys.
- `bootstrap_bands(...)`: B resamples of P and N give B vectors, swept in ONE vectorised pass
  (the vectors a batch axis of the closure's parameters); every curve gets `<key>_lo` and
  `<key>_hi`, the chosen interval over the resamples. `bootstrap_optima`: the optimal alpha of
  every resample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ufmjax.kernel import check_points, multi_output_bytes, multi_sweep, multi_top_tokens
from ufmjax.kernel.grid import ProductGrid, resolve_top_k, tracked_count
from ufmjax.kernel.measure import output_shape
from ufmjax.kernel.multi import scalar_view
from ufmjax.models import gpt as gpt_model
from ufmjax.models import ufm as ufm_model
from ufmjax.models.hf import model as hf_model
from ufmjax.runs.progress import Progress
from ufmjax.runs.steer import Steering
from ufmjax.runs.sweepfile import OutputSize, check_output_size
from ufmjax.runs.terms import read_vector
from ufmjax.steering import NORMS, Steered, check_norm, scalar_of, scale_vector

DEFAULT_INTERVAL = 0.95


# ---------------------------------------------------------------- one term: norm conventions

def vector_key(st_steered: Steered, vector) -> str:
    """The top-level parameter of a scalar closure that holds its steering vector [D]."""
    v = np.asarray(vector, np.float64)
    for key, value in st_steered.params.items():
        if np.shape(value) == v.shape and np.allclose(np.asarray(value, np.float64), v, rtol=1e-6, atol=1e-6 * (1 + np.abs(v).max())):
            return key
    raise ValueError("the closure holds no parameter equal to its steering vector")


def with_vector(st: Steering, v_D) -> Steering:
    """The same steering with another vector (closure, `vector`): no model pass is redone."""
    key = vector_key(st.steered, st.vector)
    old = st.steered.params[key]
    params = {**st.steered.params, key: jnp.asarray(v_D, jnp.asarray(old).dtype)}
    return replace(st, steered=Steered(st.steered.fn, params), vector=np.asarray(v_D, np.float64))


def file_vector(st: Steering, vector) -> Steering:
    """`st` with a vector read from a file instead of Eq. 3's (None: st unchanged); P and N
    become empty (nothing to resample) and meta says where the vector came from."""
    if vector is None:
        return st
    v = np.asarray(vector, np.float64)
    if v.shape != st.vector.shape:
        raise ValueError(f"--vector: the vector has width {v.size}, the model's residual {st.vector.size}")
    if not np.all(np.isfinite(v)):
        raise ValueError("--vector: the vector holds NaN or inf")
    return replace(with_vector(st, v), P=np.zeros(0, np.int64), N=np.zeros(0, np.int64), features=None,
                   meta={**st.meta, "vector_source": "file", "q": 0})


def residual_norm(run, st: Steering) -> float:
    """The median residual norm |h| at the steered layer over the rows (the UFM: the contexts)."""
    if _is_ufm(run):
        return float(ufm_model.ufm_median_norm(run.model))
    if _is_gpt(run):
        return float(gpt_model.median_residual_norm(run.model, st.arrays["prompts"], st.meta["layer"]))
    rows = [r[r >= 0] for r in st.arrays["prompts"]]
    return float(hf_model.median_residual_norm(run.model, rows, st.meta["layer"]))


def normalized(run, st: Steering, norm: str) -> Steering:
    """A single term under a norm convention, keeping today's scalar closure and keys:

    - raw: v as Eq. 3 gives it (the paper);
    - unit: v / |v|, so alpha is the added norm;
    - residual: v / |v| times the median residual norm at the layer, so alpha = 1 adds a
      typical residual's norm;
    - preserve: raw v, with the steered residual rescaled to its unsteered norm at every
      steered position (the k = 1 multi closure, through `steering.scalar_of`).
    """
    norm = check_norm(norm)
    meta = {**st.meta, "normalize": norm, "vector_norm": float(np.linalg.norm(st.vector))}
    if norm == "raw":
        return replace(st, meta=meta)
    if norm == "preserve":
        ms = _multi_closure(run, st, np.asarray(st.vector)[None], [st.meta.get("layer")],
                            [st.meta.get("positions", "all")], preserve=True)
        return replace(st, steered=Steered(scalar_of(ms.fn), ms.params), meta=meta)
    rn = residual_norm(run, st) if norm == "residual" else None
    if rn is not None:
        meta["residual_norm"] = rn
    return replace(with_vector(st, scale_vector(st.vector, norm, rn)), meta=meta)


# ---------------------------------------------------------------- several terms

def _is_ufm(run) -> bool:
    """A UFM run (by its model: this module imports no run module, which import it)."""
    return isinstance(run.model, ufm_model.UFM)


def _is_gpt(run) -> bool:
    return isinstance(run.model, gpt_model.GPT)


def _multi_closure(run, st: Steering, vectors_kxD, layers, positions, preserve: bool) -> Steered:
    """The k-term closure of a run's rows (those of `st`)."""
    if _is_ufm(run):
        return ufm_model.ufm_multi_steered(run.model, vectors_kxD, preserve=preserve)
    if _is_gpt(run):
        return gpt_model.multi_steered_closure(run.model, st.arrays["prompts"], vectors_kxD, layers, positions,
                                               preserve=preserve, dtype=st.dtype)
    rows = [r[r >= 0] for r in st.arrays["prompts"]]
    return hf_model.multi_steered_closure(run.model, rows, vectors_kxD, layers, positions, preserve=preserve,
                                          dtype=st.dtype)


@dataclass(frozen=True)
class MultiSteering:
    """k steering terms on one run: h_l <- h_l + sum_i alpha_i v_i, and what is measured.

    Fields:
      steered: the `fn(params, alpha_k) -> logits [M, V]` closure.
      terms: the k TermSpecs as given; singles: each term's own `Steering` (vector, P, N, rows).
      vectors: [k, D] the vectors as added (after the norm convention).
      layers, positions: of each term; norm: the convention; targets: each term's target
        concept (None for a file vector) and target_weights their weights in the optimiser.
      concept_of, ce_target, weights, dtype, meta, arrays: as for `Steering` (shared rows).
    """

    steered: Steered
    terms: tuple
    singles: tuple
    vectors: np.ndarray
    layers: tuple
    positions: tuple
    norm: str
    targets: tuple
    target_weights: tuple
    concept_of: np.ndarray
    ce_target: Any
    weights: Any
    dtype: Any
    meta: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    run: Any = None

    @property
    def k(self) -> int:
        return len(self.terms)

    def view(self) -> Steered:
        return scalar_view(self.steered, self.k)

    def output_size(self, *, top_k=None, top_k_at="max", derivatives: int = 2, batch: int = 1) -> OutputSize:
        rows, vocab = output_shape(self.view(), self.dtype)
        per_alpha, fixed = multi_output_bytes(k=self.k, rows=rows, vocab=vocab,
                                              concepts=int(np.max(self.concept_of)) + 1,
                                              tokens=tracked_count(vocab, top_k, top_k_at), derivatives=derivatives,
                                              dtype=self.dtype, batch=batch)
        return OutputSize(per_alpha, fixed + self.vectors.nbytes * (1 + (batch > 1) * batch))

    def sweep(self, points, *, tokens=None, derivatives: int = 2, chunk_size=None, sink=None, progress=None):
        out = multi_sweep(self.steered, points, k=self.k, concept_of=self.concept_of, ce_target=self.ce_target,
                          weights=self.weights, tokens=tokens, derivatives=derivatives, chunk_size=chunk_size,
                          dtype=self.dtype, sink=sink, progress=progress)
        out.update(P=padded_sets([s.P for s in self.singles]), N=padded_sets([s.N for s in self.singles]),
                   steering_vectors=np.asarray(self.vectors, np.float64),
                   term_layers=np.asarray([-1 if l is None else l for l in self.layers], np.int64),
                   term_targets=np.asarray([-1 if t is None else t for t in self.targets], np.int64))
        return out

    def problem(self, *, contexts=None):
        """The optimisation problem over alpha in R^k toward the terms' weighted targets."""
        from ufmjax.optimize import MultiProblem

        targets = [(t, w) for t, w in zip(self.targets, self.target_weights) if t is not None]
        if not targets:
            raise ValueError("--vector: optimising needs a target: give target=K on at least one term")
        return MultiProblem(self.steered, k=self.k, concept_of=self.concept_of, targets=targets,
                            ce_target=self.ce_target, weights=self.weights, contexts=contexts,
                            dtype=jnp.dtype(self.dtype))

    def with_vectors(self, vectors_kxD) -> Steered:
        """The closure for other vectors (a bootstrap resample), on the same rows."""
        return _multi_closure(self.run, self.singles[0], np.asarray(vectors_kxD), self.layers, self.positions,
                              self.norm == "preserve")


def padded_sets(sets) -> np.ndarray:
    """P or N of every term as one [k, q] int64 array, -1 after a shorter set (file vectors: none)."""
    q = max([len(s) for s in sets] + [0])
    out = np.full((len(sets), q), -1, np.int64)
    for i, s in enumerate(sets):
        out[i, :len(s)] = np.asarray(s, np.int64)
    return out


def steer_terms(run, terms, *, norm: str = "raw", q=None, seed: int = 0, ce_against: str = "data",
                dtype=jnp.float32) -> MultiSteering:
    """Build k terms on a UFM or GPT run: each term's vector by Eq. 3 toward its target (or
    from its file), at its layer and positions; the rows are the run's sweep rows."""
    norm = check_norm(norm)
    terms = tuple(terms)
    if not terms:
        raise ValueError("--vector: give at least one steering term")
    is_gpt = _is_gpt(run)
    singles, targets = [], []
    first_target = next((t.target for t in terms if t.target is not None), 0)
    for i, t in enumerate(terms):
        if not is_gpt and (t.layer is not None or t.positions is not None):
            raise ValueError(f"--vector {i + 1}: layer and positions apply to GPT runs (a UFM has no layers)")
        if is_gpt and t.layer is not None and not 0 <= t.layer <= run.model.config.layers:
            raise ValueError(f"--vector {i + 1}: layer {t.layer} is outside [0, {run.model.config.layers}]")
        kw = dict(negative_concept=t.negative, q=q, seed=seed, ce_against=ce_against, dtype=dtype)
        if is_gpt:
            kw.update(layer=t.layer, positions=t.positions)
        st = run.steer(t.target if t.target is not None else first_target, t.negatives or "contrastive", **kw)
        if t.file is not None:
            v = read_vector(t.file)
            width = st.vector.shape[0]
            if v.shape != (width,):
                raise ValueError(f"--vector {i + 1}: {t.file} has width {v.shape[0]}, the model's residual {width}")
            st = file_vector(st, v)
        st = normalized(run, st, "raw" if norm == "preserve" else norm)
        singles.append(st)
        targets.append(None if t.target is None else st.target)
    return _assemble(run, terms, singles, targets, norm, dtype)


def steer_terms_hf(run, inputs, terms, *, norm: str = "raw", dtype=jnp.float32) -> MultiSteering:
    """k terms on a pretrained model: each a difference of means of the --positive/--negative
    prompts (or --concept's) at its own layer, or a file vector; the concept is the inputs'."""
    norm = check_norm(norm)
    singles = []
    for i, t in enumerate(terms):
        if t.target is not None or t.negatives is not None or t.negative is not None:
            raise ValueError(f"--vector {i + 1}: target/negatives apply to run folders; a pretrained model's "
                             f"term is file=V.npy or its layer=L (the --positive/--negative difference of means)")
        if t.layer is not None and not 0 <= t.layer <= run.spec.layers:
            raise ValueError(f"--vector {i + 1}: layer {t.layer} is outside [0, {run.spec.layers}]")
        vec = None if t.file is None else read_vector(t.file)
        if vec is not None and vec.shape != (run.spec.width,):
            raise ValueError(f"--vector {i + 1}: {t.file} has width {vec.shape[0]}, the model's residual "
                             f"{run.spec.width}")
        if vec is None and (inputs.positive is None or inputs.negative is None):
            raise ValueError(f"--vector {i + 1}: give file=V.npy, or --positive/--negative (or --concept) prompts")
        st = run.steer(prompts=inputs.prompts, positive=inputs.positive, negative=inputs.negative,
                       concept_words=inputs.words, concept_regex=inputs.regex, concept_name=inputs.name, vector=vec,
                       layer=t.layer, positions=t.positions or "all", dtype=dtype)
        singles.append(normalized(run, st, "raw" if norm == "preserve" else norm))
    return _assemble(run, tuple(terms), singles, [singles[0].target] * len(singles), norm, dtype)


def _assemble(run, terms, singles, targets, norm, dtype) -> MultiSteering:
    first = singles[0]
    vectors = np.stack([s.vector for s in singles])
    layers = tuple(s.meta.get("layer") for s in singles)
    positions = tuple(s.meta.get("positions", "all") for s in singles)
    steered = _multi_closure(run, first, vectors, layers, positions, norm == "preserve")
    meta = {k: v for k, v in first.meta.items() if k not in ("target", "target_name", "layer", "positions", "negatives",
                                                            "negative_concept", "q", "vector_norm", "residual_norm")}
    meta.update(k=len(terms), normalize=norm, terms=[t.describe() for t in terms],
                term_layers=list(layers), term_positions=list(positions), targets=[t for t in targets],
                target_names=[s.meta.get("target_name") for s in singles],
                vector_norms=[float(np.linalg.norm(s.vector)) for s in singles])
    if norm == "residual":
        meta["residual_norms"] = [s.meta["residual_norm"] for s in singles]
    return MultiSteering(steered, tuple(terms), tuple(singles), vectors, layers, positions, norm, tuple(targets),
                         tuple(t.weight for t in terms), first.concept_of, first.ce_target, first.weights, first.dtype,
                         meta, dict(first.arrays), run)


def multi_steering_sweep(ms: MultiSteering, points, *, top_k=None, top_k_at: str = "max", derivatives: int = 2,
                         chunk_size=None, max_output=None, sink=None, progress: bool = False):
    """Sweep k terms over [A, k] points (a `ProductGrid`, built once its size is accepted).
    Returns (points [A, k], arrays)."""
    num = points.size if isinstance(points, ProductGrid) else len(check_points(points, ms.k))
    size = ms.output_size(top_k=top_k, top_k_at=top_k_at, derivatives=derivatives)
    check_output_size(size.total(num), max_output, num)
    shape = list(points.shape) if isinstance(points, ProductGrid) else [num]
    points = check_points(points.values() if isinstance(points, ProductGrid) else points, ms.k)
    top_k = resolve_top_k(top_k, output_shape(ms.view(), ms.dtype)[1])
    tokens = None if top_k is None else multi_top_tokens(ms.steered, points, top_k, k=ms.k, at=top_k_at)
    with Progress(len(points), f"sweep {ms.k} terms", enabled=progress) as bar:
        arrays = ms.sweep(points, tokens=tokens, derivatives=derivatives, chunk_size=chunk_size, sink=sink,
                          progress=bar.update)
    arrays.update(ms.arrays)
    arrays["alphas_shape"] = np.asarray(shape, np.int64)
    return points, arrays


# ---------------------------------------------------------------- bootstrap

def bootstrap_sets(sizes, B: int, seed: int = 0):
    """B resamples (with replacement) of index sets of the given sizes: [(idx_P, idx_N), ...]."""
    check_resamples(B)
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, n, size=n) if n else np.zeros(0, np.int64) for n in sizes) for _ in range(B)]


def check_resamples(B) -> int:
    if isinstance(B, bool) or not isinstance(B, (int, np.integer)) or B < 1:
        raise ValueError(f"--bootstrap B must be an integer >= 1 (resamples of P and N), got {B!r}")
    return int(B)


def _resampled_vector(run, st: Steering, norm: str, idx) -> np.ndarray:
    """Eq. 3 on one resample of P and N, under the steering's norm convention."""
    if st.features is None:  # a file vector has no P and N: it stays as it is in every resample
        return np.asarray(st.vector, np.float64)
    fP, fN = st.features
    v = fP[idx[0]].mean(axis=0) - fN[idx[1]].mean(axis=0)
    if norm in ("unit", "residual"):
        return scale_vector(v, norm, st.meta.get("residual_norm"))
    return v


@functools.lru_cache(maxsize=64)
def _as_multi(fn):
    """A scalar closure as a k = 1 multi closure (the bootstrap's batched kernel)."""
    def multi(params, alpha_k):
        return fn(params, alpha_k[0])
    return multi


def _band_key(name: str, k1: bool) -> tuple[str, Any]:
    """(the sweep key a bootstrap output fills, how to reduce its direction axes) for k = 1,
    where `grad_<q>` [..., 1] is today's `d_<q>` and `hess_<q>` [..., 1, 1] its `d2_<q>`."""
    if not k1:
        return name, None
    if name.startswith("grad_"):
        return "d_" + name[5:], (0,)
    if name.startswith("hess_"):
        return "d2_" + name[5:], (0, 0)
    return name, None


class _BandSink(dict):
    """A kernel sink reducing each chunk's [C, B, ...] outputs to their interval over B, into
    `<key>_lo` / `<key>_hi` of the outer sink (memory: the chunk, never the B x grid)."""

    def __init__(self, outer, interval: float, k1: bool):
        super().__init__()
        self.outer, self.k1 = outer, k1
        self.q = ((1.0 - interval) / 2.0, 1.0 - (1.0 - interval) / 2.0)

    def allocate(self, name, shape, dtype):
        key, index = _band_key(name, self.k1)
        inner = shape[2:] if index is None else shape[2:len(shape) - len(index)]
        lo = self.outer.allocate(key + "_lo", (shape[0],) + tuple(inner), dtype)
        hi = self.outer.allocate(key + "_hi", (shape[0],) + tuple(inner), dtype)
        return _BandSlot(lo, hi, self.q, index)


class _BandSlot:
    def __init__(self, lo, hi, q, index):
        self.lo, self.hi, self.q, self.index = lo, hi, q, index

    def __setitem__(self, sl, values) -> None:
        values = np.asarray(values)
        if self.index is not None:
            values = values[(Ellipsis,) + self.index]
        lo, hi = np.quantile(values, self.q, axis=1)
        self.lo[sl] = lo.astype(values.dtype)
        self.hi[sl] = hi.astype(values.dtype)


def _sink_for(arrays):
    """Allocate in `arrays` if it is a streaming sink, else as plain numpy arrays."""
    if hasattr(arrays, "allocate"):
        return arrays

    class _Plain:
        def allocate(self, name, shape, dtype):
            arrays[name] = np.empty(shape, dtype)
            return arrays[name]

    return _Plain()


def bootstrap_bands(run, st, points, B: int, *, seed: int = 0, interval: float = DEFAULT_INTERVAL, resamples=None,
                    tokens=None, derivatives: int = 2, chunk_size=None, out=None, progress: bool = False) -> dict:
    """Bootstrap bands of every curve: B resamples of P and N, swept in one vectorised pass.

    Args:
      run: the run the steering was built on.
      st: a `Steering` (one term: bands of today's keys) or a `MultiSteering` (k terms).
      points: the alphas [A] (one term) or points [A, k] of the main sweep.
      B: resamples; seed: their generator; resamples: explicit [(idx_P, idx_N) per term
        ...] lists instead (B = len(resamples)); with the full sets every band is the curve.
      interval: the central interval reported, e.g. 0.95 -> the 2.5th and 97.5th percentiles.
      tokens, derivatives, chunk_size: as for the main sweep (the same tracked tokens).
      out: the sink or dict the bands go into (a new dict by default).
    Returns:
      `out` with `<key>_lo`, `<key>_hi` for every kernel curve, `bootstrap_vectors` [B, (k,) D],
      `bootstrap_interval` [2] (the percentiles).
    """
    if not 0.0 < interval < 1.0:
        raise ValueError(f"interval must be in (0, 1), got {interval!r}")
    out = {} if out is None else out
    multi = isinstance(st, MultiSteering)
    singles = st.singles if multi else (st,)
    if resamples is None:
        B = check_resamples(B)
        draws = [bootstrap_sets([len(s.P), len(s.N)], B, seed + 7919 * i) for i, s in enumerate(singles)]
        resamples = [[d[b] for d in draws] for b in range(B)]
    else:
        resamples = [r if multi else [r] for r in resamples]
        B = check_resamples(len(resamples))
    norm = st.norm if multi else st.meta.get("normalize", "raw")
    if all(s.features is None for s in singles):
        raise ValueError("--bootstrap resamples the steering sets P and N: a file vector has none")
    vecs = np.stack([np.stack([_resampled_vector(run, s, norm, r[i]) for i, s in enumerate(singles)])
                     for r in resamples])                                  # [B, k, D]
    if multi:
        build, k = st.with_vectors, st.k
    elif norm == "preserve":
        layer, positions = st.meta.get("layer"), st.meta.get("positions", "all")
        build, k = (lambda v_kxD: _multi_closure(run, st, v_kxD, [layer], [positions], preserve=True)), 1
    else:
        build, k = (lambda v_kxD: Steered(_as_multi(st.steered.fn), with_vector(st, v_kxD[0]).steered.params)), 1
    steered, keys = batched_closure(build, vecs)
    pts = check_points(np.asarray(points, np.float64).reshape(len(points), -1), k)
    sink = _BandSink(_sink_for(out), interval, k1=not multi)
    with Progress(len(pts), f"bootstrap ({B} resamples)", enabled=progress) as bar:
        multi_sweep(steered, pts, k=k, concept_of=st.concept_of, ce_target=st.ce_target, weights=st.weights,
                    tokens=tokens, derivatives=derivatives, chunk_size=chunk_size, dtype=st.dtype, batched=keys,
                    sink=sink, progress=bar.update)
    out["bootstrap_vectors"] = vecs if multi else vecs[:, 0]
    out["bootstrap_interval"] = 100.0 * np.asarray(sink.q)
    return out


def batched_closure(build, vecs_Bxkxd):
    """One closure whose vector-dependent parameters carry a leading axis of B resamples.

    `build(v_kxD)` makes the closure for one set of vectors; the parameters that change when
    the vectors do (found by building once more at twice the first vectors: the prefix
    below the layer, the key/value cache, the model's weights do not) are stacked over the
    resamples, the rest shared, so the kernel vmaps over exactly those (`batched`)."""
    built = [build(v) for v in vecs_Bxkxd]
    probe = build(2.0 * vecs_Bxkxd[0] + 1.0)
    keys = tuple(key for key in built[0].params
                 if not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                            zip(jax.tree.leaves(built[0].params[key]), jax.tree.leaves(probe.params[key]))))
    if not keys:
        raise ValueError("the closure has no parameter that depends on its steering vectors")
    params = {key: (jax.tree.map(lambda *xs: jnp.stack(xs), *[b.params[key] for b in built]) if key in keys
                    else value) for key, value in built[0].params.items()}
    return Steered(built[0].fn, params), keys


def bootstrap_optima(run, st: Steering, objective, B: int, *, seed: int = 0, interval: float = DEFAULT_INTERVAL,
                     **optimize_kw) -> dict:
    """The optimal alpha of each of B resamples of P and N (one term; the same compiled
    evaluator serves them all): alphas [B], their interval and spread."""
    from ufmjax.optimize import optimize

    B = check_resamples(B)
    norm = st.meta.get("normalize", "raw")
    if norm == "preserve":
        raise ValueError("--bootstrap with --normalize preserve is not supported by optimize yet")
    sets = bootstrap_sets([len(st.P), len(st.N)], B, seed)
    alphas, converged = [], []
    for idx in sets:
        res = optimize(with_vector(st, _resampled_vector(run, st, norm, idx)).problem(), objective, **optimize_kw)
        alphas.append(float(res.alpha))
        converged.append(bool(res.converged))
    a = np.asarray(alphas)
    q = ((1.0 - interval) / 2.0, 1.0 - (1.0 - interval) / 2.0)
    lo, hi = np.quantile(a, q)
    return {"resamples": B, "alphas": a.tolist(), "lo": float(lo), "hi": float(hi), "std": float(a.std(ddof=1)) if B > 1
            else 0.0, "interval": [100 * q[0], 100 * q[1]], "converged": converged}


__all__ = ["NORMS", "MultiSteering", "add_bands", "bootstrap_bands", "bootstrap_optima", "bootstrap_sets", "multi_steering_sweep",
           "normalized", "steer_terms", "steer_terms_hf", "with_vector"]


def add_bands(arrays, meta: dict, run, st, alphas, B: int | None, *, seed: int = 0, top_k=None,
              derivatives: int = 2, chunk_size=None, progress: bool = False) -> None:
    """`bootstrap_bands` of a finished sweep into its arrays (or sink) and meta; B None: none.
    The resamples track the main sweep's tokens, so every band lies beside its curve."""
    if B is None:
        return
    # The main sweep's tracked tokens (every token, when it tracked all: the same thing).
    tokens = np.asarray(arrays["tokens"])
    # B vectors per alpha: a chunk of 1/B the alphas holds as much as the main sweep's.
    chunk = None if chunk_size is None else max(1, int(chunk_size) // int(B))
    bootstrap_bands(run, st, alphas, B, seed=seed, tokens=tokens, derivatives=derivatives, chunk_size=chunk,
                    out=arrays, progress=progress)
    meta["bootstrap"] = {"resamples": int(B), "seed": int(seed), "interval": DEFAULT_INTERVAL,
                         "percentiles": [float(x) for x in np.asarray(arrays["bootstrap_interval"])]}
