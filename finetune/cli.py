"""The `ocrtune` command.

    ocrtune demo                      (the whole job on a laptop CPU in minutes; see finetune/demo.py)
    ocrtune data build --source folder --input scans/ --output runs/data
    ocrtune validate configs/runs/*.yaml configs/accelerate/*.yaml
    ocrtune train configs/runs/tiny_smoke.yaml data.path=runs/data
    ocrtune eval --model builtin:tiny-random-deepseek-ocr-2 --adapter runs/tiny-smoke/adapter --data runs/data --output runs/tiny-smoke/eval
    ocrtune score runs/tiny-smoke/eval/predictions.jsonl --output runs/rescored
    ocrtune predict --model builtin:tiny-random-deepseek-ocr-2 --input scans/ report.pdf --output runs/markdown
    ocrtune serve --model builtin:tiny-random-deepseek-ocr-2 --adapter runs/tiny-smoke/adapter --port 8000
    ocrtune push runs/tiny-smoke/adapter --repo-id you/name --dry-run runs/push-preview

Errors print one line naming the file, field or key, and exit with status 2; an internal error
prints one line naming the stage and the log file that holds its traceback, and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.decoding import NO_REPEAT_NGRAM, NO_REPEAT_WINDOW
from finetune.errors import InputError


# Which `data build` flags belong to which source (passed to that adapter as keyword arguments).
SOURCE_FLAGS = {
    "hf": {"image_column": "image_column", "text_column": "text_column", "group_column": "group_column",
           "id_column": "id_column", "hf_config": "config", "hf_split": "split"},
    "pdf": {"dpi": "dpi"},
    "iam": {"iam_level": "level"},
    "synthetic": {"fonts": "fonts", "augment": "augment", "synthetic_seed": "seed", "unit": "unit"},
}


def _source_options(args) -> dict:
    flags = SOURCE_FLAGS.get(args.source, {})
    given = {k for group in SOURCE_FLAGS.values() for k in group if getattr(args, k) is not None}
    stray = sorted(given - set(flags))
    if stray:
        raise InputError(f"--source {args.source} does not use {', '.join('--' + k.replace('_', '-') for k in stray)}")
    options = {name: getattr(args, flag) for flag, name in flags.items() if getattr(args, flag) is not None}
    if "fonts" in options:
        options["fonts"] = tuple(f.strip() for f in options["fonts"].split(",") if f.strip())
    return options


def _data_build(args) -> int:
    from data_prep.build import build_dataset
    from data_prep.preprocess import Preprocess

    tokenizer = args.tokenizer
    if tokenizer and tokenizer.startswith("builtin:"):
        from finetune.models import resolve_model

        tokenizer = str(resolve_model(tokenizer).path)
    result = build_dataset(
        args.source, args.input, args.output, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        seed=args.seed, prompt=args.prompt, max_rejected=args.max_rejected, max_pixels=args.max_pixels,
        overwrite=args.overwrite, progress=not args.no_progress, source_options=_source_options(args),
        max_target_tokens=args.max_target_tokens, tokenizer=tokenizer, near_duplicate_threshold=args.near_duplicate_threshold,
        preprocess=Preprocess(deskew=args.deskew, binarize=args.binarize, upscale_min_side=args.upscale_min_side,
                              downscale_max_side=args.downscale_max_side),
        workers=args.workers,
    )
    c = result.report["counts"]
    print(f"wrote {result.output}: train {c['train']}, validation {c['validation']}, test {c['test']}; "
          f"rejected {c['rejected']} of {c['candidates']}, repaired {c['fixed']} "
          f"(see {result.output / 'build_report.json'})")
    for r in result.report["rejected"][:20]:
        print(f"  rejected {r['item']}: {r['reason']}")
    for w in result.report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _endpoints(args) -> list[tuple[str, str]]:
    urls, names = args.endpoint or [], args.endpoint_model or []
    if len(urls) != len(names):
        raise InputError(f"give one --endpoint-model per --endpoint ({len(urls)} endpoints, {len(names)} models)")
    return list(zip(urls, names))


def _eval(args) -> int:
    from finetune.evaluate import evaluate, sweep_modes

    common = dict(model_name=args.model, data=args.data, adapter=args.adapter, split=args.split,
                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt=args.prompt,
                  limit=args.limit, dtype=args.dtype, bootstrap_resamples=args.bootstrap_resamples,
                  progress=not args.no_progress, no_repeat_ngram=args.no_repeat_ngram,
                  no_repeat_window=args.no_repeat_window, restart=args.restart, engine=args.engine)
    if args.modes:
        if args.endpoint:  # an endpoint's resolution is its server's, not a mode we can set
            raise InputError("--modes sweeps the local model's resolution; evaluate --endpoint without --modes")
        rows = sweep_modes([m.strip() for m in args.modes.split(",") if m.strip()], args.output, **common)
        if rows:
            print((Path(args.output) / "modes.md").read_text())
        return 0
    report = evaluate(output=args.output, endpoints=_endpoints(args), endpoint_key_env=args.endpoint_key_env,
                      endpoint_concurrency=args.endpoint_concurrency, **common)
    if report:  # only the main process of a multi-process eval writes and prints the report
        print((Path(args.output) / "report.md").read_text())
    return 0


def _score(args) -> int:
    from finetune.score import score

    score(args.predictions, args.output, base=args.base, adapted=args.adapted, bootstrap_resamples=args.bootstrap_resamples)
    print((Path(args.output) / "report.md").read_text())
    return 0


def _predict(args) -> int:
    from finetune.predict import predict

    summary = predict(args.model, args.input, args.output, adapter=args.adapter, prompt=args.prompt,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, dpi=args.dpi,
                      keep_grounding=not args.strip_grounding, dtype=args.dtype, engine=args.engine,
                      no_repeat_ngram=args.no_repeat_ngram,
                      no_repeat_window=args.no_repeat_window, progress=not args.no_progress)
    print(f"wrote {summary['files']} Markdown files ({summary['pages']} pages) to {args.output}; "
          f"{len(summary['hit_max_tokens'])} pages hit the token cap, {len(summary['failed'])} inputs failed")
    for f in summary["failed"]:
        print(f"  failed {f['file']}: {f['reason']}")
    return 1 if summary["failed"] else 0


def _serve(args) -> int:
    from finetune.serve import build_engine, make_server

    engine = build_engine(args.model, adapter=args.adapter, prompt=args.prompt, dtype=args.dtype,
                          no_repeat_ngram=args.no_repeat_ngram, no_repeat_window=args.no_repeat_window,
                          max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, served_name=args.served_name)
    server = make_server(engine, args.host, args.port, image_root=args.image_root)
    host, port = server.server_address[:2]
    print(f"serving {engine.served_name!r} on http://{host}:{port}/v1 (chat/completions, models); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _export(args) -> int:
    from finetune.export import export_adapter, export_merged

    if args.merge:
        done = export_merged(args.adapter_dir, args.output, args.model, args.dtype, args.overwrite)
        print(f"merged {args.adapter_dir} into {done['base_model']} ({done['family']}): full checkpoint in {args.output}")
    else:
        done = export_adapter(args.adapter_dir, args.output, args.model, args.overwrite)
        print(f"vLLM adapter ({done['family']}, {done['tensors']} tensors on {done['modules']} modules) in {args.output}")
    return 0


def _push(args) -> int:
    from finetune.hub import stage, upload, write_dry_run

    files = stage(Path(args.adapter_dir), args.repo_id, base_model_id=args.base_model_id,
                  report_path=Path(args.report) if args.report else None)
    if args.dry_run:
        write_dry_run(files, Path(args.dry_run))
        print(f"dry run: {len(files)} files that would be uploaded to {args.repo_id} written to {args.dry_run}:")
        for name, data in files.items():
            print(f"  {name} ({len(data):,} bytes)")
        return 0
    url = upload(files, args.repo_id, private=args.private)
    print(f"pushed {len(files)} files to {args.repo_id}: {url}")
    return 0


BUILD_HELP = """\
Build a dataset from scans and their transcripts (KIND: folder, manifest, hf, pdf, iam, funsd,
synthetic; README "Input formats").

