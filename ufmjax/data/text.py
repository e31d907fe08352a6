"""A character-level corpus built at run time from text that ships with Python itself.

Shape legend: V = characters (vocabulary), G = character classes (concepts), N = windows,
T = positions of a window, Q = prompts of a steering set.

The text is the standard library's bundled documentation (`pydoc_data.topics`: the help
pages of `help('topic')`), nothing downloaded. Topics are joined in sorted key order, so the
corpus is the same on every run of one Python version (its size and hash go in the run's
config). A few typographic characters are mapped to ASCII and any other non-ASCII character
is dropped, so the vocabulary is the printable ASCII characters that occur (with both cases
of every letter that occurs), plus newline.

Concepts are character classes (docs/theory.md, Sec. 2, with the vocabulary partitioned by
class): 0 uppercase letters, 1 lowercase letters, 2 digits, 3 punctuation (every other
printable character), 4 whitespace. The vocabulary is ordered by class, then by character.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

CLASSES = ("uppercase", "lowercase", "digits", "punctuation", "whitespace")
UPPER, LOWER, DIGITS, PUNCT, SPACE = range(5)

# Typographic characters of the bundled docs, mapped to their ASCII spelling.
ASCII_FOLD = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
              "\u2014": "--", "\u2013": "-", "\t": "    "}
_LOWER_TO_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_UPPER_TO_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def char_class(ch: str) -> int:
    """The concept of one ASCII character."""
    if "A" <= ch <= "Z":
        return UPPER
    if "a" <= ch <= "z":
        return LOWER
    if "0" <= ch <= "9":
        return DIGITS
    if ch in " \n":
        return SPACE
    return PUNCT


def concept_index(target) -> int:
    """A concept given by index or name ('uppercase', ...), as an index; else ValueError."""
    if isinstance(target, str):
        if target not in CLASSES:
            raise ValueError(f"target must be one of {CLASSES} or an index, got {target!r}")
        return CLASSES.index(target)
    if not isinstance(target, (int, np.integer)) or isinstance(target, bool) or not 0 <= target < len(CLASSES):
        raise ValueError(f"target must be a concept in [0, {len(CLASSES)}) {CLASSES}, got {target!r}")
    return int(target)


def to_upper(s: str) -> str:
    return s.translate(_LOWER_TO_UPPER)


def to_lower(s: str) -> str:
    return s.translate(_UPPER_TO_LOWER)


def bundled_text() -> str:
    """The raw corpus: every pydoc topic of this Python, in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"


def normalize_text(text: str) -> str:
    """Fold typographic characters to ASCII and drop whatever else is not printable ASCII."""
    text = "".join(ASCII_FOLD.get(ch, ch) for ch in text)
    return "".join(ch for ch in text if ch == "\n" or " " <= ch <= "~")


