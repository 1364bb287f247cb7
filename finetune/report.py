"""Report files written by `ocrtune eval`: report.json, report.md, predictions.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.atomic import write_text_atomic
from finetune.metrics import HEADLINE, LEVEL_NAMES, LEVELS


def write_predictions(path: Path, ids, references, predictions_by_system: dict[str, list[str]], extra=None) -> None:
    lines = []
    for i, (rid, ref) in enumerate(zip(ids, references)):
        row = {"id": rid, "reference": ref, "predictions": {s: preds[i] for s, preds in predictions_by_system.items()}}
        if extra:
            row.update({k: v[i] for k, v in extra.items()})
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_markdown(report: dict) -> str:
    systems = report["systems"]
    n = next(iter(systems.values()))["n"]
    if report.get("model"):
        where = f"Model `{report['model']}`, data `{report['data']}` split `{report['split']}`, {n} pages."
    else:
        where = f"Scored from `{report.get('scored_from')}`, {n} pages."
    lines = [
        "# ocrtune evaluation",
        "",
        where,
        "",
        f"| system | CER ({LEVEL_NAMES[HEADLINE]}, corpus) | CER raw | CER content | CER lenient | mean per-page CER "
        "| WER | page NED | pages CER>1 | empty | loops | hit max tokens | field F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in systems.items():
        hit = "n/a" if m.get("hit_max_tokens") is None else m["hit_max_tokens"]
        f1 = "n/a" if not m.get("fields") else _pct(m["fields"]["f1"])
        lines.append(
            f"| {name} | {_pct(m['cer'])} | {_pct(m['cer_L0'])} | {_pct(m['cer_L2'])} | {_pct(m['cer_L3'])} | "
            f"{_pct(m['mean_sample_cer'])} | {_pct(m['wer'])} | {m['page_ned']:.3f} | {_pct(m['share_cer_above_1'])} | "
            f"{m['empty_outputs']} | {m['repetition_loops']} | {hit} | {f1} |"
        )
    if "comparison" in report:
        c = report["comparison"]
        lo, hi = c["cer_delta_ci95"]
        lines += [
            "",
            f"CER change ({c.get('adapted', 'adapted')} - {c.get('base', 'base')}): {100 * c['cer_delta']:+.2f} points, "
            f"95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}] (paired bootstrap over {c.get('units', n)} {c.get('unit', 'pages')}, "
            f"{c['resamples']} resamples); P(change >= 0) = {c['p_delta_ge_0']:.4f}.",
        ]
    for name, m in systems.items():
        if m.get("top_confusions"):
            shown = ", ".join(f"`{x['reference'] or '∅'}`→`{x['prediction'] or '∅'}` ×{x['count']}"
                              for x in m["top_confusions"][:5])
            lines += ["", f"Top character confusions, {name} (reference→prediction, ∅ = missing): {shown}."]
    lines += [
        "",
        f"Normalisation: headline {HEADLINE} ({LEVEL_NAMES[HEADLINE]}); "
        + "; ".join(f"{lvl} = {LEVEL_NAMES[lvl]}" for lvl in LEVELS)
        + ". Corpus CER = total edits / total reference characters; WER at L2; page NED = edits / longer length.",
    ]
    d = report.get("decoding")
    if d:
        lines.append(
            f"Decoding (same for every system): {d['strategy']}, max_new_tokens {d['max_new_tokens']}, "
            f"batch size {d['batch_size']}, repetition guard {d.get('repetition_guard') or 'off'}, "
            f"prompt `{report['prompt']!r}`, vision {report['vision']}."
        )
    return "\n".join(lines) + "\n"


def write_report(output: Path, report: dict) -> None:
    write_text_atomic(output / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(output / "report.md", render_markdown(report))
