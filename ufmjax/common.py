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

    target = jnp.dtype(dtype)
    wide = target.itemsize > 2

    def right(x):
        return x.dtype == target or not jnp.issubdtype(x.dtype, jnp.floating) or (wide and x.dtype.itemsize == 2)

    def one(x):
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        return x if right(x) else x.astype(dtype)  # already right: no conversion traced or dispatched

    # A tree that is right already comes back as it is: rebuilding a model's few thousand
    # containers took milliseconds per call, three times per sweep.
    if all(isinstance(x, jax.Array) and right(x) for x in jax.tree.leaves(tree)):
        return tree
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


COMPILE_CACHE_ENV = "UFMJAX_COMPILE_CACHE"
# Compilations shorter than this are not written to the persistent cache (they cost less than
# reading an entry back); the kernels of a GPT or pretrained sweep take 1.4-6.6 s.
CACHE_MIN_COMPILE_SECONDS = 0.2


def compile_cache_dir(path=None) -> str | None:
    """The persistent compilation cache's folder: `path`, else $UFMJAX_COMPILE_CACHE, else
    JAX's own $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/ufmjax/jax (~/.cache/ufmjax/jax);
    None when $UFMJAX_COMPILE_CACHE says off (or 0)."""
    import os

    setting = (str(path) if path is not None else os.environ.get(COMPILE_CACHE_ENV, "")).strip()
    if setting.lower() in ("0", "off", "no", "false", "none"):
        return None
    setting = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if setting:
        return setting
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ufmjax", "jax")


def enable_compile_cache(path=None) -> str | None:
    """Turn on JAX's persistent compilation cache at `compile_cache_dir(path)`: a second
    process compiling the same program (a second `ufmjax sweep` of the same shape) reads the
    executable back instead of compiling it. Returns the folder, or None when turned off.
    JAX keys every entry by the program, backend and versions, so a stale entry is never used;
    a folder that cannot be written only costs the compilations (JAX warns and goes on).
    Before JAX is imported this sets its environment variables (a JAX_... variable the user
    set wins), so a command refused by its arguments still answers without importing JAX."""
    import os
    import sys

    folder = compile_cache_dir(path)
    if folder is None:
        return None
    settings = {"jax_compilation_cache_dir": folder,
                "jax_persistent_cache_min_compile_time_secs": CACHE_MIN_COMPILE_SECONDS,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    for name, value in settings.items():
        if name != "jax_compilation_cache_dir" and name.upper() in os.environ:  # the user's JAX setting wins
            continue
        if "jax" in sys.modules:
            sys.modules["jax"].config.update(name, value)
        else:
            os.environ[name.upper()] = str(value)
    return folder


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