Every pair is validated: bad items are rejected with a reason (never silently) and every repair
is listed (EXIF rotation, alpha on white, 16-bit, CMYK, palette, misnamed file). Targets over
--max-target-tokens are rejected, never truncated. Identical and near-duplicate images are
grouped with the declared groups so nothing leaks between splits. Writes a datasets.DatasetDict
(datasets.load_from_disk(DIR)), build_report.json and a dataset card, atomically; writes nothing
when more than --max-rejected is rejected. A split with a fraction > 0 that comes out empty is a
warning here and in build_report.json."""


EVAL_HELP = """\
Base and base + adapter on the same pages, same prompt, same greedy decoding, batched. Writes
report.json, report.md, report.html (pages with character differences marked, regressions and
gains first), predictions.jsonl, cer_histogram.png and, with an adapter, cer_per_sample.png.

The official repetition guard (no 30-gram repeated within 90 generated tokens, <td>/</td>
exempt) is on by default and recorded in the report; --no-repeat-ngram 0 turns it off.
Resumable: finished batches go to OUTPUT/eval_progress.jsonl and the same command continues
after a crash or kill (--restart discards them). Sharded under `accelerate launch
--num_processes N -m finetune.cli eval ...` or `torchrun --nproc_per_node N -m finetune.cli eval
...`: each process takes a share of the pages; predictions equal a one-process run.
--modes a,b: one eval per resolution mode in OUTPUT/mode-NAME/, image placeholder ids per page
against CER in OUTPUT/modes.md (v1: tiny, small, base, large, gundam; OCR-2: base, gundam).
--endpoint URL --endpoint-model NAME: an OpenAI-compatible server (a hosted DeepSeek-OCR, or
ocrtune serve) as system endpoint:NAME on the same pages; the key comes from $OPENAI_API_KEY
(--endpoint-key-env), never the command line."""


SCORE_HELP = """\
Score predictions from any system into eval's report.json / report.md; no model needed. Input:
the predictions.jsonl eval writes, one {"id", "reference", "predictions": {SYSTEM: text},
"group"?} per line."""


PREDICT_HELP = """\
Images and PDFs (every page) to Markdown: OUTPUT/<relative path>.md; a PDF's pages are joined by
a `<!-- pagebreak -->` line (what `data build --source pdf` reads back). Grounding boxes are kept
unless --strip-grounding. predict_summary.json lists pages that hit the token cap and inputs
that failed (exit 1 when any did; the rest are still written)."""


SERVE_HELP = """\
OpenAI-compatible server on this machine's torch: POST /v1/chat/completions (one user message:
a text part with the instruction, an image_url part with a base64 data URL or a path inside
--image-root), plain and SSE streaming (`data: [DONE]` last), usage token counts, GET
/v1/models. Same decoding as eval (greedy, repetition guard); requests arriving together are
batched; malformed requests get a 4xx JSON error. Binds loopback by default: there is no
authentication."""


EXPORT_HELP = """\
Without --merge: the LoRA adapter as vLLM loads it (tensors under the published checkpoint's
module names, target modules listed by full name, no modules_to_save), for
`vllm serve --enable-lora --lora-modules NAME=DIR`. Refused, naming the tensors, when vLLM would
reject or silently skip part of it: a trained projector (modules_to_save), vision LoRA, DoRA,
fused routed-expert parameters.
With --merge: base + adapter (projector and vision LoRA included) as one full checkpoint in the
family's published layout (v1: the official deepseek_vl_v2 files), the base's tokenizer,
processor and code files copied unchanged, for --model DIR or vLLM. Written to a staging
folder, then renamed into place."""


PUSH_HELP = """\
Publish an adapter and its model card (with the eval report's CER before/after) in one commit
through huggingface_hub, retrying 429/5xx. --dry-run DIR writes exactly the files that would be
uploaded. The token comes from HF_TOKEN or `hf auth login`, never the command line."""


def _add_guard_flags(parser) -> None:
    """The repetition guard's flags, the same for eval, predict and serve."""
    parser.add_argument("--no-repeat-ngram", type=int, default=NO_REPEAT_NGRAM,
                        help="ban repeating an n-gram of this size (official DeepSeek-OCR setting; 0 = off)")
    parser.add_argument("--no-repeat-window", type=int, default=NO_REPEAT_WINDOW,
                        help="... within this many generated tokens")


def build_parser() -> argparse.ArgumentParser:
    from data_prep import DEFAULT_PROMPT
    from data_prep.images import DEFAULT_MAX_PIXELS
    from data_prep.sources import SOURCES

    parser = argparse.ArgumentParser(prog="ocrtune", description="Adapt DeepSeek-OCR to your documents with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="adapt a tiny base to a synthetic handwriting domain on this CPU, with a report",
                   add_help=False)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    b = data.add_parser("build", help="build a dataset from scans + transcripts", description=BUILD_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--source", required=True, choices=SOURCES)
    b.add_argument("--input", required=True, help="folder, manifest (.jsonl/.csv), PDF, corpus file, dataset path or Hub id")
    b.add_argument("--output", required=True, type=Path)
    b.add_argument("--val-fraction", type=float, default=0.1)
    b.add_argument("--test-fraction", type=float, default=0.1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--prompt", default=DEFAULT_PROMPT, help="recorded with the dataset; training and eval reuse it")
    b.add_argument("--max-rejected", type=float, default=0.1, help="fail (writing nothing) above this share of rejects")
    b.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression bomb guard")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    b.add_argument("--max-target-tokens", type=int, help="reject (never truncate) longer targets; needs --tokenizer")
    b.add_argument("--tokenizer", help="tokenizer for --max-target-tokens: a model folder, builtin:NAME or Hub id")
    b.add_argument("--near-duplicate-threshold", type=float, default=0.15,
                   help="images whose edges differ by at most this share are one page (same split); 0 = identical only")
    b.add_argument("--workers", type=int, default=0, help="processes decoding images (0 = one per CPU core, max 8)")
    b.add_argument("--deskew", action="store_true", help="straighten tilted pages (recorded in the card)")
    b.add_argument("--binarize", action="store_true", help="Otsu black/white (recorded in the card)")
    b.add_argument("--upscale-min-side", type=int, default=0, help="enlarge images with a shorter side below this")
    b.add_argument("--downscale-max-side", type=int, default=0, help="shrink images with a longer side above this")
    hf = b.add_argument_group("--source hf")
    hf.add_argument("--image-column", help="default: image")
    hf.add_argument("--text-column", help="default: markdown")
    hf.add_argument("--group-column", help="column naming writer/document/template (default: none)")
    hf.add_argument("--id-column", help="default: SPLIT-ROW")
    hf.add_argument("--hf-config", help="dataset configuration name (Hub datasets)")
    hf.add_argument("--hf-split", help="read only this split (default: all)")
    b.add_argument_group("--source pdf").add_argument("--dpi", type=int, help="page rendering resolution (default 144)")
    b.add_argument_group("--source iam").add_argument("--iam-level", choices=["line", "page"], help="default: line")
    syn = b.add_argument_group("--source synthetic")
    syn.add_argument("--fonts", help="comma-separated font specs (matplotlib:FILE, package:NAME, path); default: printed")
    syn.add_argument("--augment", choices=["none", "light", "scan"], help="scan-like augmentation (default light)")
    syn.add_argument("--synthetic-seed", type=int, help="rendering seed (default 0)")
    syn.add_argument("--unit", choices=["block", "line"], help="a sample per blank-line block (default) or per line")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_data_build)

    t = sub.add_parser("train", help="train a LoRA adapter (same as python -m finetune.train)", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=None)

    e = sub.add_parser("eval", help="CER of the base model and base + adapter", description=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", required=True, help="builtin:NAME, a local directory, or a Hub id")
    e.add_argument("--adapter", type=Path)
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--split", default="test")
    e.add_argument("--output", required=True, type=Path)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--prompt", default=None, help="default: the adapter's training prompt, else the dataset's")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N pages")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--bootstrap-resamples", type=int, default=10_000)
    _add_guard_flags(e)
    e.add_argument("--endpoint", action="append", metavar="URL",
                   help="an OpenAI-compatible base URL (…/v1) evaluated as one more system; repeatable")
    e.add_argument("--endpoint-model", action="append", metavar="NAME", help="model name for each --endpoint")
    e.add_argument("--endpoint-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    e.add_argument("--endpoint-concurrency", type=int, default=4, help="requests in flight per endpoint")
    e.add_argument("--restart", action="store_true", help="discard an interrupted eval in --output instead of resuming it")
    e.add_argument("--modes", help="comma-separated resolution modes to sweep (DeepSeek-OCR-2: base,gundam): one eval "
                                   "per mode in OUTPUT/mode-NAME/, vision tokens vs CER in OUTPUT/modes.md")
    e.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="decode with ocrtune's transformers path or with vLLM (installed next to ocrtune; gundam mode)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_eval)

    sc = sub.add_parser("score", help="score a predictions.jsonl from any system (same report files as eval)",
                        description=SCORE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("predictions", type=Path)
    sc.add_argument("--output", required=True, type=Path)
    sc.add_argument("--base", help="system to compare against (default: 'base', else the first)")
    sc.add_argument("--adapted", help="system compared (default: 'adapted', else the second)")
    sc.add_argument("--bootstrap-resamples", type=int, default=10_000)
    sc.set_defaults(func=_score)

    pr = sub.add_parser("predict", help="images and PDFs (every page) to Markdown files", description=PREDICT_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--model", required=True, help="builtin:NAME, a local directory, or a Hub id")
    pr.add_argument("--adapter", type=Path)
    pr.add_argument("--input", required=True, nargs="+", type=Path, help="image files, PDFs and folders of them")
    pr.add_argument("--output", required=True, type=Path)
    pr.add_argument("--prompt", help="default: the adapter's training prompt, else '<image>\\nFree OCR.'")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--max-new-tokens", type=int, default=2048)
    pr.add_argument("--dpi", type=int, default=144, help="PDF page rendering resolution")
    pr.add_argument("--strip-grounding", action="store_true", help="drop <|det|> boxes and <|ref|> tags, keep the text")
    pr.add_argument("--dtype", default="auto")
    _add_guard_flags(pr)
    pr.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="decode with ocrtune's transformers path or with vLLM (installed next to ocrtune; gundam mode)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_predict)

    sub.add_parser("validate", help="check run configs and accelerate topologies without weights or data",
                   add_help=False)

    sv = sub.add_parser("serve", help="OpenAI-compatible /v1/chat/completions for the base model or base + adapter",
                        description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sv.add_argument("--model", required=True, help="builtin:NAME, a local directory, or a Hub id")
    sv.add_argument("--adapter", type=Path)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default: no auth is done)")
    sv.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    sv.add_argument("--served-name", help="model id clients send (default: the adapter's or model's name)")
    sv.add_argument("--prompt", help="used when a request has no text part (default: the adapter's training prompt)")
    sv.add_argument("--image-root", default=".", help="local image paths in requests must lie inside this folder")
    sv.add_argument("--max-batch", type=int, default=8, help="requests generated together at most")
    sv.add_argument("--batch-wait-ms", type=int, default=20, help="how long to wait for more requests to batch")
    sv.add_argument("--dtype", default="auto")
    _add_guard_flags(sv)
    sv.set_defaults(func=_serve)

    x = sub.add_parser("export", help="the adapter as vLLM loads it, or merged into a full checkpoint (--merge)",
                       description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("adapter_dir", type=Path)
    x.add_argument("--output", required=True, type=Path)
    x.add_argument("--merge", action="store_true", help="write base + adapter as one full checkpoint")
    x.add_argument("--model", help="base model (default: the one the adapter records)")
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights of the merged checkpoint")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    x.set_defaults(func=_export)

    p = sub.add_parser("push", help="publish an adapter and its model card to the Hugging Face Hub",
                       description=PUSH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter_dir")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", metavar="DIR", help="write the files that would be uploaded to DIR instead")
    p.add_argument("--base-model-id", help="Hub id of the base model, when the adapter was trained from a local path")
    p.add_argument("--report", help="eval report.json to show in the card (default: one found beside the adapter)")
    p.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from finetune.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["validate"]:
        from finetune.validate import main as validate_main

        if len(argv) < 2 or argv[1] in ("-h", "--help"):
            print("usage: ocrtune validate CONFIG.yaml [CONFIG.yaml ...]  (run configs and accelerate topologies)")
            return 0 if len(argv) >= 2 else 2
        return validate_main(argv[1:])
    if argv[:1] == ["demo"]:
        from finetune.demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from finetune.errors import run_command

    stage = " ".join(x for x in (args.command, getattr(args, "data_command", None)) if x)
    # An internal error's traceback goes to the command's output folder where it has one
    # (eval, predict, score, data build), else to a temp file.
    code = run_command(stage, lambda: args.func(args), lambda: getattr(args, "output", None))
    _close_process_group()
    return code


def _close_process_group() -> None:
    """Under torchrun / accelerate launch (sharded eval), leave the process group before the
    interpreter exits: a gloo group torn down by interpreter shutdown instead can abort the
    process ("terminate called without an active exception") after its work is done."""
    td = sys.modules.get("torch.distributed")  # never imported by commands that run no model
    if td is not None and td.is_available() and td.is_initialized():
        td.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
