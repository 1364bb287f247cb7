"""DeepSeek-OCR-2 pages -> views, through transformers' own image processor.

The vision model emits a fixed number of query tokens per view
(144 for a <=144-patch view, else 256); the placeholder count per image is computed
from the processor's patch size and downsample ratio, exactly as transformers'
processor does, plus one view separator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class VisionSettings:
    """How one page becomes views: a global view, plus tiles when crop_to_patches."""

    crop_to_patches: bool  # tile pages larger than one tile into local views
    min_tiles: int
    max_tiles: int

    @property
    def mode(self) -> str:
        """The family's mode these settings amount to (base or gundam): tiles or not."""
        return "gundam" if self.crop_to_patches else "base"

    def as_dict(self) -> dict:
        # The mode is recorded with adapters and reports, so inference reuses it as trained.
        return asdict(self) | {"mode": self.mode}


def placeholders_per_image(processor, num_local_patches: int) -> int:
    """Image placeholder ids for one image: global view + tiles + one view separator."""
    ip = processor.image_processor
    per_view = math.ceil(ip.size["height"] / processor.patch_size / processor.downsample_ratio)
    per_tile = math.ceil(ip.tile_size / processor.patch_size / processor.downsample_ratio)
    return per_view * per_view + per_tile * per_tile * num_local_patches + 1


def encode_image(processor, image, vision: VisionSettings) -> tuple[dict, int]:
    """Pixel tensors for one RGB page and its placeholder count."""
    out = processor.image_processor(
        [image],
        crop_to_patches=vision.crop_to_patches,
        min_patches=vision.min_tiles,
        max_patches=vision.max_tiles,
        return_tensors="pt",
    )
    n_local = int(out["num_local_patches"][0])
    pixels = {
        "pixel_values": out["pixel_values"],
        "pixel_values_local": out.get("pixel_values_local"),
        "num_local_patches": n_local,
    }
    return pixels, placeholders_per_image(processor, n_local)


def collate_pixels(items: list[dict]) -> dict:
    """Batch the per-image tensors from `encode_image` in the layout the model's forward takes."""
    batch = {
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "num_local_patches": torch.tensor([it["num_local_patches"] for it in items], dtype=torch.long),
    }
    local = [it["pixel_values_local"] for it in items if it["pixel_values_local"] is not None]
    if local:
        batch["pixel_values_local"] = torch.cat(local)
    return batch
