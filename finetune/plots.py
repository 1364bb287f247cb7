"""PNG plots from the files runs and evaluations write (no model code here).

    per-sample CER, base vs adapted   <- predictions.jsonl of an evaluation with an adapter
    training loss per step            <- metrics.jsonl of a training run
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.errors import InputError

from finetune.metrics import HEADLINE, LEVEL_NAMES, edit_counts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write the figure atomically (temp file, then rename) and free it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def sample_cers(predictions_jsonl: str | Path, system: str) -> np.ndarray:
    """Per-page CER (headline normalisation) of one system, in file order."""
    rows = [json.loads(line) for line in Path(predictions_jsonl).read_text(encoding="utf-8").splitlines() if line]
    refs = [r["reference"] for r in rows]
    preds = [r["predictions"][system] for r in rows]
    edits, lengths = edit_counts(refs, preds, HEADLINE)
    return edits / np.maximum(lengths, 1)


def plot_sample_cer(predictions_jsonl: str | Path, out_png: str | Path, base: str = "base", adapted: str = "adapted") -> Path:
    """Scatter of each page's CER before (x) and after (y); points below the diagonal improved."""
    plt = _pyplot()
    before, after = sample_cers(predictions_jsonl, base), sample_cers(predictions_jsonl, adapted)
    better, worse = int((after < before).sum()), int((after > before).sum())
    cap = max(1.0, float(np.quantile(np.concatenate([before, after]), 0.98)))
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.scatter(np.minimum(before, cap), np.minimum(after, cap), s=14, alpha=0.6)
    ax.plot([0, cap], [0, cap], color="grey", linewidth=1, linestyle="--")
    ax.set_xlim(0, cap * 1.02)
    ax.set_ylim(0, cap * 1.02)
    ax.set_xlabel(f"{base} CER per page ({LEVEL_NAMES[HEADLINE]})")
    ax.set_ylabel(f"{adapted} CER per page")
    ax.set_title(f"{len(before)} pages: {better} better, {worse} worse, {len(before) - better - worse} equal")
    return _save(fig, out_png)


def plot_loss(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Training loss (per answer token) against optimizer step."""
    plt = _pyplot()
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        raise InputError(f"{metrics_jsonl}: no logged steps")
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, loss, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_cer_histogram(predictions_jsonl: str | Path, out_png: str | Path) -> Path:
    """Per-page CER distribution of every system in the file (CER above 2 shown in the last bin)."""
    plt = _pyplot()
    first = json.loads(Path(predictions_jsonl).read_text(encoding="utf-8").splitlines()[0])
    systems = list(first["predictions"])
    bins = np.linspace(0, 2, 41)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for system in systems:
        cers = np.minimum(sample_cers(predictions_jsonl, system), 2.0)
        ax.hist(cers, bins=bins, alpha=0.55, label=f"{system} (median {np.median(cers):.2f})")
    ax.set_xlabel(f"CER per page ({LEVEL_NAMES[HEADLINE]}; >= 2 in the last bin)")
    ax.set_ylabel("pages")
    ax.legend()
    return _save(fig, out_png)
