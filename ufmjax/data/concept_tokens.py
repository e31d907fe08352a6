"""Concept token sets of a pretrained model's vocabulary, and the concepts shipped with ufmjax.

Shape legend: V = tokens of the vocabulary (the model's embedding rows).

The theory measures the probability mass a steered model puts on a concept, a set of tokens
(docs/theory.md, Sec. 2). For a pretrained tokenizer the concept is chosen by the researcher
in one of two ways, both applied to each token's string decoded alone:

- a word list (`word_concept`): token j is in the concept when its string, stripped and
  case-folded, is non-empty and either equals a listed word or is a prefix of one at least
  `MIN_PREFIX` = 4 characters and `PREFIX_SHARE` = 60% of the word long. Sub-word tokenizers
  split a rare word into pieces, and the first piece (" happ" of "happy") is the token the
  model must emit to start the word, so prefixes count. Short prefixes do not: "del", "dev"
  or "sin" (of delight, devil, sinister) are also the first pieces of delete, device and
  since, and would put ordinary words in the concept. A listed phrase is matched as one
  string, so its first word's prefixes count too; prefer single words.
- a regular expression (`regex_concept`): token j is in the concept when the pattern fully
  matches its string with surrounding whitespace stripped (`re.fullmatch`), tokens that are
  only whitespace excluded. Matching is case-sensitive; start the pattern with `(?i)` for
  case-insensitive matching.

The kernel then sees two concepts (`concept_of_tokens`): 0 = the rest of the vocabulary,
1 = the target concept.

Shipped concepts (`CONCEPT_NAMES`, files under `hf_concepts/<name>/`): `positive.txt` and
`negative.txt` (40 matched sentences with and without the concept, for the difference of
means), `prompts.txt` (20 neutral sentence beginnings to evaluate next-token probabilities
on), and `words.txt` or `regex.txt` (the token set); `hf_concepts/heldout.txt` is shared
held-out prose for the cross-entropy cost. All were written for ufmjax.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ufmjax.data.prompts import InputError, read_text

MIN_PREFIX = 4
PREFIX_SHARE = 0.6
CONCEPT_NAMES = ("joy", "evil", "uppercase")
CONCEPTS_DIR = Path(__file__).parent / "hf_concepts"


def _where(name: str, source) -> str:
    return f"{name} ({source})" if source is not None else name


def word_concept(token_strs: list[str], words, name: str = "--concept-words", *, source=None) -> np.ndarray:
    """[V] bool: the tokens whose string is a listed word or a long enough prefix of one (>= 4
    characters and >= 60% of the word).

    Args:
      token_strs: [V] each token's string decoded alone.
      words: the words (stripped and case-folded here, as `read_words` already does).
      name: the parameter the words came from, the start of every error message.
      source: the file they were read from, named in errors when given.
    """
    where = _where(name, source)
    words = list(dict.fromkeys(w.strip().casefold() for w in words if w.strip()))
    if not words:
        raise InputError(f"{where}: no word given")
    exact = set(words)
    prefixes = {w[:k] for w in words for k in range(max(MIN_PREFIX, math.ceil(PREFIX_SHARE * len(w))), len(w) + 1)}
    mask = np.zeros(len(token_strs), dtype=bool)
    for j, s in enumerate(token_strs):
        t = s.strip().casefold()
        mask[j] = bool(t) and (t in exact or t in prefixes)
    if not mask.any():
        examples = ", ".join(words[:3])
        raise InputError(f"{where}: no token of the vocabulary matches any of the {len(words)} words "
                         f"(e.g. {examples})")
    return mask


def regex_concept(token_strs: list[str], pattern: str, name: str = "--concept-regex", *, source=None) -> np.ndarray:
    """[V] bool: the tokens whose whitespace-stripped, non-empty string fully matches `pattern`.

    Case-sensitive (`re.fullmatch`); start the pattern with `(?i)` to ignore case.
    """
    where = _where(name, source)
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise InputError(f"{where}: invalid regular expression {pattern!r} ({e})") from None
    mask = np.zeros(len(token_strs), dtype=bool)
    for j, s in enumerate(token_strs):
        t = s.strip()
        mask[j] = bool(t) and compiled.fullmatch(t) is not None
    if not mask.any():
        raise InputError(f"{where}: no token of the vocabulary fully matches {pattern!r}")
    return mask


def read_regex(path, name: str = "--concept-regex") -> str:
    """The one pattern of a regex file (blank lines and lines starting with `#` skipped), compiled once to check it."""
    lines = [t.strip() for t in read_text(path, name).split("\n")]
    lines = [t for t in lines if t and not t.startswith("#")]
    if len(lines) != 1:
        raise InputError(f"{name}: {path} must hold exactly one regular expression, found {len(lines)} lines")
    try:
        re.compile(lines[0])
    except re.error as e:
        raise InputError(f"{name}: {path} holds an invalid regular expression {lines[0]!r} ({e})") from None
    return lines[0]


def concept_of_tokens(mask) -> np.ndarray:
    """[V] int: 1 for the tokens of the concept, 0 for the rest (the kernel's `concept_of`, 2 concepts)."""
    mask = np.asarray(mask)
    if mask.ndim != 1 or mask.dtype != bool:
        raise ValueError(f"mask must be a [V] bool array, got shape {mask.shape} dtype {mask.dtype}")
    if not mask.any():
        raise InputError("the concept holds no token of the vocabulary")
    if mask.all():
        raise InputError("the concept holds every token of the vocabulary, leaving none outside it")
    return mask.astype(np.int64)


def concept_files(name: str) -> dict[str, Path]:
    """The files of a shipped concept: positive, negative, prompts, and words or regex."""
    if name not in CONCEPT_NAMES:
        raise InputError(f"--concept: unknown concept {name!r}; the shipped concepts are {', '.join(CONCEPT_NAMES)}")
    folder = CONCEPTS_DIR / name
    files = {key: folder / f"{key}.txt" for key in ("positive", "negative", "prompts")}
    for key in ("words", "regex"):
        if (folder / f"{key}.txt").is_file():
            files[key] = folder / f"{key}.txt"
    return files


def heldout_text_path() -> Path:
    """The shared held-out prose (for the cross-entropy cost on text no concept selected)."""
    return CONCEPTS_DIR / "heldout.txt"
