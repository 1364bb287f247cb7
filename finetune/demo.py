"""The whole job in one command, on a laptop CPU: adapt a printed-text OCR model to handwriting.

    ocrtune demo [--output runs/demo]

0. check the base end to end on one freshly rendered line (sequence build, generation,
   scoring), so a broken install fails in seconds, not after minutes of rendering;
1. render handwritten lines (hand-drawn fonts from PyPI + real handwritten digits from
   scikit-learn, scan-like augmentation) with data_prep.synthetic;
2. build a grouped, leakage-checked dataset from them with data_prep (manifest source);
3. evaluate the base model (the recipe's model.name, or --model) on the test split;
4. train a LoRA adapter with the same entry point GPU users run
   (`python -m finetune.train configs/runs/demo_handwriting.yaml`; OCR-2: demo_handwriting_ocr2.yaml);
5. evaluate base and adapter on the held-out test split, with a paired bootstrap CI;
   plot per-page CER before/after and the loss curve.

Writes OUTPUT/{check,scans,data,eval-base,run}/, OUTPUT/report.{json,md}, OUTPUT/predictions.jsonl,
OUTPUT/cer_per_sample.png and OUTPUT/loss.png. A failure prints one line naming the stage
and OUTPUT/ocrtune-error.log, which holds the traceback; the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from finetune.errors import OcrtuneError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class DemoError(OcrtuneError, RuntimeError):
    pass


@dataclass(frozen=True)
class FamilyDemo:
    """What the demo of one model family runs: its recipe config (whose model.name is the
    family's shipped tiny base), how many lines it renders and the share held out for test."""

    recipe: str  # under configs/
    lines: int
    test_fraction: float


# v1 is the default: its base had three pretraining stages on printed and degraded print (OCR-2's
# only on light print) and reads printed scans far better, and its steps cost about half as much on
# a CPU, so the same few minutes buy more lines and steps. Both keep ~300-400 test lines. How each
# reads and adapts: BENCHMARKS.md.
FAMILIES = {
    "deepseek-ocr": FamilyDemo("runs/demo_handwriting.yaml", lines=10000, test_fraction=0.04),
    "deepseek-ocr-2": FamilyDemo("runs/demo_handwriting_ocr2.yaml", lines=2000, test_fraction=0.15),
}
RENDER_SHARDS = 4  # blocks rendered in parallel; fixed so every machine renders the same pixels


@dataclass
class DemoSettings:
    output: str = "runs/demo"
    family: str = "deepseek-ocr"  # picks the recipe config and its base (FAMILIES)
    lines: int | None = None  # rendered handwriting lines; None = the family's (FAMILIES)
    test_fraction: float | None = None  # None = the family's
    val_fraction: float = 0.02
    steps: int | None = None  # None = the recipe config's train.max_steps
    model: str | None = None  # None = the recipe config's model.name (the family's tiny base)
    seed: int = 0  # rendering, split and training all follow it
    eval_batch_size: int = 32
    max_new_tokens: int = 48  # lines are short; a runaway base output stops here
    overwrite: bool = False


def shipped_config(rel: str) -> Path:
    """A file of configs/: from the source tree, or from the installed package `ocrtune_configs`."""
    path = REPO_CONFIGS / rel
    if path.is_file():
        return path
    import importlib.resources

    return Path(str(importlib.resources.files("ocrtune_configs").joinpath(rel)))


def _step(n: int, text: str) -> float:
    print(f"\n[{n}/5] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"      done in {time.perf_counter() - t0:.1f} s", flush=True)


def check_base(model: str, folder: Path, seed: int, max_new_tokens: int) -> float:
    """Read one freshly rendered line with the base, end to end (load, sequence build, greedy
    generation with the repetition guard, scoring), and return its CER. Any failure of the
    install, the model or the decoding path surfaces here, before the long stages."""
    from data_prep.images import load_image
    from data_prep.synthetic import generate
    from finetune.decoding import NO_REPEAT_NGRAM, NO_REPEAT_WINDOW
    from finetune.generate import generate_pages
    from finetune.metrics import edit_counts
    from finetune.runtime import load_for_inference
    from finetune.sequence import builder_for

    if folder.exists():  # only with --overwrite
        shutil.rmtree(folder)
    generate("handwriting", 1, seed, folder, progress=False)
    row = json.loads((folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    inf = load_for_inference(model, None, None, "auto", NO_REPEAT_NGRAM, NO_REPEAT_WINDOW)
    builder = builder_for(inf.family, inf.processor, inf.model.config, inf.prompt, inf.vision)
    [out] = generate_pages(inf.model, builder, [(row["id"], load_image(folder / row["image"]))], 1, max_new_tokens,
                           guard=inf.guard)
    edits, lengths = edit_counts([row["markdown"]], [out.text], "L1")
    return float(edits.sum() / max(int(lengths.sum()), 1))


def format_table(report: dict, base_label: str = "base") -> str:
    base, adapted = report["systems"]["base"], report["systems"]["adapted"]
    c = report["comparison"]
    lo, hi = c["cer_delta_ci95"]
    rows = [
        ("system", f"corpus CER ({base['n']} test lines)", "mean per-line CER"),
        (base_label, f"{100 * base['cer']:.2f}%", f"{100 * base['mean_sample_cer']:.2f}%"),
        ("adapted (LoRA on the decoder)", f"{100 * adapted['cer']:.2f}%", f"{100 * adapted['mean_sample_cer']:.2f}%"),
        ("change, 95% CI", f"{100 * c['cer_delta']:+.2f} pts [{100 * lo:+.2f}, {100 * hi:+.2f}]", ""),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c_:>17}" for a, b, c_ in rows)


def run_demo(s: DemoSettings, progress: bool = True, stages: list[str] | None = None) -> dict:
    """`stages`: each stage's name is appended as it starts (the caller names the failed one)."""
    stages = [] if stages is None else stages
    from data_prep.build import BuildError, build_dataset
    from data_prep.synthetic import generate
    from finetune.config import load_config
    from finetune.evaluate import evaluate
    from finetune.models import resolve_model
    from finetune.plots import plot_loss
    from finetune.report import write_report

    out = Path(s.output)
    if out.exists() and any(out.iterdir()) and not s.overwrite:
        raise DemoError(f"--output {out} already exists and is not empty; pass --overwrite or choose another folder")
    if s.family not in FAMILIES:
        raise DemoError(f"--family {s.family!r}: choose one of {', '.join(FAMILIES)}")
    fam = FAMILIES[s.family]
    lines = fam.lines if s.lines is None else s.lines
    test_fraction = fam.test_fraction if s.test_fraction is None else s.test_fraction
    if lines < 1:
        raise DemoError(f"--lines {lines}: must be at least 1")
    if not 0 < test_fraction < 1:
        raise DemoError(f"--test-fraction {test_fraction}: must be between 0 and 1")
    recipe = shipped_config(fam.recipe)
    overrides = [f"data.path={out / 'data'}", f"output_dir={out / 'run'}", f"train.seed={s.seed}"]
    if s.model is not None:
        overrides.append(f"model.name={s.model}")
    if s.steps is not None:
        overrides.append(f"train.max_steps={s.steps}")
    cfg = load_config(recipe, overrides)  # fails here, before any work, on a bad recipe or override
    model = cfg.model.name
    resolve_model(model)  # an unknown model fails now, not after rendering and building
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    stages.append("check the base")
    t0 = _step(0, f"check the base {model} end to end on one rendered line")
    cer = check_base(model, out / "check", s.seed, s.max_new_tokens)
    print(f"      read it with CER {100 * cer:.0f}%: install, model and decoding work")
    timings["check_s"] = time.perf_counter() - t0
    _done(t0)

    stages.append("render")
    t0 = _step(1, f"render {lines} handwritten lines -> {out / 'scans'}")
    scans = out / "scans"
    if scans.exists():  # only with --overwrite: a non-empty --output was refused above
        shutil.rmtree(scans)
    generate("handwriting", lines, s.seed, scans, progress=progress, shards=min(RENDER_SHARDS, lines))
    timings["render_s"] = time.perf_counter() - t0
    _done(t0)

    stages.append("build the dataset")
    t0 = _step(2, f"build the dataset (grouped split, leakage check) -> {out / 'data'}")
    try:
        built = build_dataset("manifest", scans / "manifest.jsonl", out / "data", val_fraction=s.val_fraction,
                              test_fraction=test_fraction, seed=s.seed, overwrite=True, progress=progress)
    except BuildError as exc:
        raise DemoError(str(exc)) from None
    counts = built.report["counts"]
    print(f"      train {counts['train']}, validation {counts['validation']}, test {counts['test']} lines")
    timings["build_s"] = time.perf_counter() - t0
    _done(t0)

    stages.append("evaluate the base")
    t0 = _step(3, f"evaluate the base {model} on the {counts['test']} test lines")
    base_report = evaluate(model, out / "data", out / "eval-base", batch_size=s.eval_batch_size,
                           max_new_tokens=s.max_new_tokens, progress=progress)
    print(f"      base corpus CER {100 * base_report['systems']['base']['cer']:.2f}%")
    timings["eval_base_s"] = time.perf_counter() - t0
    _done(t0)

    stages.append("train")
    t0 = _step(4, f"train a LoRA adapter: python -m finetune.train {recipe.name}")
    cmd = [sys.executable, "-m", "finetune.train", str(recipe), *overrides]
    if not progress:
        cmd.append("--no-progress")
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        log = out / "run" / "ocrtune-error.log"
        raise RuntimeError(f"python -m finetune.train exited {proc.returncode}"
                           + (f"; its traceback is in {log}" if log.is_file() else ""))
    timings["train_s"] = time.perf_counter() - t0
    _done(t0)

    stages.append("evaluate base and adapter")
    t0 = _step(5, "evaluate base and adapter on the held-out test split")
    report = evaluate(model, out / "data", out, adapter=out / "run" / "adapter", batch_size=s.eval_batch_size,
                      max_new_tokens=s.max_new_tokens, progress=progress)
    plot_loss(out / "run" / "metrics.jsonl", out / "loss.png")
    timings["eval_s"] = time.perf_counter() - t0
    _done(t0)

    timings["total_s"] = time.perf_counter() - started
    settings = {f.name: getattr(s, f.name) for f in fields(s)} | {"lines": lines, "test_fraction": test_fraction}
    report["demo"] = {"settings": settings, "counts": counts,
                      "timings": timings, "recipe": str(recipe)}
    write_report(out, report)
    print("\n" + format_table(report))
    print(f"\nwall time {timings['total_s']:.0f} s. Report: {out / 'report.md'}; plots: {out / 'cer_per_sample.png'}, "
          f"{out / 'loss.png'}; adapter: {out / 'run' / 'adapter'}")
    return report


def main(argv: list[str] | None = None) -> int:
    d = DemoSettings()
    parser = argparse.ArgumentParser(prog="ocrtune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=d.output, help="folder for everything the demo writes")
    parser.add_argument("--lines", type=int, default=d.lines,
                        help="handwritten lines to render, all splits (default: the family's, 10,000 for v1)")
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction,
                        help="share of the lines held out for the before/after test (default: the family's)")
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps (default: the recipe's)")
    parser.add_argument("--model", default=d.model, help="base model (default: the recipe's model.name)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default=d.family,
                        help="which architecture's tiny base and demo recipe (configs/runs/demo_handwriting*.yaml)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty --output folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = DemoSettings(output=args.output, family=args.family, lines=args.lines,
                            test_fraction=args.test_fraction, steps=args.steps,
                            model=args.model, seed=args.seed, overwrite=args.overwrite)
    from finetune.errors import run_command

    stages = ["check the settings"]

    def body() -> int:
        run_demo(settings, progress=not args.no_progress, stages=stages)
        return 0

    return run_command(lambda: stages[-1], body, lambda: settings.output)

if __name__ == "__main__":
    sys.exit(main())

