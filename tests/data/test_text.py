"""The character corpus built from Python's bundled docs, its concepts and steering prompts."""

import numpy as np
import pytest

from ufmjax.data.text import (
    CLASSES,
    TextConfig,
    TextCorpus,
    bundled_text,
    char_class,
    concept_index,
    normalize_text,
    steering_prompts,
    to_lower,
    to_upper,
)


@pytest.fixture(scope="module")
def corpus():
    return TextCorpus()


def test_corpus_is_deterministic_and_ships_with_python(corpus):
    again = TextCorpus()
    assert again.sha256 == corpus.sha256 and again.chars == corpus.chars
    assert len(corpus.text) > 100_000, "pydoc_data.topics should hold several hundred thousand characters"
    assert corpus.text == normalize_text(bundled_text())


def test_vocabulary_is_printable_ascii_ordered_by_class(corpus):
    assert all(ch == "\n" or " " <= ch <= "~" for ch in corpus.chars)
    assert len(set(corpus.chars)) == corpus.vocab
    # Concepts are contiguous blocks, every class is present (the kernel needs them non-empty).
    assert np.all(np.diff(corpus.concept_of) >= 0)
    sizes = np.bincount(corpus.concept_of, minlength=len(CLASSES))
    assert np.all(sizes > 0)
    assert sizes[0] == 26 and sizes[1] == 26 and sizes[2] == 10
    assert [char_class(ch) for ch in corpus.chars] == corpus.concept_of.tolist()
    assert set(corpus.decode(np.flatnonzero(corpus.concept_of == 4))) == {" ", "\n"}


def test_encode_decode_roundtrip_and_split(corpus):
    ids = corpus.encode("Hello, World 42!\n")
    assert corpus.decode(ids) == "Hello, World 42!\n"
    assert corpus.train_ids.size + corpus.val_ids.size == len(corpus.text)
    assert abs(corpus.val_ids.size / len(corpus.text) - 0.1) < 1e-3
    # The validation split is the END of the text: no window straddles the two.
    assert corpus.decode(corpus.val_ids[:50]) == corpus.text[corpus.train_ids.size:corpus.train_ids.size + 50]
    with pytest.raises(ValueError, match="not in the corpus vocabulary"):
        corpus.encode("caf\u00e9")


def test_windows(corpus):
    rng = np.random.default_rng(0)
    w = corpus.sample_windows(rng, 8, 20)
    assert w.shape == (8, 20)
    text = corpus.decode(corpus.train_ids)
    for row in w:
        assert corpus.decode(row) in text
    ev = corpus.eval_windows(64)
    assert ev.shape == (corpus.val_ids.size // 64, 64)
    np.testing.assert_array_equal(ev.reshape(-1), corpus.val_ids[: ev.size])
    sp = corpus.spaced_windows(33, 5)
    assert sp.shape == (5, 33) and np.array_equal(sp[0], corpus.val_ids[:33])


def test_bigram_baseline_beats_unigram_and_is_a_distribution(corpus):
    logp = corpus.bigram_logp()
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-12)
    ev = corpus.eval_windows(64)
    assert corpus.bigram_ce(ev) < corpus.unigram_ce(ev) - 0.5


def test_case_flipped_pairs_are_exact_contrastive_pairs(corpus):
    P, N = steering_prompts(corpus, "uppercase", "contrastive", q=8, length=24, seed=3)
    assert P.shape == N.shape == (8, 24)
    for p, n in zip(P, N):
        sp, sn = corpus.decode(p), corpus.decode(n)
        assert sp == to_upper(sn) and sn == to_lower(sp)
        assert not any("a" <= ch <= "z" for ch in sp)
    P2, N2 = steering_prompts(corpus, 1, "contrastive", q=8, length=24, seed=3)
    np.testing.assert_array_equal(P2, N)
    np.testing.assert_array_equal(N2, P)
    _, Nr = steering_prompts(corpus, "uppercase", "random", q=8, length=24, seed=3)
    assert any(any("a" <= ch <= "z" for ch in corpus.decode(n)) for n in Nr), "random N is ordinary text"


def test_density_ranked_prompts_for_other_classes(corpus):
    P, N = steering_prompts(corpus, "digits", "contrastive", q=8, length=32, seed=0)
    dens = lambda X: (corpus.concept_of[X] == 2).mean(axis=1)
    assert dens(P).min() >= dens(N).max()
    overall = (corpus.concept_of[corpus.train_ids] == 2).mean()
    assert dens(P).mean() > 3 * overall


def test_errors(corpus):
    with pytest.raises(ValueError, match="target"):
        concept_index("vowels")
    with pytest.raises(ValueError, match="target"):
        concept_index(5)
    with pytest.raises(ValueError, match="negatives"):
        steering_prompts(corpus, 0, "opposite")
    with pytest.raises(ValueError, match="q must"):
        steering_prompts(corpus, 0, q=0)
    with pytest.raises(ValueError, match="val_frac"):
        TextConfig(val_frac=0.7)
    with pytest.raises(ValueError, match="source"):
        TextConfig(source="web")
    small = TextCorpus(TextConfig(max_chars=20_000))
    assert len(small.text) == 20_000
