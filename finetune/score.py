"""Score predictions from any system: `ocrtune score PREDICTIONS.jsonl --output DIR`.

    ocrtune score runs/eval/predictions.jsonl --output runs/rescored
    ocrtune score theirs.jsonl --output runs/theirs --base hosted --adapted mine

PREDICTIONS.jsonl is the format `ocrtune eval` writes, one page per line:
    {"id": "...", "reference": "...", "predictions": {"SYSTEM": "text", ...},
     "group"?: "writer-7", "hit_max_tokens"?: {"SYSTEM": false, ...}}
Writes the same report.json / report.md / predictions.jsonl as eval (no model, no GPU).
With two systems the comparison is ADAPTED - BASE (defaults: the systems named `base` and
`adapted`, else the first and second); with groups on every line the bootstrap resamples
groups.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import OcrtuneError
from finetune.html_report import write_html
from finetune.metrics import HEADLINE, LEVELS, paired_bootstrap, system_metrics
from finetune.plots import plot_cer_histogram
from finetune.report import write_predictions, write_report


class ScoreError(OcrtuneError, ValueError):
    """Unreadable or inconsistent predictions; the message names the file and line."""


def read_predictions(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{path}: cannot read ({exc})") from None
    systems = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ScoreError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("reference"), str) \
                or not isinstance(row.get("predictions"), dict) or not row["predictions"]:
            raise ScoreError(f"{where}: expected {{\"id\", \"reference\": str, \"predictions\": {{system: str}}}}")
        bad = [k for k, v in row["predictions"].items() if not isinstance(v, str)]
        if bad:
            raise ScoreError(f"{where}: prediction of {', '.join(bad)} is not a string")
        if systems is None:
            systems = list(row["predictions"])
        elif set(row["predictions"]) != set(systems):
            raise ScoreError(f"{where}: systems {sorted(row['predictions'])} differ from line 1's {sorted(systems)}")
        rows.append(row)
    if not rows:
        raise ScoreError(f"{path}: no predictions")
    return rows


def score_report(ids, references, predictions: dict[str, list[str]], hit_max_tokens: dict[str, list] | None,
                 groups: list[str] | None, base: str | None, adapted: str | None, resamples: int) -> dict:
    """The `systems` and `comparison` parts of a report, shared by eval and score."""
    report: dict = {
        "normalization": {"headline": HEADLINE, "levels": list(LEVELS), "cer": f"corpus CER at {HEADLINE}",
                          "cer_raw": "corpus CER at L0 (outer whitespace stripped only)", "wer": "L2, whitespace tokens",
                          "page_ned": f"mean edits / max(len) per page at {HEADLINE}"},
        "systems": {},
    }
    for name, preds in predictions.items():
        metrics = system_metrics(references, preds)
        hits = (hit_max_tokens or {}).get(name)
        metrics["hit_max_tokens"] = sum(bool(h) for h in hits) if hits is not None else None
        report["systems"][name] = metrics
    if base is not None and adapted is not None:
        report["comparison"] = {"base": base, "adapted": adapted, **paired_bootstrap(
            references, predictions[base], predictions[adapted], resamples=resamples, groups=groups)}
    return report


def score(predictions_path: str | Path, output: str | Path, base: str | None = None, adapted: str | None = None,
          bootstrap_resamples: int = 10_000) -> dict:
    path, output = Path(predictions_path), Path(output)
    rows = read_predictions(path)
    systems = list(rows[0]["predictions"])
    for flag, name in (("--base", base), ("--adapted", adapted)):
        if name is not None and name not in systems:
            raise ScoreError(f"{flag} {name!r}: not a system in {path} (systems: {', '.join(systems)})")
    if len(systems) >= 2 and (base is None or adapted is None):
        base = base or ("base" if "base" in systems else systems[0])
        adapted = adapted or ("adapted" if "adapted" in systems else next(s for s in systems if s != base))
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    references = [r["reference"] for r in rows]
    predictions = {s: [r["predictions"][s] for r in rows] for s in systems}
    hits = None
    if all(isinstance(r.get("hit_max_tokens"), dict) for r in rows):
        hits = {s: [r["hit_max_tokens"].get(s) for r in rows] for s in systems}
    groups = [str(r["group"]) for r in rows] if all("group" in r for r in rows) else None
    report = {"model": None, "data": str(path), "split": None, "prompt": None, "vision": None,
              "decoding": None, "scored_from": str(path),
              **score_report(ids, references, predictions, hits, groups, base, adapted, bootstrap_resamples)}
    output.mkdir(parents=True, exist_ok=True)
    extra = {}
    if groups is not None:
        extra["group"] = groups
    if hits is not None:
        extra["hit_max_tokens"] = [{s: hits[s][i] for s in systems} for i in range(len(rows))]
    write_predictions(output / "predictions.jsonl", ids, references, predictions, extra=extra or None)
    write_report(output, report)
    write_html(output / "report.html", report, ids, references, predictions)
    plot_cer_histogram(output / "predictions.jsonl", output / "cer_histogram.png")
    return report
