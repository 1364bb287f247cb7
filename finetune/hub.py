"""Publish an adapter with a model card that shows the gain.

    ocrtune push runs/x/adapter --repo-id you/ocr-handwriting [--private] [--dry-run DIR]

The token comes from the environment (HF_TOKEN) or `hf auth login`, never from the
command line, and is never written anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from data_prep.atomic import replace_dir
from finetune.errors import OcrtuneError
from finetune.runtime import ADAPTER_META, read_adapter_meta

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
REPORT_NAME = "ocrtune_eval.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PushError(OcrtuneError, RuntimeError):
    pass


def find_report(adapter_dir: Path) -> Path | None:
    """An eval report beside the adapter: ADAPTER/report.json or ADAPTER/../eval/report.json."""
    for cand in (adapter_dir / "report.json", adapter_dir.parent / "eval" / "report.json"):
        if cand.is_file():
            return cand
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _usage(family: str, base_model: str, repo_id: str, per_expert: bool = False, vllm_ready: bool = False) -> list[str]:
    """How to run the adapter, right for its family: v1 has no transformers class (ocrtune or
    vLLM load it); OCR-2 loads through transformers + PEFT, except LoRA on routed experts
    (`per_expert`), which PEFT does not apply to transformers' fused experts. vLLM serves an
    OCR-2 adapter as a LoRA when `vllm_ready`, else merged, from the published checkpoint."""
    where = f"(`ADAPTER_DIR`: this repository, e.g. `hf download {repo_id} --local-dir ADAPTER_DIR`.)"
    if family == "deepseek_ocr":
        return [
            "DeepSeek-OCR (v1) has no class in transformers; load the adapter with ocrtune or serve it with vLLM:",
            "",
            "```bash",
            f"ocrtune predict --model {base_model} --adapter ADAPTER_DIR --input page.png --output out/",
            "ocrtune export ADAPTER_DIR --output vllm-adapter   # the layout vLLM loads",
            f"vllm serve {base_model} --enable-lora --lora-modules adapted=vllm-adapter",
            "```",
            "",
            where,
        ]
    # vLLM reads OCR-2 in its published layout: the published repository (not transformers'
    # copy of it) under a LoRA, or a merged export, which is written in that layout.
    from finetune.models.deepseek_ocr2 import DeepseekOcr2

    published = {copy: orig for orig, copy in DeepseekOcr2.HUB_ALIASES.items()}.get(base_model, base_model)
    if vllm_ready:
        serve = ["", f"Serve it with vLLM, as a LoRA on the published checkpoint (`{published}`):", "", "```bash",
                 "ocrtune export ADAPTER_DIR --output vllm-adapter   # the layout vLLM loads",
                 f"vllm serve {published} --enable-lora --lora-modules adapted=vllm-adapter", "```"]
    else:
        serve = ["", "Serve it with vLLM, merged into the base in DeepSeek-OCR-2's published layout:", "", "```bash",
                 f"ocrtune export ADAPTER_DIR --merge --output merged --model {base_model}", "vllm serve merged",
                 "```"]
    if per_expert:
        return [
            "This adapter trains the routed experts, stored one LoRA pair per expert as in the published "
            "checkpoint; PEFT does not apply those to transformers' fused experts (it would load the rest and "
            "skip them). Load it with ocrtune:",
            "",
            "```bash",
            f"ocrtune predict --model {base_model} --adapter ADAPTER_DIR --input page.png --output out/",
            "```",
            *serve,
            "",
            where,
        ]
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoProcessor, DeepseekOcr2ForConditionalGeneration",
        "",
        f'base = DeepseekOcr2ForConditionalGeneration.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        f'processor = AutoProcessor.from_pretrained("{base_model}")',
        "```",
        *serve,
        "",
        where,
    ]


def _model_index(repo_id: str, report: dict) -> list[str]:
    """The Hub's structured results: CER of each system on the test split (lower is better)."""
    name = Path(str(report.get("data", "dataset"))).name or "dataset"
    lines = ["model-index:", f"- name: {repo_id.split('/')[-1]}", "  results:"]
    for system, m in report["systems"].items():
        lines += ["  - task: {type: image-to-text, name: OCR}",
                  f"    dataset: {{type: {json.dumps(name)}, name: {json.dumps(name)}, split: {json.dumps(str(report.get('split')))}}}",
                  f"    metrics: [{{type: cer, name: CER ({system}), value: {round(100 * m['cer'], 2)}}}]"]
    return lines