@dataclass(frozen=True)
class TextConfig:
    """The character corpus: the last `val_frac` of the text is the validation split."""

    source: str = "pydoc_topics"
    val_frac: float = 0.1
    max_chars: int | None = None  # keep only the first max_chars characters (small tests)

    def __post_init__(self):
        if self.source != "pydoc_topics":
            raise ValueError(f"source must be 'pydoc_topics' (text bundled with Python), got {self.source!r}")
        if not 0.0 < self.val_frac < 0.5:
            raise ValueError(f"val_frac must be in (0, 0.5), got {self.val_frac!r}")
        if self.max_chars is not None and (not isinstance(self.max_chars, int) or self.max_chars < 1000):
            raise ValueError(f"max_chars must be an integer >= 1000 or None, got {self.max_chars!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        return cls(**d)


class TextCorpus:
    """Character vocabulary, class concepts and the train/validation split of the corpus."""

    def __init__(self, config: TextConfig = TextConfig()):
        self.config = config
        text = normalize_text(bundled_text())
        if config.max_chars is not None:
            text = text[: config.max_chars]
        self.text = text
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()
        present = set(text)
        # Both cases of every letter, so case-flipped steering prompts stay in the vocabulary.
        present |= {ch.swapcase() for ch in present if ch.isalpha()}
        # The vocabulary is ordered by class so each concept is a contiguous block, like the
        # concept dataset; every class must occur (the kernel needs non-empty concepts).
        self.chars = sorted(present, key=lambda ch: (char_class(ch), ch))
        self.concept_of = np.asarray([char_class(ch) for ch in self.chars], dtype=np.int64)
        missing = [CLASSES[g] for g in range(len(CLASSES)) if not np.any(self.concept_of == g)]
        if missing:
            raise ValueError(f"the corpus has no characters of classes {missing}; use more text")
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        ids = self.encode(text)
        split = round(len(ids) * (1.0 - config.val_frac))
        self.train_ids, self.val_ids = ids[:split], ids[split:]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    @property
    def num_concepts(self) -> int:
        return len(CLASSES)

    def encode(self, s: str) -> np.ndarray:
        try:
            return np.fromiter((self.stoi[ch] for ch in s), dtype=np.int32, count=len(s))
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the corpus vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def split_ids(self, split: str) -> np.ndarray:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train_ids if split == "train" else self.val_ids

    def sample_windows(self, rng: np.random.Generator, n: int, length: int, split: str = "train") -> np.ndarray:
        """n random windows [N, T] of `length` consecutive characters."""
        ids = self.split_ids(split)
        if not 1 <= length <= ids.size:
            raise ValueError(f"length must be in [1, {ids.size}], got {length}")
        start = rng.integers(0, ids.size - length + 1, size=n)
        return ids[start[:, None] + np.arange(length)]

    def eval_windows(self, length: int, n: int | None = None, split: str = "val") -> np.ndarray:
        """Deterministic non-overlapping windows [N, T] tiling the split (the first n of them)."""
        ids = self.split_ids(split)
        count = ids.size // length
        if count == 0:
            raise ValueError(f"the {split} split ({ids.size} characters) is shorter than length={length}")
        if n is not None:
            count = min(count, n)
        return ids[: count * length].reshape(count, length)

    def spaced_windows(self, length: int, n: int, split: str = "val") -> np.ndarray:
        """n windows [N, T] at evenly spaced starts over the split (prompts from all of it)."""
        ids = self.split_ids(split)
        if n < 1 or ids.size < length:
            raise ValueError(f"need n >= 1 and length <= {ids.size}, got n={n}, length={length}")
        starts = np.linspace(0, ids.size - length, n).astype(np.int64)
        return ids[starts[:, None] + np.arange(length)]

    def bigram_logp(self, smoothing: float = 0.1) -> np.ndarray:
        """log p(next | previous) [V, V] from the train split, additive smoothing."""
        V = self.vocab
        counts = np.zeros((V, V))
        np.add.at(counts, (self.train_ids[:-1], self.train_ids[1:]), 1.0)
        counts += smoothing
        return np.log(counts / counts.sum(axis=1, keepdims=True))

    def bigram_ce(self, windows_NxT, smoothing: float = 0.1) -> float:
        """Mean bigram cross-entropy of predicting positions 1..T-1 of each window."""
        w = np.asarray(windows_NxT)
        return float(-self.bigram_logp(smoothing)[w[:, :-1], w[:, 1:]].mean())

    def unigram_ce(self, windows_NxT) -> float:
        counts = np.bincount(self.train_ids, minlength=self.vocab) + 0.1
        logp = np.log(counts / counts.sum())
        return float(-logp[np.asarray(windows_NxT)[:, 1:]].mean())


def steering_prompts(corpus: TextCorpus, target, negatives: str = "contrastive", q: int = 32,
                     length: int = 32, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Prompt sets P and N [Q, T] for a character-class concept (Sec. 4, Eq. 3).

    Spans of ordinary text are drawn from the split (seeded). Then:
      uppercase: P = the spans uppercased; contrastive N = the SAME spans lowercased, an exact
        contrastive pair that differs in case only; random N = other ordinary spans.
      lowercase: the mirror image (P lowercased, contrastive N uppercased).
      digits, punctuation, whitespace: P = the q spans densest in the class among 8q
        candidates; contrastive N = the q sparsest; random N = q other ordinary spans.
    """
    target = concept_index(target)
    if negatives not in ("contrastive", "random"):
        raise ValueError(f"negatives must be 'contrastive' or 'random', got {negatives!r}")
    if not isinstance(q, (int, np.integer)) or q < 1:
        raise ValueError(f"q must be a positive integer, got {q!r}")
    rng = np.random.default_rng(seed)
    spans = corpus.sample_windows(rng, 8 * q, length, split)
    if target in (UPPER, LOWER):
        base = [corpus.decode(s) for s in spans[:q]]
        up = np.stack([corpus.encode(to_upper(s)) for s in base])
        low = np.stack([corpus.encode(to_lower(s)) for s in base])
        P, N_contrastive = (up, low) if target == UPPER else (low, up)
        N = N_contrastive if negatives == "contrastive" else spans[q:2 * q]
        return P, N
    density = (corpus.concept_of[spans] == target).mean(axis=1)
    order = np.argsort(-density, kind="stable")
    P = spans[order[:q]]
    if negatives == "contrastive":
        N = spans[order[-q:]]
    else:
        N = spans[order[q:]][rng.choice(7 * q, size=q, replace=False)]
    return P, N
