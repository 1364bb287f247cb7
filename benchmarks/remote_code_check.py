"""DeepSeek's own loader on full checkpoints ocrtune writes: does the published checkpoints'
remote code (transformers 4.46.3, `trust_remote_code`) read them, and compute ocrtune's logits?

    .venv/bin/python benchmarks/remote_code_check.py inputs OUT
    REMOTE_VENV/bin/python benchmarks/remote_code_check.py remote OUT --code v1=DIR --code ocr2=DIR
    python benchmarks/remote_code_check.py compare OUT      (exit 1 on a missing tensor or a logit gap)

The checkpoints: per family, `ocrtune export --merge` of an adapter on everything vLLM's LoRA
leaves out too (LoRA on attention, MLPs and routed experts, and a trained projector) over a
base with full-size vision towers and a 2-layer MoE decoder of the published width (1280: the
remote code hard-codes its projector and separators at that width, and the vision towers at
theirs), seeded random weights at order-1 scale (benchmarks/vllm_parity.py says why). `--code`:
the remote code's .py files of
deepseek-ai/DeepSeek-OCR (modeling_deepseekocr.py, deepencoder.py, modeling_deepseekv2.py,
configuration_deepseek_v2.py, conversation.py) or of deepseek-ai/DeepSeek-OCR-2
(modeling_deepseekocr2.py, deepencoderv2.py, ...), e.g. `hf download deepseek-ai/DeepSeek-OCR
--include "*.py" --local-dir DIR`. ocrtune neither ships nor downloads them. REMOTE_VENV: torch,
transformers==4.46.3 (the code imports classes later releases removed), addict, easydict,
einops, and an importable torchvision (on a CPU: PyPI's, then .ci/vllm_cpu_torchvision.py).

`inputs` (ocrtune's venv) writes those checkpoints and three pages (vllm_parity's: 2x1 tiles,
1x3 tiles, none) into OUT, loads each merged checkpoint with ocrtune, builds each page through
ocrtune's sequence builder in gundam mode and writes the prompt ids, the views in the remote code's input
form (tiles, global view, tile grid, placeholder mask) and ocrtune's float32 logits. `remote`
loads the same folder with the remote code's classes (config from config.json as its
from_pretrained reads it, weights by name, missing and unexpected tensors recorded) and runs its
forward on those inputs, on the CPU in float32. `compare` prints, per checkpoint and page, the
tensors the remote code did not find and the largest logit gap.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "<image>\nFree OCR."
REL_TOL = 1e-4  # largest |remote - ocrtune| over the largest |ocrtune| logit, float32
# Buffers the remote model registers that no checkpoint holds (CLIP's position ids).
BUFFERS = ("model.vision_model.embeddings.position_ids",)
REMOTE = {"v1": ("modeling_deepseekocr", "DeepseekOCRConfig", "DeepseekOCRForCausalLM"),
          "ocr2": ("modeling_deepseekocr2", "DeepseekOCR2Config", "DeepseekOCR2ForCausalLM")}


# The parity decoder (vllm_parity.LANGUAGE) at the published width, head size 128 as published.
WIDE = {"hidden_size": 1280, "num_attention_heads": 10, "num_key_value_heads": 10, "intermediate_size": 512,
        "moe_intermediate_size": 128}


def _pairs(items: list[str], what: str) -> dict[str, Path]:
    out = {}
    for item in items:
        name, _, path = item.partition("=")
        if name not in REMOTE or not path:
            sys.exit(f"{what} {item!r}: expected v1=DIR or ocr2=DIR")
        out[name] = Path(path).resolve()
    return out


# ------------------------------------------------------------------------------ inputs

def _checkpoints(out: Path) -> tuple[dict[str, Path], list[Path]]:
    """Base, adapter and merged export per family in OUT (kept when already there), and the pages."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vllm_parity
    import vllm_parity_ocr2

    from finetune.export import export_merged
    from finetune.models import BUILTIN_DIR
    from finetune.models.deepseek_ocr import DeepseekOcrProcessor

    language = dict(vllm_parity.LANGUAGE, **WIDE)
    tokenizer = DeepseekOcrProcessor.from_pretrained(BUILTIN_DIR / vllm_parity.BUILTIN_TOKENIZER).tokenizer
    build = {"v1": (lambda d: vllm_parity._build_checkpoint(d, False, tokenizer, language), ["model.projector"]),
             "ocr2": (lambda d: vllm_parity_ocr2.build_checkpoint(d, language=language),
                      ["model.multi_modal_projector"])}
    merged = {}
    for seed, (name, (make, projector)) in enumerate(build.items(), vllm_parity.SEED + 10):
        base, adapter, merged[name] = out / f"base-{name}", out / f"adapter-{name}", out / f"merged-{name}"
        for folder, step in ((base, lambda: make(base)),
                             (adapter, lambda: vllm_parity._write_adapter(base, adapter, "all", projector, seed)),
                             (merged[name], lambda: export_merged(adapter, merged[name]))):
            if not folder.exists():
                t0 = time.perf_counter()
                step()
                print(f"[inputs] {folder.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    pages = [out / p["file"] for p in vllm_parity._draw_pages(out)]
    return merged, pages


def inputs(out: Path) -> None:
    import torch
    from PIL import Image

    from finetune.models import load_model
    from finetune.sequence import builder_for

    out.mkdir(parents=True, exist_ok=True)
    models, pages = _checkpoints(out)
    for name, folder in models.items():
        resolved, model, processor = load_model(str(folder))
        family = resolved.family
        model.eval()
        vision = family.vision_settings(processor, "gundam")
        builder = builder_for(family, processor, model.config, PROMPT, vision)
        rows = []
        for page in pages:
            image = Image.open(page).convert("RGB")
            ex = builder.build(page.stem, image)
            batch = builder.collate([ex])
            for key in ("ids", "labels"):
                batch.pop(key, None)
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = model(**batch).logits[0].float()
            ids = torch.tensor(ex.input_ids)
            pixels = ex.pixels
            tiles = pixels.get("pixel_values_local")
            # v1's tile grid (across, down), which its forward reshapes by; OCR-2's forward reads
            # none (its processor output has only the tile count, kept here as (count, 1)).
            grid = list(pixels.get("grid", (0 if tiles is None else len(tiles), 1)))
            if tiles is None:  # the remote code reads all-zero tiles as "no tiles"
                side = processor.image_processor.tile_size if name == "ocr2" else vision.image_size
                tiles = torch.zeros(1, 3, side, side)
            rows.append({"page": page.stem, "ids": ids, "mask": ids == builder.image_token_id,
                         "tiles": tiles.float(), "global": pixels["pixel_values"].float(), "grid": grid,
                         "logits": logits, "ocrtune_s": round(time.perf_counter() - t0, 1)})
            print(f"[inputs] {name} {page.stem}: {len(ids)} ids, grid {grid}, {rows[-1]['ocrtune_s']} s", flush=True)
        torch.save({"model": str(folder), "rows": rows}, out / f"inputs-{name}.pt")
        del model


# ------------------------------------------------------------------------------ remote

def _import_remote(code: Path, package: str, module: str):
    """The remote code's module, imported as `package` (its files import each other relatively;
    one package per family, as their files share names), from a private copy: nothing is
    written into `code`."""
    pkg = Path(tempfile.mkdtemp(prefix="remote-code-"))
    target = pkg / package
    target.mkdir()
    for file in code.glob("*.py"):
        shutil.copyfile(file, target / file.name)
    (target / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg))
    return importlib.import_module(f"{package}.{module}")


