"""DeepSeek-OCR (v1) processor: the tokenizer plus processor_config.json, and pages -> views.

Resolution modes (base view size, tile size, tiling), as in the official inference config:

    tiny    512, squashed to a square      64 vision tokens   (8 x 9 + 1 = 73 ids)
    small   640, squashed                  100                (10 x 11 + 1 = 111)
    base    1024, padded with mean grey    256                (16 x 17 + 1 = 273)
    large   1280, padded                   400                (20 x 21 + 1 = 421)
    gundam  1024 padded + w x h tiles of 640 (min 2, max 6 tiles by aspect ratio; pages
            within one tile on both sides get none): 256 + 100 w h vision tokens,
            273 + (10 w + 1) x 10 h ids

Views are normalised with mean = std = 0.5. A view of g x g tokens takes g rows of g + 1
ids (a newline closes each row); tiles form one (g h) x (g w + 1) block before the
global view; one separator id ends the image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from finetune.models.family import ModelNameError
from finetune.models.views import padded_view, tiles, to_tensor

PROCESSOR_FILE = "processor_config.json"
IMAGE_TOKEN = "<image>"


# mode -> (base view size, tile size, squash instead of pad, tiles)
OFFICIAL_MODES = {
    "tiny": (512, 512, True, False),
    "small": (640, 640, True, False),
    "base": (1024, 1024, False, False),
    "large": (1280, 1280, False, False),
    "gundam": (1024, 640, False, True),
}


@dataclass(frozen=True)
class VisionSettings:
    mode: str
    base_size: int
    image_size: int  # tile size
    squash: bool  # resize to a square (tiny, small) instead of padding with mean grey
    crop_to_patches: bool  # tile pages larger than one tile (gundam)
    min_tiles: int
    max_tiles: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DeepseekOcrProcessor:
    """Tokenizer + the image settings of processor_config.json (official keys: patch_size,
    downsample_ratio, image_mean, image_std; ocrtune keys: modes, default_mode, min_crops,
    max_crops, each defaulting to the official inference config)."""

    tokenizer: object
    patch_size: int = 16
    downsample_ratio: int = 4
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    modes: dict = field(default_factory=lambda: dict(OFFICIAL_MODES))
    default_mode: str = "gundam"
    min_crops: int = 2
    max_crops: int = 6
    image_token: str = IMAGE_TOKEN

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DeepseekOcrProcessor":
        from transformers import AutoTokenizer, PreTrainedConfig

        folder = Path(folder)
        # config= keeps AutoTokenizer from reading config.json, whose model_type
        # (deepseek_vl_v2) transformers does not know; the tokenizer files say what they are.
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=PreTrainedConfig())
        raw = {}
        if (folder / PROCESSOR_FILE).is_file():
            raw = json.loads((folder / PROCESSOR_FILE).read_text())
        modes = {k: tuple(v) for k, v in raw.get("modes", OFFICIAL_MODES).items()}
        default = raw.get("default_mode", "gundam")
        if default not in modes:
            raise ModelNameError(f"{folder / PROCESSOR_FILE}: default_mode {default!r} is not one of {sorted(modes)}")
        return cls(tokenizer, int(raw.get("patch_size", 16)), int(raw.get("downsample_ratio", 4)),
                   tuple(raw.get("image_mean", (0.5,) * 3)), tuple(raw.get("image_std", (0.5,) * 3)), modes, default,
                   int(raw.get("min_crops", 2)), int(raw.get("max_crops", 6)))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(str(folder))
        (folder / PROCESSOR_FILE).write_text(json.dumps({
            "processor_class": "DeepseekVLV2Processor", "patch_size": self.patch_size,
            "downsample_ratio": self.downsample_ratio, "image_mean": list(self.image_mean),
            "image_std": list(self.image_std), "image_token": self.image_token,
            "modes": {k: list(v) for k, v in self.modes.items()}, "default_mode": self.default_mode,
            "min_crops": self.min_crops, "max_crops": self.max_crops}, indent=2) + "\n")

    def tokens_per_side(self, size: int) -> int:
        return math.ceil(size / self.patch_size / self.downsample_ratio)


def settings_for_mode(processor: DeepseekOcrProcessor, mode: str) -> VisionSettings:
    base, tile, squash, tiles = processor.modes[mode]
    return VisionSettings(mode, int(base), int(tile), bool(squash), bool(tiles), processor.min_crops, processor.max_crops)


def encode_image(processor: DeepseekOcrProcessor, image: Image.Image, vision: VisionSettings) -> tuple[dict, int]:
    """Pixel tensors for one RGB page and its placeholder count."""
    image = image.convert("RGB")
    grid, local = tiles(image, vision.image_size, vision.crop_to_patches, vision.min_tiles, vision.max_tiles,
                        processor.image_mean, processor.image_std)
    if vision.squash:
        view = image.resize((vision.base_size, vision.base_size), Image.BICUBIC)
    else:
        view = padded_view(image, vision.base_size, processor.image_mean)
    pixels = {"pixel_values": to_tensor(view, processor.image_mean, processor.image_std)[None],
              "pixel_values_local": local, "grid": grid}
    return pixels, placeholders(processor, vision, grid)


def placeholders(processor: DeepseekOcrProcessor, vision: VisionSettings, grid: tuple[int, int]) -> int:
    g = processor.tokens_per_side(vision.base_size)
    n = g * (g + 1) + 1
    if grid != (1, 1):
        t = processor.tokens_per_side(vision.image_size)
        n += (t * grid[0] + 1) * (t * grid[1])
    return n


def vision_tokens(processor: DeepseekOcrProcessor, vision: VisionSettings, grid: tuple[int, int]) -> int:
    """Vision tokens (newlines and separator excluded) for a page tiled as `grid`."""
    g, t = processor.tokens_per_side(vision.base_size), processor.tokens_per_side(vision.image_size)
    return g * g + (t * t * grid[0] * grid[1] if grid != (1, 1) else 0)


def collate_pixels(items: list[dict]) -> dict:
    batch = {
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "images_spatial_crop": torch.tensor([it["grid"] for it in items], dtype=torch.long),
    }
    local = [it["pixel_values_local"] for it in items if it["pixel_values_local"] is not None]
    if local:
        batch["pixel_values_local"] = torch.cat(local)
    return batch
