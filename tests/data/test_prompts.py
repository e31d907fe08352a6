"""Prompt files, word lists and held-out text: both prompt formats and every refusal."""

import json

import pytest

from ufmjax.data.prompts import InputError, read_text, read_texts, read_words


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_plain_file_one_text_per_line(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_bytes(b"  I am happy.\r\n\nThe sun is out \n   \nlast line without newline")
    # Only the line end goes: leading and trailing spaces of a text are kept.
    assert read_texts(f, "--positive") == ["  I am happy.", "The sun is out ", "last line without newline"]


def test_plain_file_accepts_str_path_and_utf8_bom(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_bytes("\ufeffcaf\u00e9\n".encode("utf-8"))
    assert read_texts(str(f), "--positive") == ["caf\u00e9"]


def test_jsonl_by_suffix(tmp_path):
    f = tmp_path / "pos.jsonl"
    f.write_text(json.dumps({"text": "one", "label": 1}) + "\n\n" + json.dumps({"text": " two "}) + "\n")
    assert read_texts(f, "--positive") == ["one", " two "]


def test_jsonl_by_content(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_text('{"text": "a"}\n  {"text": "b\\nc"}\n')
    assert read_texts(f, "--positive") == ["a", "b\nc"]


def test_a_line_starting_with_a_brace_among_plain_lines_is_plain(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_text('{"text": "a"}\nplain\n')
    assert read_texts(f, "--positive") == ['{"text": "a"}', "plain"]


@pytest.mark.parametrize("content, match", [
    ('{"text": "a"}\n{"text": \n', r"^--negative: .*neg\.jsonl line 2 is not JSON"),
    ('{"text": "a"}\n\n{"txt": "b"}\n', r"^--negative: .*neg\.jsonl line 3 has no string field 'text'"),
    ('{"text": 3}\n', r"line 1 has no string field 'text'"),
    ('["text"]\n', r"line 1 has no string field 'text'"),
    ('{"text": "  "}\n', r"line 1 has an empty 'text'"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, match):
    f = tmp_path / "neg.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        read_texts(f, "--negative")


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match=r"^--prompts: no such file .*missing\.txt$"):
        read_texts(tmp_path / "missing.txt", "--prompts")
    with pytest.raises(InputError, match=r"^--prompts: .* is a directory"):
        read_texts(tmp_path, "--prompts")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match=r"^--prompts: .*latin1\.txt is not UTF-8 text \(undecodable byte at offset 3\)"):
        read_texts(bad, "--prompts")


@pytest.mark.parametrize("content", ["", "\n\n", "  \r\n\t\n"])
def test_no_text(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(InputError, match=r"^--positive: .*empty\.txt holds no text$"):
        read_texts(f, "--positive")


def test_messages_are_one_line(tmp_path):
    f = tmp_path / "neg.jsonl"
    f.write_text('{"text": \n')
    with pytest.raises(InputError) as info:
        read_texts(f, "--negative")
    assert "\n" not in str(info.value)


def test_read_words(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("# a comment\nHappy\n\n  Joy  # trailing comment\nfeel good\nJOY\n#\n")
    assert read_words(f, "--concept-words") == ["happy", "joy", "feel good"]
    empty = tmp_path / "none.txt"
    empty.write_text("# only comments\n\n")
    with pytest.raises(InputError, match=r"^--concept-words: .*none\.txt holds no word$"):
        read_words(empty, "--concept-words")
    with pytest.raises(InputError, match=r"^--concept-words: no such file"):
        read_words(tmp_path / "nope.txt", "--concept-words")


def test_read_text(tmp_path):
    f = tmp_path / "heldout.txt"
    f.write_text("First line.\n\nSecond line.\n")
    assert read_text(f, "--heldout") == "First line.\n\nSecond line.\n"
    f.write_text(" \n\t\n")
    with pytest.raises(InputError, match=r"^--heldout: .*heldout\.txt holds no text$"):
        read_text(f, "--heldout")
    with pytest.raises(InputError, match=r"^--heldout: .* is a directory"):
        read_text(tmp_path, "--heldout")
