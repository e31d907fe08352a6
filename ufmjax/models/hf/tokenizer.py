"""The tokenizer of a pretrained Hugging Face model folder, read from its `tokenizer.json`.

Shape legend: V = tokens of the vocabulary (the model's embedding rows).

A model folder written by `transformers` (`save_pretrained`) holds `tokenizer.json`, the
complete fast tokenizer, which the `tokenizers` library reads without `transformers`.
`HFTokenizer` encodes as `transformers` does by default (`add_special_tokens=True`: the
tokenizer's post-processor adds its BOS/EOS tokens; no truncation, no padding, whatever
the file configures), and gives each token's string decoded alone, which concept token sets
are chosen from (`ufmjax.data.concept_tokens`). The model's embedding may have more rows than
the tokenizer has tokens (padded to a multiple of 64 or 128 for speed); those rows decode to
the empty string and belong to no word. `tokenizers` is imported when a tokenizer is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ufmjax.data.prompts import InputError


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from `folder/tokenizer.json`, encoding as `transformers` does."""

    def __init__(self, folder, tokenizer=None):
        """Wrap `tokenizer`, or read `folder/tokenizer.json` when it is None (InputError naming `--hf`)."""
        self.folder = Path(folder)
        if tokenizer is None:
            tokenizer = _read_tokenizer(self.folder)
        # transformers encodes without truncation or padding unless asked, whatever the file says.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self._strs: list[str] | None = None

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.folder)!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Tokens of the tokenizer, added (special) tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The token ids of a text, with the tokenizer's special tokens (`add_special_tokens=True`)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def token_strs(self, V: int) -> list[str]:
        """[V] the string of each id 0..V-1 decoded alone (special tokens kept; "" past the vocabulary)."""
        if self._strs is None:
            n = self.vocab_size
            self._strs = list(self.tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False))
        V = int(V)
        return self._strs[:V] + [""] * max(0, V - len(self._strs))

    def special_prefix(self) -> int:
        """How many tokens the post-processor puts in front of every text (1 for a BOS, 0 for
        GPT-2): the length of the common prefix of the encodings of two unrelated texts."""
        a, b = self.encode("a"), self.encode("Zq")
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def check_vocab(self, embedding_rows: int) -> None:
        """InputError when the tokenizer has more tokens than the model's embedding has rows."""
        if self.vocab_size > int(embedding_rows):
            raise InputError(f"--hf: tokenizer.json in {self.folder} has {self.vocab_size} tokens "
                             f"but the model's embedding has only {int(embedding_rows)} rows")


def _read_tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"--hf: {folder} has no tokenizer.json")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception on a malformed file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--hf: cannot read {path}: {reason}") from None


def load_tokenizer(folder) -> HFTokenizer:
    """The tokenizer of a model folder (`folder/tokenizer.json`); InputError naming `--hf` and the folder."""
    return HFTokenizer(folder)


def encode_texts(tok: HFTokenizer, texts: list[str], name: str) -> list[np.ndarray]:
    """The int32 token ids of each text; InputError naming `name` for a text that encodes to no token."""
    out = []
    for i, text in enumerate(texts):
        ids = np.asarray(tok.encode(text), dtype=np.int32)
        if ids.size == 0:
            snippet = text if len(text) <= 40 else text[:37] + "..."
            raise InputError(f"{name}: the text at index {i} ({snippet!r}) encodes to no token")
        out.append(ids)
    return out
