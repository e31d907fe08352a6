"""Concept token sets (word prefixes, regular expressions) and the concepts shipped with ufmjax."""

import numpy as np
import pytest

from ufmjax.data.concept_tokens import (
    CONCEPT_NAMES,
    concept_files,
    concept_of_tokens,
    heldout_text_path,
    read_regex,
    regex_concept,
    word_concept,
)
from ufmjax.data.prompts import InputError, read_text, read_texts, read_words

TOKENS = ["<s>", " happ", "h", " ha", "iness", " Joy", "JOY", " joyful", " the", "", "  ", " Hap", " happyness"]


def test_prefix_rule_four_characters_and_case_folding():
    mask = word_concept(TOKENS, ["happy", "Joy "])
    picked = [t for t, m in zip(TOKENS, mask) if m]
    # " happ" starts "happy" (4 characters, 80% of it); "h", " ha" and " Hap" are too short to
    # count; " joyful" is longer than any listed word, " happyness" is not a prefix of one.
    assert picked == [" happ", " Joy", "JOY"]
    assert mask.dtype == bool and mask.shape == (len(TOKENS),)


def test_short_words_match_exactly():
    mask = word_concept(["a", " ok", "o", " okay"], ["ok"])
    assert mask.tolist() == [False, True, False, False]


def test_word_concept_errors():
    with pytest.raises(InputError, match=r"^--concept-words: no token of the vocabulary matches any of the 4 words "
                                         r"\(e\.g\. zebra, quokka, okapi\)$"):
        word_concept(TOKENS, ["Zebra", "quokka", "okapi", "zebra ", "tapir"])  # 4 once case-folded
    with pytest.raises(InputError, match=r"^--words \(w\.txt\): no token"):
        word_concept(TOKENS, ["zebra"], "--words", source="w.txt")
    with pytest.raises(InputError, match=r"no word given"):
        word_concept(TOKENS, ["  "])


def test_regex_full_match_on_stripped_token():
    mask = regex_concept(TOKENS, r"[A-Z]{2,}")
    assert [t for t, m in zip(TOKENS, mask) if m] == ["JOY"]
    # Full match: "ha" matches inside " happ" but not the whole token.
    assert regex_concept(TOKENS, r"ha").tolist() == [t == " ha" for t in TOKENS]
    # Case-sensitive unless the pattern says otherwise.
    assert regex_concept(TOKENS, r"(?i)joy").sum() == 2
    # Whitespace-only tokens are in no concept, even for a pattern matching the empty string.
    assert not regex_concept(TOKENS, r".*")[[9, 10]].any()


def test_regex_errors():
    with pytest.raises(InputError, match=r"^--concept-regex: invalid regular expression '\[A-Z' "):
        regex_concept(TOKENS, "[A-Z")
    with pytest.raises(InputError, match=r"^--concept-regex: no token of the vocabulary fully matches '\[0-9\]\+'$"):
        regex_concept(TOKENS, "[0-9]+")


def test_read_regex(tmp_path):
    f = tmp_path / "regex.txt"
    f.write_text("# tokens in capitals\n[A-Z]{2,}\n\n")
    assert read_regex(f) == "[A-Z]{2,}"
    f.write_text("a\nb\n")
    with pytest.raises(InputError, match=r"exactly one regular expression, found 2"):
        read_regex(f)
    f.write_text("(\n")
    with pytest.raises(InputError, match=r"^--concept-regex: .*regex\.txt holds an invalid regular expression"):
        read_regex(f)


def test_concept_of_tokens():
    c = concept_of_tokens(np.array([False, True, True, False]))
    assert c.tolist() == [0, 1, 1, 0] and np.issubdtype(c.dtype, np.integer)
    with pytest.raises(InputError, match="no token"):
        concept_of_tokens(np.zeros(3, bool))
    with pytest.raises(InputError, match="every token"):
        concept_of_tokens(np.ones(3, bool))
    with pytest.raises(ValueError, match="bool"):
        concept_of_tokens(np.array([0, 1]))


def test_unknown_concept_names_the_choices():
    with pytest.raises(InputError, match=r"^--concept: unknown concept 'anger'; the shipped concepts are joy, evil, uppercase$"):
        concept_files("anger")


@pytest.mark.parametrize("name", CONCEPT_NAMES)
def test_shipped_concepts_load(name):
    files = concept_files(name)
    assert set(files) == {"positive", "negative", "prompts", "regex" if name == "uppercase" else "words"}
    counts = {k: len(read_texts(files[k], f"--{k}")) for k in ("positive", "negative", "prompts")}
    assert counts == {"positive": 40, "negative": 40, "prompts": 20}
    for path in files.values():
        assert path.read_bytes().isascii(), path
        assert path.read_bytes().count(b"\n") == len(path.read_bytes().splitlines()), f"{path}: ends without newline"
    pos, neg = read_texts(files["positive"], "--positive"), read_texts(files["negative"], "--negative")
    assert len(set(pos)) == 40 and len(set(neg)) == 40 and not set(pos) & set(neg)
    if name == "uppercase":
        assert all(t == t.upper() for t in pos) and neg == [t.lower() for t in pos]
        assert read_regex(files["regex"]) == "[A-Z]{2,}"
    else:
        assert 50 <= len(read_words(files["words"], "--concept-words")) <= 80


def test_heldout_text():
    path = heldout_text_path()
    text = read_text(path, "--heldout")
    assert path.read_bytes().isascii()
    assert 50 <= len([line for line in text.splitlines() if line.strip()]) <= 80


def _bpe_token_strs(texts, vocab_size=1500):
    """Each token's string of a byte-level BPE trained on texts (as GPT-2-style tokenizers decode them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    return tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)


def test_every_shipped_token_set_matches_a_bpe_vocabulary():
    texts = [read_text(heldout_text_path(), "--heldout")]
    for name in CONCEPT_NAMES:
        texts += [read_text(p, name) for p in concept_files(name).values()]
    token_strs = _bpe_token_strs(texts)
    for name in CONCEPT_NAMES:
        files = concept_files(name)
        if "words" in files:
            mask = word_concept(token_strs, read_words(files["words"], "--concept-words"))
        else:
            mask = regex_concept(token_strs, read_regex(files["regex"]))
        c = concept_of_tokens(mask)
        assert 0 < c.sum() < c.size / 2, (name, c.sum())
