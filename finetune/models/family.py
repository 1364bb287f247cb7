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


class ModelFamily(ABC):
    """One model family. Instances hold no state: the registry keeps one of each."""

    MODEL_TYPE: ClassVar[str]  # ocrtune's name for the family, recorded in adapters and reports
    CONFIG_MODEL_TYPES: ClassVar[tuple[str, ...]]  # config.json model_type values it reads
    MODES: ClassVar[tuple[str, ...]]  # resolution modes (vision.mode); checked without weights
    LAYOUT: ClassVar[DecoderLayout]
    # (prefix in memory, prefix on disk) for adapter keys: applied when saving, undone when loading.
    ADAPTER_DISK_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Hub ids published in a layout this family does not read -> the same weights in one it does.
    HUB_ALIASES: ClassVar[dict[str, str]] = {}

    def check_config(self, raw: dict, where: str) -> None:
        """Raise ModelNameError when a config.json with one of CONFIG_MODEL_TYPES is a variant
        this family cannot run (checked before any weight is read)."""

    @abstractmethod
    def load(self, path: str | Path, dtype=None, device=None) -> tuple[Any, Any]:
        """(model, processor) from a checkpoint folder; the processor has `.tokenizer`."""

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

    def image_token_id(self, model_config) -> int:
        return int(model_config.image_token_id)

    def __repr__(self) -> str:
        return f"<model family {self.MODEL_TYPE}>"
