"""The main job in quick mode: every law passes and the report says so."""

import json
import re

from ufmjax.cli import main
from ufmjax.report.reproduce import gpt_concept_section, reproduce


def test_reproduce_quick_passes_every_law(tmp_path, capsys):
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
    # Figures referenced by the report exist.
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line[line.index("(") + 1:-1]).is_file(), line
    # Running again reuses the finished runs: nothing is retrained (metrics.json untouched).
    metrics = out / "runs" / "gpt_concept" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    again = reproduce(out, quick=True, progress=False, sections=[gpt_concept_section])
    assert again["all_passed"] and metrics.stat().st_mtime_ns == before
