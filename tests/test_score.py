"""`ocrtune score`: any system's predictions.jsonl -> the same report files as eval."""

import json

import pytest

from finetune.metrics import system_metrics
from tests.helpers import run_cli

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_cli_matches_the_metrics_and_compares(tmp_path):
    rows = [{"id": str(i), "reference": f"**Total:** {i}.50 EUR", "group": f"w{i % 5}",
             "predictions": {"hosted": f"**Total:** {i}.5O EUR", "mine": f"**Total:** {i}.50 EUR"}}
            for i in range(40)]
    out = tmp_path / "report"
    res = run_cli("score", str(_write(tmp_path / "p.jsonl", rows)), "--output", str(out), "--base", "hosted",
                  "--adapted", "mine", "--bootstrap-resamples", "2000")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    refs = [r["reference"] for r in rows]
    assert report["systems"]["hosted"]["cer"] == system_metrics(refs, [r["predictions"]["hosted"] for r in rows])["cer"]
    assert report["systems"]["mine"]["cer"] == 0.0 and report["systems"]["mine"]["fields"]["f1"] == 1.0
    assert report["systems"]["hosted"]["fields"]["f1"] == 0.0
    c = report["comparison"]
    assert c["base"] == "hosted" and c["adapted"] == "mine" and c["unit"] == "groups" and c["units"] == 5
    assert c["cer_delta"] < 0 and c["cer_delta_ci95"][1] < 0 and c["p_delta_ge_0"] == 0.0
    assert report["systems"]["hosted"]["top_confusions"][0] == {"reference": "0", "prediction": "O", "count": 40}
    assert "CER change (mine - hosted)" in res.stdout and "over 5 groups" in res.stdout
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 40


def test_score_rejects_inconsistent_lines_by_name(tmp_path):
    rows = [{"id": "1", "reference": "a", "predictions": {"x": "a", "y": "b"}},
            {"id": "2", "reference": "b", "predictions": {"x": "b"}}]
    res = run_cli("score", str(_write(tmp_path / "p.jsonl", rows)), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "p.jsonl:2: systems ['x'] differ from line 1's ['x', 'y']" in res.stderr
    res = run_cli("score", str(_write(tmp_path / "q.jsonl", rows[:1])), "--output", str(tmp_path / "o"),
                  "--base", "nope")
    assert res.returncode == 2 and "--base 'nope': not a system" in res.stderr
    assert not (tmp_path / "o").exists()


def test_report_html_marks_differences_and_orders_regressions_first(tmp_path):
    from finetune.html_report import diff_html

    assert diff_html("Total 12.50", "Total 12.5O") == "Total 12.5<del>0</del><ins>O</ins>"
    assert diff_html("a<b", "a<b") == "a&lt;b"  # escaped, never raw HTML from a model
    rows = [{"id": "gain", "reference": "hello world", "predictions": {"base": "hxllx wxrld", "adapted": "hello world"}},
            {"id": "loss", "reference": "page two", "predictions": {"base": "page two", "adapted": "<script>x</script>"}},
            {"id": "same", "reference": "abc", "predictions": {"base": "abc", "adapted": "abc"}}]
    res = run_cli("score", str(_write(tmp_path / "p.jsonl", rows)), "--output", str(tmp_path / "o"),
                  "--bootstrap-resamples", "200")
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "o" / "report.html").read_text()
    assert (page.index("Largest regressions") < page.index("<td>loss<br>") < page.index("Largest gains")
            < page.index("<td>gain<br>"))
    assert "<script>" not in page and "&lt;scri" in page  # the model output is escaped inside the diff
    assert (tmp_path / "o" / "cer_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
