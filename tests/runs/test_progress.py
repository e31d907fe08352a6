"""Progress bars: drawn only on a terminal (or when asked), never "done" on an interruption,
and nested bars share one display instead of failing."""

import io

import pytest

from ufmjax.runs.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_silent_off_a_terminal_unless_asked(monkeypatch):
    monkeypatch.delenv("UFMJAX_PROGRESS", raising=False)
    pipe = io.StringIO()
    with Progress(5, "sweep", stream=pipe) as bar:
        bar.update(5)
    assert pipe.getvalue() == ""
    monkeypatch.setenv("UFMJAX_PROGRESS", "1")
    with Progress(5, "sweep", stream=pipe) as bar:
        bar.update(5, loss=0.25)
    text = pipe.getvalue()
    assert "sweep" in text and "5/5" in text and "loss=0.25" in text
    monkeypatch.setenv("UFMJAX_PROGRESS", "0")
    term = Terminal()
    with Progress(5, "sweep", stream=term) as bar:
        bar.update(5)
    assert term.getvalue() == ""


def test_enabled_false_is_silent_on_a_terminal(monkeypatch):
    monkeypatch.delenv("UFMJAX_PROGRESS", raising=False)
    term = Terminal()
    with Progress(3, "train", enabled=False, stream=term) as bar:
        bar.update(3)
    assert term.getvalue() == ""


@pytest.mark.parametrize("exc, word", [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")])
def test_an_interrupted_bar_never_says_done(monkeypatch, exc, word):
    monkeypatch.setenv("UFMJAX_PROGRESS", "1")
    pipe = io.StringIO()
    with pytest.raises(exc):
        with Progress(10, "train", stream=pipe) as bar:
            bar.update(4)
            raise exc
    text = pipe.getvalue()
    assert f"train ({word})" in text and "4/10" in text and "done" not in text


def test_nested_bars_share_one_display(monkeypatch):
    monkeypatch.setenv("UFMJAX_PROGRESS", "1")
    pipe = io.StringIO()
    with Progress(2, "reproduce", stream=pipe) as outer:
        for _ in range(2):
            with Progress(3, "train", stream=pipe) as inner:
                inner.update(3)
            outer.update(1)
    with Progress(1, "again", stream=pipe) as bar:  # the display was released
        bar.update(1)
    text = pipe.getvalue()
    assert "reproduce" in text and "2/2" in text and "again" in text


def test_every_step_text_is_drawn_however_short(monkeypatch):
    """A step done within the 0.2 s refresh was never shown (and a test looking for it flaked)."""
    monkeypatch.setenv("UFMJAX_PROGRESS", "1")
    monkeypatch.setenv("COLUMNS", "200")
    term = Terminal()
    with Progress(3, "section", stream=term) as bar:
        for step in ("train", "sweep, 201 alphas", "figures"):
            bar.update(1, step=step)
    text = term.getvalue()
    assert all(f"step={s}" in text for s in ("train", "sweep, 201 alphas", "figures")), text
