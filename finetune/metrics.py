"""CER and friends, with the normalisation named next to every number.

Levels (applied identically to reference and prediction):
  L0 raw      strip leading/trailing whitespace only (what jiwer's `cer` does)
  L1 text     L0 + CRLF->LF, NFC, zero-width characters removed, typographic quotes and
              dashes mapped to ASCII, every whitespace run -> one space   (headline)
  L2 content  L1 + Markdown syntax stripped (headings, emphasis, bullets, quotes,
              link/image syntax keeps its text, table pipes -> cell text)
  L3 lenient  L2 + NFKC + casefold + non-word characters dropped

Corpus CER = sum of edit distances / sum of reference lengths. Also: WER (L2, whitespace
tokens), page NED = edits / max(len(prediction), len(reference)) (bounded 0..1, L1), the
robustness counters (CER > 1, empty outputs, repetition loops), field-level P/R/F1 for
`**key** value` / `**key:** value` lines, the top character confusions, and the paired
bootstrap over pages or groups. This module imports no model code.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
from collections import Counter

from rapidfuzz.distance import Levenshtein

from data_prep.errors import InputError

LEVELS = ("L0", "L1", "L2", "L3")
HEADLINE = "L1"
LEVEL_NAMES = {"L0": "raw", "L1": "text", "L2": "content", "L3": "lenient"}

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"), None)
_TYPOGRAPHIC = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
        "\u2026": "...",
    }
)
_WS = re.compile(r"\s+")
_MD_RULES = [
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images keep alt text
    (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),  # links keep their text
    (re.compile(r"^\s{0,3}#{1,6}\s+", re.M), ""),  # heading marks
    (re.compile(r"^\s{0,3}>\s?", re.M), ""),  # block quotes
    (re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.M), ""),  # bullets and numbered items
    (re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$", re.M), ""),  # table rule rows
    (re.compile(r"\s*\|\s*"), " "),  # table pipes -> cell separators
    (re.compile(r"(\*\*|__|\*|_|~~|`)"), ""),  # emphasis and code marks
]


def normalize(text: str, level: str = HEADLINE) -> str:
    if level not in LEVELS:
        raise InputError(f"unknown normalisation level {level!r}; choose one of {', '.join(LEVELS)}")
    text = text.strip()
    if level == "L0":
        return text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text).translate(_ZERO_WIDTH).translate(_TYPOGRAPHIC)
    if level in ("L2", "L3"):
        for pattern, repl in _MD_RULES:
            text = pattern.sub(repl, text)
    text = _WS.sub(" ", text).strip()
    if level == "L3":
        text = unicodedata.normalize("NFKC", text).casefold()
        text = re.sub(r"[^\w\s]", "", text)
        text = _WS.sub(" ", text).strip()
    return text


def edit_counts(references: list[str], predictions: list[str], level: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (edit distance, reference length) at one level."""
    edits = np.empty(len(references), dtype=np.int64)
    lengths = np.empty(len(references), dtype=np.int64)
    for i, (ref, hyp) in enumerate(zip(references, predictions)):
        r, h = normalize(ref, level), normalize(hyp, level)
        edits[i] = Levenshtein.distance(r, h)
        lengths[i] = len(r)
    return edits, lengths


def corpus_cer(edits: np.ndarray, lengths: np.ndarray) -> float:
    total = int(lengths.sum())
    return float(edits.sum()) / total if total else float(edits.sum() > 0)


def mean_sample_cer(edits: np.ndarray, lengths: np.ndarray) -> float:
    """What many notebooks report; shown alongside corpus CER, never instead of it."""
    per = edits / np.maximum(lengths, 1)
    return float(per.mean()) if len(per) else 0.0


def wer(references: list[str], predictions: list[str], level: str = "L2") -> float:
    """Corpus word error rate: word-level edits / reference words (whitespace tokens)."""
    edits = words = 0
    for ref, hyp in zip(references, predictions):
        r, h = normalize(ref, level).split(), normalize(hyp, level).split()
        edits += Levenshtein.distance(r, h)
        words += len(r)
    return edits / words if words else float(edits > 0)


def page_ned(references: list[str], predictions: list[str], level: str = HEADLINE) -> float:
    """Mean over pages of edits / max(len(prediction), len(reference)): 0 = exact, 1 = nothing right."""
    scores = []
    for ref, hyp in zip(references, predictions):
        r, h = normalize(ref, level), normalize(hyp, level)
        longest = max(len(r), len(h))
        scores.append(Levenshtein.distance(r, h) / longest if longest else 0.0)
    return float(np.mean(scores)) if scores else 0.0


# A runaway loop: the output ends in one unit of 1-64 characters repeated 8 or more times
# in a row, covering at least 32 characters.
_LOOP = re.compile(r"(.{1,64}?)\1{7,}\s*$", re.S)


def repetition_loop(prediction: str, reference: str = "") -> bool:
    """True when the output ends in a repeated run that the reference does not contain
    (a table of contents' dot leaders is in the reference, a decoding loop is not)."""
    m = _LOOP.search(prediction)
    if not m or len(m.group(0).strip()) < 32:
        return False
    return m.group(1) * 8 not in reference


