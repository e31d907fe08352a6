"""Helpers at the bottom of the import graph, written once for the whole package.

Nothing here imports another ufmjax module: float casting of parameter trees, the float64
log-softmax of the host-side (numpy) checks, and the one rule for turning results into JSON.
JAX is imported inside the two functions that need it, so the JSON rule and the atomic file
writes built on it (`ufmjax.runs.io`) load with numpy alone.
"""

from __future__ import annotations

import math

import numpy as np


def cast_floats(tree, dtype):
    """Every floating leaf of `tree` as a jax array of `dtype`; integer leaves unchanged.

    16-bit leaves (a bfloat16 or float16 checkpoint's weights) are kept as they are when
    `dtype` is wider: they are how the weights are stored, and the model computes in `dtype`
    by promotion, so a float32 sweep of a bfloat16 model does not double its memory.
    """
    import jax
    import jax.numpy as jnp

    wide = jnp.dtype(dtype).itemsize > 2

    def one(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating) or (wide and x.dtype.itemsize == 2):
            return x
        return x.astype(dtype)

    return jax.tree.map(one, tree)


def float_dtype_of(tree):
    """The dtype of the first floating leaf of a pytree (float32 when there is none)."""
    import jax
    import jax.numpy as jnp

    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            return jnp.asarray(x).dtype
    return jnp.dtype(jnp.float32)


def log_softmax64(logits_xV, axis: int = -1) -> np.ndarray:
    """log softmax in float64 numpy, max-subtracted (the host-side reference of every check)."""
    x = np.asarray(logits_xV, dtype=np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def jsonable(x):
    """A value JSON can hold: numpy scalars and arrays as Python numbers and lists, tuples as
    lists, NaN as null and +-inf as the strings "inf" / "-inf" (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray) or (hasattr(x, "__array__") and hasattr(x, "shape")):  # numpy or jax
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def check_seed(seed, name: str = "seed") -> int:
    """A seed as an int, or ValueError naming it: numpy's generators take non-negative integers
    only, and their own error names neither the parameter nor the value."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


def lazy_exports(package: str, exports: dict, submodules=()):
    """A package's module `__getattr__` (PEP 562) that imports `package.<module>` on first use.

    `exports` maps each public name to the submodule defining it; `submodules` are names that
    are themselves submodules. A resolved name is cached in the package's namespace.
    """
    import importlib
    import sys

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
