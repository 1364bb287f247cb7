"""Vision features computed once per training image and reused for the rest of the run.

When the vision tower and the projector are frozen (decoder LoRA) and no augmentation runs,
a page's image features are a pure function of its pixels: computing them again in every
epoch is wasted work (a third of a step for the demo's tiny v1 model on a CPU). The cache
holds them in memory, keyed by sample id, for one training run.

A batch whose samples are all cached takes their features; any other batch is encoded whole,
exactly as an uncached run encodes it, and its new samples are stored. So the first epoch is
computed as before, and later epochs differ from an uncached run only by the floating-point
effect of having encoded a page in another batch.
"""

from __future__ import annotations

from typing import Callable

import torch

IMAGE_INPUTS = ("pixel_values", "pixel_values_local", "images_spatial_crop")


def unsupported(model_type: str) -> str | None:
    """Why a family cannot cache (None if it can): the features come from the model's own
    `image_features`, which ocrtune's native v1 model has and transformers' OCR-2 does not."""
    if model_type != "deepseek_ocr":
        return f"train.cache_vision_features: supported for DeepSeek-OCR (v1) only, not {model_type}"
    return None


class VisionFeatureCache:
    def __init__(self, image_features: Callable[..., list[torch.Tensor]]):
        """`image_features(pixel_values, pixel_values_local, images_spatial_crop)` -> one
        [placeholders, hidden] tensor per image (the model's own, frozen)."""
        self.image_features = image_features
        self.store: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def inputs(self, batch: dict) -> dict:
        """The batch with its image inputs replaced by `image_features` (one tensor per sample)."""
        ids = batch["ids"]
        if all(i in self.store for i in ids):
            features = [self.store[i] for i in ids]
            self.hits += len(ids)
        else:
            with torch.no_grad():
                features = [f.detach() for f in self.image_features(*(batch.get(k) for k in IMAGE_INPUTS))]
            for i, f in zip(ids, features):
                if i not in self.store:
                    self.store[i] = f
                    self.misses += 1
                else:
                    self.hits += 1
        return {k: v for k, v in batch.items() if k not in IMAGE_INPUTS} | {"image_features": features}

    def summary(self) -> dict:
        nbytes = sum(t.numel() * t.element_size() for t in self.store.values())
        return {"images": len(self.store), "hits": self.hits, "misses": self.misses, "bytes": nbytes}
