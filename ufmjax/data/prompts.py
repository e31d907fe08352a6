"""Researcher-written input files: prompt lists, word lists and held-out text.

A pretrained model is steered with texts the researcher writes (the positive and negative
prompts of the difference of means, the prompts evaluated, a word list for the concept's
tokens, a held-out text for the cross-entropy cost). These readers turn such files into
Python strings and refuse a bad file with one line that names the command-line parameter
and the file, so a typo is reported before any model is loaded.

Formats:

- prompt files (`read_texts`): plain text, one text per line, blank lines skipped and
  nothing stripped but the line end (`\\n`, `\\r\\n`); or JSONL, one JSON object per line
  with a string field `text`, recognised by the `.jsonl` suffix or by every non-blank line
  starting with `{`;
- word lists (`read_words`): one word or phrase per line, `#` starts a comment, case-folded;
- held-out text (`read_text`): a whole UTF-8 file.

Only the standard library and numpy are imported here (nothing of JAX or `tokenizers`).
"""

from __future__ import annotations

import json
from pathlib import Path


class InputError(ValueError):
    """A researcher's input (a file or a parameter) that cannot be used, said in one line."""


def _read_file(path, name: str) -> str:
    """The UTF-8 text of a file (a leading byte-order mark dropped); else InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{name}: no such file {path}")
    if path.is_dir():
        raise InputError(f"{name}: {path} is a directory, not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{name}: cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: {path} is not UTF-8 text (undecodable byte at offset {e.start})") from None


def _lines(text: str) -> list[str]:
    """The lines of a text without their line end; only `\\n` ends a line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    filled = [line for line in lines if line.strip()]
    return bool(filled) and all(line.lstrip().startswith("{") for line in filled)


def read_texts(path, name: str) -> list[str]:
    """The texts of a prompt file (plain, one per line, or JSONL with a `text` field).

    Args:
      path: the file.
      name: the parameter it was given as (`--positive`), the start of every error message.

    Returns:
      the texts in file order; blank lines are skipped, other lines kept as written.
    """
    path = Path(path)
    lines = _lines(_read_file(path, name))
    texts = []
    if _is_jsonl(path, lines):
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{name}: {path} line {number} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{name}: {path} line {number} has no string field 'text'")
            if not record["text"].strip():
                raise InputError(f"{name}: {path} line {number} has an empty 'text'")
            texts.append(record["text"])
    else:
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise InputError(f"{name}: {path} holds no text")
    return texts


def read_words(path, name: str) -> list[str]:
    """The words of a word list: one word or phrase a line, stripped and case-folded.

    Everything from a `#` to the line end is a comment; blank lines are skipped; a word
    listed twice is kept once (first occurrence).
    """
    path = Path(path)
    words = []
    for line in _lines(_read_file(path, name)):
        word = line.split("#", 1)[0].strip().casefold()
        if word:
            words.append(word)
    if not words:
        raise InputError(f"{name}: {path} holds no word")
    return list(dict.fromkeys(words))


def read_text(path, name: str) -> str:
    """The whole text of a UTF-8 file (held-out text for the cross-entropy cost), as written."""
    path = Path(path)
    text = _read_file(path, name)
    if not text.strip():
        raise InputError(f"{name}: {path} holds no text")
    return text
