"""The main job in quick mode: every law passes and the report says so."""

import io
import json
import re
import sys
from pathlib import Path

import pytest

from ufmjax.cli import main
from ufmjax.report.reproduce import Section, gpt_concept_section, reproduce
from ufmjax.runs.progress import Progress

REPO = Path(__file__).resolve().parents[2]


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so progress bars draw into it."""

    def isatty(self):
        return True


@pytest.mark.slow
def test_reproduce_quick_passes_every_law(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    assert main(["reproduce", "--out", str(out), "--quick", "--quiet"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["all_passed"], [law for law in summary["laws"] if not law["passed"]]
    assert summary["total"] >= 40 and not summary["failed_sections"]
    report = (out / "report.md").read_text()
    assert "FAIL" not in report and report.count("| pass |") == summary["total"]
    # Every law row has exactly five cells: pipes inside a cell (|x - y|) are escaped.
    rows = [line for line in report.splitlines() if line.endswith("| pass |")]
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 6 for row in rows), rows
    for law in ("Lemma B.3", "Lemma B.5", "Thm 3.3", "Thm 3.6", "Thm 3.8", "Prop. B.1"):
        assert law in report
    # The report speaks to a reader: no tracker jargon, and the theory it cites is the
    # repository's docs/theory.md, linked relative to the report.
    assert "issue " not in report.lower() and "THEORY.md" not in report
    link = re.search(r"\[docs/theory\.md\]\(([^)]+)\)", report)
    assert link and (out / link.group(1)).resolve() == (REPO / "docs" / "theory.md").resolve()
    # Figures referenced by the report exist.
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line[line.index("(") + 1:-1]).is_file(), line
    # Running again reuses the finished runs: nothing is retrained (metrics.json untouched).
    # With a terminal, the bars name the section and each step while it runs.
    metrics = out / "runs" / "gpt_concept" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("UFMJAX_PROGRESS", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: the step text is not cut short
    again = reproduce(out, quick=True, progress=True, sections=[gpt_concept_section])
    monkeypatch.undo()
    assert again["all_passed"] and metrics.stat().st_mtime_ns == before
    drawn = terminal.getvalue()
    assert "reproduce" in drawn and "GPT on concept data (Sec. 4)" in drawn
    assert "step=sweep, 201 alphas" in drawn, drawn[-2000:]


def test_reproduce_progress_false_draws_nothing_even_on_a_terminal(tmp_path, monkeypatch):
    """progress=False (the CLI's --quiet) is silent; progress=True draws the outer bar."""
    def section(out, quick, progress):
        with Progress(2, "a section", enabled=progress) as bar:
            bar.update(0, step="first step")
            bar.update(2)
        return Section("a section")

    monkeypatch.delenv("UFMJAX_PROGRESS", raising=False)
    drawn = {}
    for progress in (False, True):
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        summary = reproduce(tmp_path / "rep", progress=progress, sections=[section])
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        assert summary["total"] == 0 and not summary["failed_sections"]
        drawn[progress] = terminal.getvalue()
    assert drawn[False] == ""
    assert "reproduce" in drawn[True] and "a section" in drawn[True]


def test_readme_examples_write_under_results_or_runs():
    """Every --out of the README's commands lands in a gitignored folder, not the checkout's root."""
    readme = (REPO / "README.md").read_text()
    outs = re.findall(r"--out[ =](\S+)", readme)
    assert len(outs) > 10
    bad = [o for o in outs if not re.match(r"[`\[]?(results|runs)(/|\b)|DIR\b", o)]
    assert not bad, bad
    ignored = (REPO / ".gitignore").read_text().split()
    assert "/results/" in ignored and "/runs/" in ignored