def remote(out: Path, codes: dict[str, Path]) -> None:
    import torch
    import transformers

    class HostMask(torch.Tensor):
        """The placeholder mask. The remote forward moves it with `.cuda()` before scattering the
        image features (the one device call in its forward); on a CPU it stays where it is."""

        def cuda(self, *args, **kwargs):
            return self

    for name, code in codes.items():
        module, config_cls, model_cls = REMOTE[name]
        data = torch.load(out / f"inputs-{name}.pt", weights_only=False)
        remote_mod = _import_remote(code, f"deepseek_remote_{name}", module)
        folder = data["model"]
        raw = json.loads((Path(folder) / "config.json").read_text())
        config = getattr(remote_mod, config_cls)(**raw)  # what its from_pretrained does with config.json
        t0 = time.perf_counter()
        model, info = getattr(remote_mod, model_cls).from_pretrained(folder, config=config, torch_dtype=torch.float32,
                                                                     output_loading_info=True)
        model.eval()
        load_s = round(time.perf_counter() - t0, 1)
        result = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                  "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "mismatched": [str(x) for x in info.get("mismatched_keys", [])], "load_s": load_s, "rows": []}
        for row in data["rows"]:
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = model(input_ids=row["ids"][None], images=[(row["tiles"], row["global"])],
                               images_seq_mask=row["mask"][None].as_subclass(HostMask),
                               images_spatial_crop=torch.tensor([row["grid"]])).logits[0].float()
            result["rows"].append({"page": row["page"], "logits": logits,
                                   "remote_s": round(time.perf_counter() - t0, 1)})
            print(f"[remote] {name} {row['page']}: {result['rows'][-1]['remote_s']} s", flush=True)
        torch.save(result, out / f"remote-{name}.pt")
        del model


# ------------------------------------------------------------------------------ compare

def compare(out: Path) -> int:
    import torch

    failures = 0
    print(f"{'model':<6}{'page':<8}{'max |gap|':>12}{'max |logit|':>13}{'relative':>11}  same argmax  tensors")
    for name in REMOTE:
        if not (out / f"remote-{name}.pt").is_file():
            continue
        ours = torch.load(out / f"inputs-{name}.pt", weights_only=False)
        theirs = torch.load(out / f"remote-{name}.pt", weights_only=False)
        missing = [k for k in theirs["missing"] if k not in BUFFERS]
        loaded = "all read" if not (missing or theirs["unexpected"] or theirs["mismatched"]) else (
            f"missing {missing[:3]}, unexpected {theirs['unexpected'][:3]}, mismatched {theirs['mismatched'][:3]}")
        failures += loaded != "all read"
        for a, b in zip(ours["rows"], theirs["rows"], strict=True):
            gap = (a["logits"] - b["logits"]).abs().max().item()
            scale = a["logits"].abs().max().item()
            same = (a["logits"].argmax(-1) == b["logits"].argmax(-1)).float().mean().item()
            failures += gap / scale > REL_TOL
            print(f"{name:<6}{a['page']:<8}{gap:>12.3e}{scale:>13.3f}{gap / scale:>11.1e}  {same:>10.1%}   {loaded}")
        print(f"       remote code on torch {theirs['versions']['torch']}, transformers "
              f"{theirs['versions']['transformers']}; load {theirs['load_s']} s")
    print("all equal" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    i = sub.add_parser("inputs")
    i.add_argument("out", type=Path)
    r = sub.add_parser("remote")
    r.add_argument("out", type=Path)
    r.add_argument("--code", action="append", required=True, help="v1=DIR or ocr2=DIR: the remote code's .py files")
    c = sub.add_parser("compare")
    c.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.step == "inputs":
        inputs(args.out)
    elif args.step == "remote":
        remote(args.out, _pairs(args.code, "--code"))
    else:
        return compare(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
