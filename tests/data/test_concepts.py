"""The concept dataset (Assumption 1) and the steering sets of Eq. 3."""

import numpy as np
import pytest

from conftest import random_data_config
from ufmjax.data import ConceptData, DataConfig, check_steering_sets, reference_config, select_steering_sets


def test_reference_entropy_matches_paper():
    data = ConceptData(reference_config())
    # The paper (Sec. 2.1): every p(.|c) of the reference point has entropy 1.33178 nats.
    assert abs(data.entropy() - 1.33178) < 5e-6
    h = -np.sum(data.p_MxV * np.log(data.p_MxV), axis=1)
    np.testing.assert_allclose(h, h[0], rtol=1e-12)


def test_table_follows_assumption_1(rng):
    for _ in range(5):
        cfg = random_data_config(rng)
        data = ConceptData(cfg)
        np.testing.assert_allclose(data.p_MxV.sum(axis=1), 1.0, atol=1e-12)
        s = cfg.vocab // cfg.concepts
        for j, ctx in enumerate(data.contexts):
            g = data.context_concept[j]
            assert np.all(ctx // s == g), "a context holds tokens of one concept only"
            inside = data.concept_of == g
            np.testing.assert_allclose(data.p_MxV[j, inside], (1 - cfg.eps) * np.asarray(cfg.gamma)[inside])
            np.testing.assert_allclose(data.p_MxV[j, ~inside], cfg.eps / (cfg.concepts - 1) * np.asarray(cfg.omega)[~inside])
            assert np.all(data.a > data.b)
        # Contexts are distinct.
        assert len({tuple(c) for c in data.contexts}) == data.num_contexts


def test_sampled_sequences_follow_the_table():
    data = ConceptData(DataConfig(vocab=6, concepts=2, eps=0.2, gamma=(0.5, 0.3, 0.2, 0.6, 0.3, 0.1)))
    seqs = data.sample_sequences(np.random.default_rng(0), 40000)
    assert seqs.shape == (40000, data.config.context_len + 1)
    s = 3
    ctx_concept = seqs[:, 0] // s
    assert np.all(seqs[:, :-1] // s == ctx_concept[:, None])
    for g in range(2):
        nxt = seqs[ctx_concept == g, -1]
        freq = np.bincount(nxt, minlength=6) / nxt.size
        want = data.p_MxV[data.contexts_of(g)[0]]
        np.testing.assert_allclose(freq, want, atol=0.012)
    fixed = data.sample_sequences(np.random.default_rng(1), 500, fresh=False)
    contexts = {tuple(c) for c in data.contexts}
    assert all(tuple(c) in contexts for c in fixed[:, :-1])
    # Same seed, same samples.
    np.testing.assert_array_equal(data.sample_sequences(np.random.default_rng(5), 50),
                                  data.sample_sequences(np.random.default_rng(5), 50))


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab=10, concepts=3), "concepts .* must divide vocab"),
    (dict(eps=0.0), "eps"),
    (dict(eps=0.7), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(gamma=(0.5, 0.5, 0.5) * 3), "gamma must sum to 1"),
    (dict(gamma=(1.0, 0.0, 0.0) * 3), "gamma must be finite and strictly positive"),
    (dict(omega=(0.1, 0.2) * 4), "omega must have length"),
    (dict(eps=0.6, gamma=(0.98, 0.01, 0.01) * 3, omega=(0.01, 0.01, 0.98) * 3), r"a_z > b_z"),
    (dict(vocab=1), "vocab"),
    (dict(pi=(0.5, 0.5)), "pi"),
    (dict(contexts_per_concept=0), "contexts_per_concept"),
])
def test_bad_config_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConceptData(DataConfig(**kwargs))


def test_steering_sets():
    cc = ConceptData(DataConfig(vocab=12, concepts=3, contexts_per_concept=4)).context_concept
    P, N = select_steering_sets(cc, 1, "contrastive", negative_concept=2)
    assert np.all(cc[P] == 1) and np.all(cc[N] == 2) and P.size == N.size == 4
    P, N = select_steering_sets(cc, 0, "random", seed=3)
    assert np.all(cc[P] == 0) and np.all(cc[N] != 0) and P.size == N.size
    P2, N2 = select_steering_sets(cc, 0, "random", seed=3)
    np.testing.assert_array_equal(N, N2)
    with pytest.raises(ValueError, match="target"):
        select_steering_sets(cc, 3)
    with pytest.raises(ValueError, match="negative_concept"):
        select_steering_sets(cc, 1, negative_concept=1)
    with pytest.raises(ValueError, match="negatives"):
        select_steering_sets(cc, 1, negatives="opposite")
    with pytest.raises(ValueError, match="q must"):
        select_steering_sets(cc, 1, q=5)
    with pytest.raises(ValueError, match="overlap"):
        check_steering_sets([0, 1], [1, 2], 12)
    with pytest.raises(ValueError, match="same size"):
        check_steering_sets([0, 1], [2], 12)
    with pytest.raises(ValueError, match="non-empty"):
        check_steering_sets([], [], 12)
