"""Optional page preprocessing at build time, off by default and recorded in the card.

    ocrtune data build ... --deskew --binarize --upscale-min-side 512 --downscale-max-side 3000

Each step changes what the model sees, so the dataset card lists the steps applied and
evaluation data should be built with the same ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from data_prep.errors import InputError


@dataclass(frozen=True)
class Preprocess:
    deskew: bool = False  # straighten pages tilted by up to `max_skew_deg` (projection profile)
    binarize: bool = False  # Otsu threshold to black ink on white: removes paper texture, also faint ink
    upscale_min_side: int = 0  # enlarge images whose shorter side is below this (0 = never)
    downscale_max_side: int = 0  # shrink images whose longer side is above this (0 = never)
    max_skew_deg: float = 5.0

    def __post_init__(self):
        for name in ("upscale_min_side", "downscale_max_side"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be 0 (off) or positive")
        if self.upscale_min_side and self.downscale_max_side and self.upscale_min_side > self.downscale_max_side:
            raise InputError("--upscale-min-side is larger than --downscale-max-side: no size satisfies both")

    @property
    def active(self) -> bool:
        return bool(self.deskew or self.binarize or self.upscale_min_side or self.downscale_max_side)

    def describe(self) -> dict:
        return asdict(self)

    def apply(self, im: Image.Image) -> tuple[Image.Image, list[str]]:
        """The processed image and what was done to it."""
        done = []
        if self.deskew:
            angle = skew_angle(im, self.max_skew_deg)
            if abs(angle) >= 0.25:
                im = im.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
                done.append(f"deskewed by {angle:+.1f} deg")
        if self.binarize:
            grey = np.asarray(im.convert("L"))
            t = otsu_threshold(grey)
            im = Image.fromarray(np.where(grey > t, 255, 0).astype(np.uint8), "L").convert("RGB")
            done.append(f"binarized at {t}")
        short, long = min(im.size), max(im.size)
        if self.upscale_min_side and short < self.upscale_min_side:
            scale = self.upscale_min_side / short
            if self.downscale_max_side:
                scale = min(scale, self.downscale_max_side / long)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            done.append(f"upscaled x{scale:.2f}")
        elif self.downscale_max_side and long > self.downscale_max_side:
            scale = self.downscale_max_side / long
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
            done.append(f"downscaled x{scale:.2f}")
        return im, done


def otsu_threshold(grey: np.ndarray) -> int:
    """The grey level that best separates ink from paper (maximal between-class variance)."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1] / total
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))


def skew_angle(im: Image.Image, max_deg: float, step: float = 0.25) -> float:
    """Rotation (degrees, counter-clockwise) that makes text lines horizontal.

    Text lines straightened give the sharpest row profile: the angle whose rotated ink
    has the largest variance of row sums wins. Works on a <= 800 px copy for speed.
    """
    small = im.convert("L")
    small.thumbnail((800, 800))
    grey = np.asarray(small)
    ink = Image.fromarray(np.where(grey < otsu_threshold(grey), 255, 0).astype(np.uint8), "L")
    best, best_score = 0.0, -1.0
    for angle in np.arange(-max_deg, max_deg + 1e-9, step):
        rows = np.asarray(ink.rotate(float(angle), resample=Image.NEAREST, expand=True), dtype=np.float64).sum(axis=1)
        score = float(np.var(rows))
        if score > best_score:
            best, best_score = float(angle), score
    return best