_FIELD = re.compile(r"^\s*(?:[-*+]\s+)?\*\*(.+?)\*\*\s*(.*?)\s*$")


def form_fields(text: str) -> Counter:
    """(key, value) pairs of `**key** value` / `**key:** value` lines at L1 (colon dropped)."""
    fields: Counter = Counter()
    for line in text.replace("\r\n", "\n").split("\n"):
        m = _FIELD.match(line)
        if m:
            key = normalize(m.group(1), HEADLINE).rstrip(":").strip()
            value = normalize(m.group(2).lstrip(":"), HEADLINE)
            fields[(key, value)] += 1
    return fields


def field_scores(references: list[str], predictions: list[str]) -> dict | None:
    """Micro precision/recall/F1 of exact (key, value) matches; None when no reference has fields."""
    matched = n_ref = n_pred = 0
    for ref, hyp in zip(references, predictions):
        r, h = form_fields(ref), form_fields(hyp)
        matched += sum((r & h).values())
        n_ref += sum(r.values())
        n_pred += sum(h.values())
    if n_ref == 0:
        return None
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_ref
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "reference_fields": n_ref, "predicted_fields": n_pred}


def top_confusions(references: list[str], predictions: list[str], k: int = 10, level: str = HEADLINE) -> list[dict]:
    """The k most frequent character edits: substitution (ref -> pred), deletion (pred ''),
    insertion (ref '')."""
    counts: Counter = Counter()
    for ref, hyp in zip(references, predictions):
        r, h = normalize(ref, level), normalize(hyp, level)
        for op in Levenshtein.editops(r, h):
            if op.tag == "replace":
                counts[(r[op.src_pos], h[op.dest_pos])] += 1
            elif op.tag == "delete":
                counts[(r[op.src_pos], "")] += 1
            else:
                counts[("", h[op.dest_pos])] += 1
    return [{"reference": a, "prediction": b, "count": n} for (a, b), n in counts.most_common(k)]


def system_metrics(references: list[str], predictions: list[str]) -> dict:
    out: dict = {"n": len(references)}
    for level in LEVELS:
        e, n = edit_counts(references, predictions, level)
        out[f"cer_{level}"] = corpus_cer(e, n)
        if level == HEADLINE:
            edits, lengths = e, n
    out["cer"] = out[f"cer_{HEADLINE}"]
    out["cer_raw"] = out["cer_L0"]
    out["mean_sample_cer"] = mean_sample_cer(edits, lengths)
    out["share_cer_above_1"] = float(np.mean(edits > lengths)) if len(edits) else 0.0
    out["empty_outputs"] = sum(1 for p in predictions if not p.strip())
    out["repetition_loops"] = sum(repetition_loop(p, r) for r, p in zip(references, predictions))
    out["wer"] = wer(references, predictions)
    out["page_ned"] = page_ned(references, predictions)
    out["fields"] = field_scores(references, predictions)
    out["top_confusions"] = top_confusions(references, predictions)
    return out


def paired_bootstrap(
    references: list[str],
    base: list[str],
    adapted: list[str],
    resamples: int = 10_000,
    seed: int = 0,
    level: str = HEADLINE,
    groups: list[str] | None = None,
) -> dict:
    """95% CI of corpus CER(adapted) - CER(base), resampling with replacement.

    With `groups` (writer, document) whole groups are resampled (a cluster bootstrap):
    pages of one writer are not independent, and treating them so makes the CI too narrow."""
    e_b, lengths = edit_counts(references, base, level)
    e_a, _ = edit_counts(references, adapted, level)
    n = len(references)
    delta = corpus_cer(e_a, lengths) - corpus_cer(e_b, lengths)
    unit = "pages"
    if groups is not None and len(set(groups)) < n:
        # Sum per group once; a resample then adds up whole groups.
        names = sorted(set(groups))
        index = {g: i for i, g in enumerate(names)}
        gid = np.array([index[g] for g in groups])
        e_a = np.bincount(gid, weights=e_a, minlength=len(names))
        e_b = np.bincount(gid, weights=e_b, minlength=len(names))
        lengths = np.bincount(gid, weights=lengths, minlength=len(names))
        n, unit = len(names), "groups"
    if n == 0:
        return {"cer_delta": 0.0, "cer_delta_ci95": [0.0, 0.0], "p_delta_ge_0": 1.0, "resamples": 0, "level": level,
                "unit": unit}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ref_len = np.maximum(lengths[idx].sum(axis=1), 1)
    deltas = (e_a[idx].sum(axis=1) - e_b[idx].sum(axis=1)) / ref_len
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {
        "cer_delta": float(delta),
        "cer_delta_ci95": [float(low), float(high)],
        "p_delta_ge_0": float(np.mean(deltas >= 0)),
        "resamples": resamples,
        "level": level,
        "unit": unit,
        "units": int(n),
    }
