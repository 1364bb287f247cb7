"""report.html: the pages behind the numbers, for a person to read.

Per page: a thumbnail (when eval has the image), the reference, and each system's output
with character-level differences marked (deleted reference characters struck through in
red, inserted ones in green, at the headline normalisation). With a comparison, the pages
that got most worse come first, then the ones that gained most; otherwise the worst pages.
No model code; images arrive as PIL objects or not at all (`ocrtune score`).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein

from data_prep.atomic import write_text_atomic
from finetune.metrics import HEADLINE, edit_counts, normalize

SHOWN = 30  # pages per section: enough to see a pattern, small enough to open fast

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,monospace;font-size:13px}
del{background:#fdd;color:#900}ins{background:#dfd;color:#060;text-decoration:none}
img{max-width:320px}.cer{color:#555;font-size:12px}"""


def diff_html(reference: str, prediction: str) -> str:
    """The prediction against the reference: <del> what is missing/wrong, <ins> what was added."""
    r, h = normalize(reference, HEADLINE), normalize(prediction, HEADLINE)
    out = []
    for op in Levenshtein.opcodes(r, h):
        ref_part, hyp_part = html.escape(r[op.src_start:op.src_end]), html.escape(h[op.dest_start:op.dest_end])
        if op.tag == "equal":
            out.append(ref_part)
        else:
            if ref_part:
                out.append(f"<del>{ref_part}</del>")
            if hyp_part:
                out.append(f"<ins>{hyp_part}</ins>")
    return "".join(out)


def _thumbnail(image) -> str:
    im = image.copy()
    im.thumbnail((320, 320))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return '<img alt="page" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode() + '">'


def write_html(path: Path, report: dict, ids: list[str], references: list[str], predictions: dict[str, list[str]],
               image_of=None) -> Path:
    """`image_of(index)` -> PIL image of a page, or None when no images (called for shown pages only)."""
    systems = list(predictions)
    cers = {}
    for s in systems:
        e, n = edit_counts(references, predictions[s], HEADLINE)
        cers[s] = e / np.maximum(n, 1)
    sections = []
    c = report.get("comparison")
    if c:
        delta = cers[c["adapted"]] - cers[c["base"]]
        worse = [i for i in np.argsort(-delta, kind="stable") if delta[i] > 0][:SHOWN]
        better = [i for i in np.argsort(delta, kind="stable") if delta[i] < 0][:SHOWN]
        sections += [(f"Largest regressions ({c['adapted']} worse than {c['base']})", worse),
                     (f"Largest gains ({c['adapted']} better than {c['base']})", better)]
    else:
        sections.append(("Worst pages", list(np.argsort(-cers[systems[0]], kind="stable")[:SHOWN])))
    head = "".join(f"<th>{html.escape(s)}</th>" for s in systems)
    summary = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{100 * m['cer']:.2f}%</td><td>{100 * m['mean_sample_cer']:.2f}%</td>"
        f"<td>{m['page_ned']:.3f}</td><td>{m['repetition_loops']}</td></tr>" for s, m in report["systems"].items())
    body = [f"<style>{_CSS}</style><h1>ocrtune evaluation</h1>",
            "<table><tr><th>system</th><th>corpus CER</th><th>mean page CER</th><th>page NED</th><th>loops</th></tr>"
            f"{summary}</table>"]
    if c:
        lo, hi = c["cer_delta_ci95"]
        body.append(f"<p>CER change {100 * c['cer_delta']:+.2f} points, 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                    f"(paired bootstrap over {c.get('units', len(ids))} {c.get('unit', 'pages')}).</p>")
    body.append(f"<p>Differences at {HEADLINE}: <del>reference characters missed or wrong</del> "
                "<ins>characters the system added</ins>.</p>")
    for title, rows in sections:
        body.append(f"<h2>{html.escape(title)}: {len(rows)} pages</h2>")
        if not rows:
            body.append("<p>none</p>")
            continue
        body.append(f"<table><tr><th>page</th><th>reference</th>{head}</tr>")
        for i in rows:
            image = image_of(int(i)) if image_of is not None else None
            cells = "".join(f"<td><pre>{diff_html(references[i], predictions[s][i])}</pre>"
                            f"<div class='cer'>CER {100 * cers[s][i]:.1f}%</div></td>" for s in systems)
            thumb = _thumbnail(image) if image is not None else ""
            body.append(f"<tr><td>{html.escape(str(ids[i]))}<br>{thumb}</td>"
                        f"<td><pre>{html.escape(references[i])}</pre></td>{cells}</tr>")
        body.append("</table>")
    write_text_atomic(path, "<!doctype html><meta charset='utf-8'><title>ocrtune evaluation</title>" + "\n".join(body) + "\n")
    return path
