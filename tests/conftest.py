import jax
import numpy as np
import pytest

from ufmjax.data import DataConfig, reference_config
from ufmjax.runs import load_run, train_ufm_run


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
    s = int(rng.integers(2, 5))
    V = int(vocab or G * s)
    s = V // G
    eps = float(rng.uniform(0.02, 0.5 * (G - 1) / G))
    for _ in range(100):  # redraw until Assumption 1 (a_z > b_z) holds
        gamma = np.concatenate([rng.dirichlet(np.full(s, 3.0)) for _ in range(G)])
        omega = np.concatenate([rng.dirichlet(np.full(s, 3.0)) for _ in range(G)])
        if np.all((1 - eps) * gamma > eps / (G - 1) * omega):
            break
    else:
        gamma = omega = np.full(V, 1.0 / s)
    return DataConfig(vocab=V, concepts=G, eps=eps, gamma=tuple(gamma), omega=tuple(omega),
                      context_len=3, contexts_per_concept=int(rng.integers(2, 5)), seed=int(rng.integers(1000)))
