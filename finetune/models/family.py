"""What every model family implements: the one interface the entry points talk to.

A family is a class with a few constants (what its checkpoints say in config.json, where its
modules live, which resolution modes it has) and the methods below. Train, eval, predict,
serve and the feature cache call these and nothing else of a family; the family's own
package (processor, modeling, checkpoint conversion) stays behind it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from finetune.errors import OcrtuneError


class ModelNameError(OcrtuneError, ValueError):
    """A model name or checkpoint that resolves to nothing usable; the message says what was tried."""


class VisionModeError(OcrtuneError, ValueError):
    """A resolution mode the family does not have."""


@dataclass(frozen=True)
class DecoderLayout:
    """Where things live in a family's module tree; the LoRA resolver and the ledger read this."""

    decoder_layers: str  # + .N.
    attention: tuple[str, ...]
    dense_mlp: tuple[str, ...]
    shared_experts: tuple[str, ...]
    routed_expert_modules: str  # a regex of per-expert Linear modules, or "" when experts are fused
    routed_expert_params: tuple[str, ...]  # fused 3-D expert parameters, reached as parameters
    router: str
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    # Optional trainable extras (lora.train_projector, lora.vision_lora).
    projector_modules: tuple[str, ...]
    vision_lora: str
    # Fused expert parameter (leaf under mlp.experts) -> the published per-expert Linear names
    # it stacks along its output rows, in order: adapters are stored per expert, as published.
    fused_experts: tuple[tuple[str, tuple[str, ...]], ...] = ()


class ModelFamily(ABC):
    """One model family. Instances hold no state: the registry keeps one of each."""

    MODEL_TYPE: ClassVar[str]  # ocrtune's name for the family, recorded in adapters and reports
    CONFIG_MODEL_TYPES: ClassVar[tuple[str, ...]]  # config.json model_type values it reads
    # config.json architectures naming this family, for a model_type two families share
    # (deepseek_vl_v2: DeepSeek-OCR's and DeepSeek-OCR-2's published configs).
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ()
    MODES: ClassVar[tuple[str, ...]]  # resolution modes (vision.mode); checked without weights
    LAYOUT: ClassVar[DecoderLayout]
    # (ocrtune's module prefix, the published checkpoint's) where the two trees name a module
    # differently; adapters are written with the published names, the layout other tools share.
    PUBLISHED_PREFIXES: ClassVar[tuple[tuple[str, str], ...]] = ()
    # True: adapter_config.json's targets are read as published names and mapped onto ocrtune's
    # modules when loading (so adapters from other tools load too). False: PEFT loads it as is.
    ADAPTER_CONFIG_PUBLISHED: ClassVar[bool] = False
    # Hub ids published in a layout this family does not read -> the same weights in one it does.
    HUB_ALIASES: ClassVar[dict[str, str]] = {}

    def check_config(self, raw: dict, where: str) -> None:
        """Raise ModelNameError when a config.json with one of CONFIG_MODEL_TYPES is a variant
        this family cannot run (checked before any weight is read)."""

    @abstractmethod
    def load(self, path: str | Path, dtype=None, device=None) -> tuple[Any, Any]:
        """(model, processor) from a checkpoint folder; the processor has `.tokenizer`."""

    @abstractmethod
    def save_full(self, model, folder: Path, state_dict: dict | None = None) -> None:
        """The whole model (weights and config.json) in the family's published layout, the one
        vLLM and the published checkpoint's own code load; `state_dict` as gathered under
        FSDP/DeepSpeed, else the model's. Tokenizer and processor files are the caller's."""

    @abstractmethod
    def load_processor(self, path: str | Path):
        """The processor alone (tokenizer + image settings), no weights: for engines that load
        the weights themselves (vLLM)."""

    @abstractmethod
    def vision_settings(self, processor, mode: str | None = None, crop_to_patches: bool | None = None,
                        min_tiles: int | None = None, max_tiles: int | None = None):
        """The config's vision section (or an adapter's recorded one) -> the settings
        `encode_image` takes, in one step: `mode` (None = the checkpoint's default) first,
        then each knob that is not None. Raises VisionModeError for a mode not in MODES.
        The result has `.mode` and `.as_dict()` (recorded with adapters)."""

    @abstractmethod
    def encode_image(self, processor, image, vision) -> tuple[dict, int]:
        """(pixel tensors for one RGB page, its number of image placeholder ids)."""

    @abstractmethod
    def collate_pixels(self, items: list[dict]) -> dict:
        """Batch `encode_image` outputs in the layout the model's forward takes."""

    def published_checkpoint(self, path: Path, scratch: Path) -> Path:
        """A checkpoint folder in the family's published layout (what vLLM loads): `path` itself
        when it is one, else a converted copy written to `scratch`. Every folder a family reads
        is published unless it overrides this."""
        return Path(path)

    def published_module_name(self, native: str) -> tuple[str, bool]:
        """(the published checkpoint's name for ocrtune's module `native`, whether it is the same
        module there). False: `native` is part of a fused module upstream (v1's CLIP q/k/v are
        one qkv_proj), so a LoRA on one cannot be written as a LoRA on the other."""
        for ours, theirs in self.PUBLISHED_PREFIXES:
            if (native + ".").startswith(ours):
                return (theirs + (native + ".")[len(ours):])[:-1], True
        return native, True

    def adapter_key_to_disk(self, key: str) -> str:
        """A PEFT state-dict key (`base_model.model.<module>.<leaf>`) -> its name on disk."""
        head, rest = _split_peft_key(key)
        for ours, theirs in self.PUBLISHED_PREFIXES:
            if rest.startswith(ours):
                return head + theirs + rest[len(ours):]
        return key

    def adapter_key_from_disk(self, key: str) -> str:
        """Undoes `adapter_key_to_disk`; a key already in ocrtune's names stays as it is."""
        head, rest = _split_peft_key(key)
        for ours, theirs in self.PUBLISHED_PREFIXES:
            if rest.startswith(theirs):
                return head + ours + rest[len(theirs):]
        return key

    def experts_implementation(self, model) -> str | None:
        """How `model`'s routed experts run on its device and dtype (recorded in
        train_summary.json); None for a family without routed experts."""
        return None

    def image_token_id(self, model_config) -> int:
        return int(model_config.image_token_id)

    def __repr__(self) -> str:
        return f"<model family {self.MODEL_TYPE}>"


def _split_peft_key(key: str) -> tuple[str, str]:
    head = "base_model.model."
    return (head, key[len(head):]) if key.startswith(head) else ("", key)


def copy_side_files(source: Path, dest: Path) -> None:
    """A checkpoint folder's files other than its weights and config.json (tokenizer,
    processor, generation config, a published checkpoint's code), copied byte for byte: files
    re-saved through another transformers release can lose settings (whether the tokenizer
    adds BOS), and the code files let the published loader read weights kept in its names."""
    import shutil

    for file in sorted(Path(source).iterdir()):
        weights = file.name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
        if file.is_file() and not file.name.startswith(".") and file.name != "config.json" and not weights:
            shutil.copyfile(file, Path(dest) / file.name)
