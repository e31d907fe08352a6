"""Tracked tokens by default: every token of a small vocabulary, a bounded top-k of a large one."""

import numpy as np
import pytest

from ufmjax.kernel import sweep, top_tokens
from ufmjax.kernel.grid import ALL_TOKENS_UP_TO, DEFAULT_TOP_K, resolve_top_k, tracked_count
from ufmjax.steering import linear_steered


def test_resolve_top_k():
    assert resolve_top_k("auto", ALL_TOKENS_UP_TO) is None
    assert resolve_top_k("auto", ALL_TOKENS_UP_TO + 1) == DEFAULT_TOP_K
    assert resolve_top_k(7, 50257) == 7 and resolve_top_k(None, 50257) is None
    assert tracked_count(50257, "auto") == DEFAULT_TOP_K and tracked_count(94, "auto") == 94
    with pytest.raises(ValueError, match="top_k"):
        resolve_top_k("most", 10)


def _closure(V, M=3, seed=0):
    rng = np.random.default_rng(seed)
    return linear_steered(rng.normal(size=(M, V)).astype(np.float32), rng.normal(size=V).astype(np.float32))


def test_a_large_vocabulary_tracks_the_top_k_at_the_largest_alpha():
    V = 3000
    st = _closure(V)
    alphas = np.linspace(-2.0, 3.0, 9)
    concept_of = np.arange(V) % 4
    auto = sweep(st, alphas, concept_of=concept_of, derivatives=1)
    want = top_tokens(st, alphas, DEFAULT_TOP_K, "max")
    np.testing.assert_array_equal(auto["tokens"], want)
    assert auto["delta_p"].shape == (9, 3, DEFAULT_TOP_K)
    every = sweep(st, alphas, concept_of=concept_of, derivatives=1, tokens=None)
    assert every["delta_p"].shape == (9, 3, V)
    np.testing.assert_array_equal(auto["delta_p"], every["delta_p"][:, :, want])
    np.testing.assert_array_equal(auto["d_delta_p"], every["d_delta_p"][:, :, want])
    for key in ("delta_ce", "kl", "concept_prob"):  # what does not depend on the tracked tokens
        np.testing.assert_array_equal(auto[key], every[key])


def test_a_small_vocabulary_tracks_every_token():
    st = _closure(500)
    out = sweep(st, np.linspace(-1, 1, 5), concept_of=np.arange(500) % 2, derivatives=0)
    np.testing.assert_array_equal(out["tokens"], np.arange(500))


def test_a_measure_and_tokens_together_are_refused_by_name():
    from ufmjax.kernel import make_measure

    st = _closure(50)
    ms = make_measure(st, concept_of=np.arange(50) % 2)
    with pytest.raises(ValueError, match="give either measure"):
        sweep(st, np.linspace(0, 1, 3), measure=ms, tokens=np.array([0, 2]))
