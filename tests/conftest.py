import dataclasses
import gc
import os
import tempfile

import jax
import numpy as np
import pytest

from ufmjax.common import enable_compile_cache
from ufmjax.data import DataConfig, dirichlet_config, reference_config
from ufmjax.runs import load_run, train_ufm_run

# The tests' compilations go to a persistent cache of their own (not the user's ~/.cache), one
# per session and shared with the CLI's child processes: a program compiled by one test (or
# child) is read back by the next that builds the same one.
os.environ.setdefault("UFMJAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="ufmjax-tests-jax-cache-"))
enable_compile_cache()


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop every compiled program when a test module ends.

    Each XLA CPU executable holds a few memory mappings of its JIT code, and jit caches keep
    every executable alive: the whole suite compiled thousands of programs in one process and
    reached Linux's default limit of 65,530 mappings (vm.max_map_count) about 70% of the way
    through, where the next compilation aborted or segfaulted inside XLA (CI, stop 18; seen
    again here with /proc/PID/maps at 64,621 lines just before the abort). A module that needs
    a program again recompiles it, or reads it from the persistent cache above."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """Run the test body with float64 enabled, restoring the default afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The paper's reference UFM (V=9, G=3, eps=0.05), trained once per session."""
    out = tmp_path_factory.mktemp("runs") / "ufm_ref"
    train_ufm_run(out, reference_config(), progress=False)
    return load_run(out)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_data_config(rng, vocab=None, concepts=None) -> DataConfig:
    """A random Assumption-1 dataset: V, G, eps and Dirichlet in-concept profiles."""
    G = int(concepts or rng.integers(2, 5))
    V = int(vocab or G * rng.integers(2, 5))
    eps = float(rng.uniform(0.02, 0.5 * (G - 1) / G))
    cfg = dirichlet_config(V, G, eps, concentration=3.0, seed=int(rng.integers(1000)))
    return dataclasses.replace(cfg, context_len=3, contexts_per_concept=int(rng.integers(2, 5)))
