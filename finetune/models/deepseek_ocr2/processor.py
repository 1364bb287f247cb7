"""DeepSeek-OCR-2 pages -> views, with the settings of transformers' image processor (view
and tile sizes, tile limits, mean and std) and DeepSeek's own rules (finetune/models/views.py):
a global view of the processor's size padded to a square, and in gundam mode tiles by aspect
ratio. In base mode the global view keeps that size: transformers' processor makes it at the
tile size there (768 on the real model, 144 query tokens) while counting 256 placeholders for
it, which the real model refuses.

The vision model emits a fixed number of query tokens per view (144 for a <=144-patch view,
else 256); the placeholder count per image is computed from the processor's patch size and
downsample ratio, plus one view separator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from finetune.models.views import padded_view, tiles, to_tensor


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
    ip = processor.image_processor
    image = image.convert("RGB")
    _, local = tiles(image, int(ip.tile_size), vision.crop_to_patches, vision.min_tiles, vision.max_tiles,
                     ip.image_mean, ip.image_std)
    view = padded_view(image, int(ip.size["height"]), ip.image_mean)
    pixels = {
        "pixel_values": to_tensor(view, ip.image_mean, ip.image_std)[None],
        "pixel_values_local": local,
        "num_local_patches": 0 if local is None else len(local),
    }
    return pixels, placeholders_per_image(processor, pixels["num_local_patches"])


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
