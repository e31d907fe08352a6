"""The main job in quick mode: every law passes and the report says so."""

import json

from ufmjax.cli import main


def test_reproduce_quick_passes_every_law(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--out", str(out), "--quick", "--quiet"]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["all_passed"], [law for law in summary["laws"] if not law["passed"]]
    assert summary["total"] >= 19 and not summary["failed_sections"]
    report = (out / "report.md").read_text()
    assert "FAIL" not in report and report.count("| pass |") == summary["total"]
    for law in ("Lemma B.3", "Lemma B.5", "Thm 3.3", "Thm 3.6", "Thm 3.8", "Prop. B.1"):
        assert law in report
    # Figures referenced by the report exist.
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line[line.index("(") + 1:-1]).is_file(), line
    # A second run reuses the trained runs.
    assert main(["reproduce", "--out", str(out), "--quick", "--quiet"]) == 0
    again = json.loads((out / "runs" / "ufm_ref" / "metrics.json").read_text())
    assert again["resumed_from"] is None