def model_card(repo_id: str, base_model: str, meta: dict, report: dict | None,
               vllm_problems: list[str] | None = None, per_expert: bool = False) -> str:
    family = meta.get("family", "deepseek_ocr2")
    front = ["---", "library_name: peft", "pipeline_tag: image-text-to-text",
             "tags: [ocrtune, ocr, lora, deepseek-ocr]"]
    if _HUB_ID.match(base_model):
        front.append(f"base_model: {base_model}")
    if report and report.get("systems"):
        front += _model_index(repo_id, report)
    front.append("---")
    lines = front + [
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A LoRA adapter for [`{base_model}`]"
        + (f"(https://huggingface.co/{base_model})" if _HUB_ID.match(base_model) else "")
        + " trained with [ocrtune](https://pypi.org/project/ocrtune/).",
        "",
    ]
    if report and report.get("systems"):
        systems = report["systems"]
        lines += ["## Character error rate before and after", "",
                  "| system | CER (corpus, L1 text) | CER raw (L0) | mean per-page CER | pages |",
                  "| --- | --- | --- | --- | --- |"]
        for name, m in systems.items():
            lines.append(f"| {name} | {_pct(m['cer'])} | {_pct(m['cer_raw'])} | {_pct(m['mean_sample_cer'])} | {m['n']} |")
        if "comparison" in report:
            c = report["comparison"]
            lo, hi = c["cer_delta_ci95"]
            unit = c.get("unit", "pages")
            lines += ["", f"Change (adapted - base): {100 * c['cer_delta']:+.2f} points, 95% CI "
                          f"[{100 * lo:+.2f}, {100 * hi:+.2f}], paired bootstrap over {c.get('units', '')} {unit} "
                          f"({c['resamples']} resamples)".replace("  ", " ") + "."]
        d = report.get("decoding", {})
        dataset = Path(str(report.get("data", ""))).name  # the folder's name: a local path means nothing here
        lines += ["", f"Evaluated on the `{report.get('split')}` split of `{dataset}` with the same prompt "
                      f"(`{report.get('prompt')!r}`), greedy decoding and max_new_tokens {d.get('max_new_tokens')} "
                      "for both systems. Full numbers: `ocrtune_eval.json`.", ""]
    else:
        lines += ["No evaluation report was found next to this adapter, so no CER is claimed.", ""]
    lines += ["## Use", ""] + _usage(family, base_model, repo_id, per_expert, vllm_ready=vllm_problems == []) + [""]
    if vllm_problems is not None:
        lines += ["## Serving with vLLM", ""]
        if vllm_problems:
            lines += ["Not loadable as a vLLM LoRA adapter: " + "; ".join(vllm_problems) + ". Merge it into the base "
                      "for vLLM: `ocrtune export ADAPTER_DIR --merge --output DIR`, then `vllm serve DIR`.", ""]
        else:
            lines += ["vLLM-ready: `ocrtune export` found nothing vLLM would refuse or skip.", ""]
    lines += [f"Prompt used in training: `{meta.get('prompt', '')!r}`. LoRA: {json.dumps(meta.get('lora', {}))}.", ""]
    return "\n".join(lines)


def stage(adapter_dir: Path, repo_id: str, base_model_id: str | None = None, report_path: Path | None = None) -> dict[str, bytes]:
    """The exact files to upload, by name."""
    adapter_dir = Path(adapter_dir)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise PushError(f"{adapter_dir}: missing {name} (expected a directory written by ocrtune train)")
    if not _HUB_ID.match(repo_id):
        raise PushError(f"--repo-id {repo_id!r}: expected OWNER/NAME")
    if base_model_id is not None and not _HUB_ID.match(base_model_id):
        raise PushError(f"--base-model-id {base_model_id!r}: expected OWNER/NAME of a model on the Hub")
    if report_path is not None and not Path(report_path).is_file():
        raise PushError(f"--report {report_path}: no such file (expected report.json written by ocrtune eval)")
    meta = read_adapter_meta(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base_model_id or adapter_config.get("base_model_name_or_path") or meta.get("base_model") or ""
    if base_model_id is None and (meta.get("base_model_is_local_path") or Path(base).is_absolute()):
        raise PushError(
            f"the adapter's base model is a local path ({base}); pass --base-model-id OWNER/NAME so the card "
            "and adapter_config.json point to a model others can download"
        )
    adapter_config["base_model_name_or_path"] = base
    files = {
        "adapter_model.safetensors": (adapter_dir / "adapter_model.safetensors").read_bytes(),
        "adapter_config.json": (json.dumps(adapter_config, indent=2) + "\n").encode(),
    }
    if (adapter_dir / ADAPTER_META).is_file():
        files[ADAPTER_META] = (adapter_dir / ADAPTER_META).read_bytes()
    report_path = report_path or find_report(adapter_dir)
    report = json.loads(report_path.read_text()) if report_path else None
    if report is not None:
        files[REPORT_NAME] = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()
    from safetensors import safe_open

    from finetune.expert_lora import EXPERT_KEY
    from finetune.export import published_key, vllm_problems

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        per_expert = any(EXPERT_KEY.match(k) for k in f.keys())
    problems = None
    if meta.get("family"):  # what vLLM would refuse or skip (README: vLLM)
        from finetune.models.registry import family_named

        family = family_named(meta["family"])
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
            keys = [published_key(family, k) for k in f.keys()]
        problems = vllm_problems(adapter_config, keys)
    files["README.md"] = model_card(repo_id, base, meta, report, problems,
                                    per_expert=per_expert and meta.get("family") == "deepseek_ocr2").encode()
    return files


def write_dry_run(files: dict[str, bytes], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _retryable(exc: Exception) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status == 429 or (status is not None and status >= 500) or isinstance(exc, (ConnectionError, TimeoutError))


def upload(files: dict[str, bytes], repo_id: str, private: bool, attempts: int = 4, backoff_s: float = 2.0) -> str:
    """One commit with every file; 429/5xx/connection errors are retried with backoff."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
            info = api.create_commit(repo_id, operations=ops, commit_message="Upload adapter with ocrtune")
            return getattr(info, "commit_url", str(info))
        except Exception as exc:  # noqa: BLE001 - classified below
            last = exc
            if not _retryable(exc) or attempt == attempts:
                break
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise PushError(f"not pushed: {last.__class__.__name__}: {last}") from last
