"""Safe image loading: refuse bombs before decode, reject broken files, normalise modes.

Every image that enters a dataset goes through `load_image`, so training, evaluation
and prediction all see pixels prepared the same way.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")

# 100 megapixels: a 600-dpi A3 scan is ~70 MP; anything larger is almost certainly
# a mistake or a decompression bomb. Configurable per build (--max-pixels).
DEFAULT_MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a reader of the page would expect."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white paper, not black.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "CMYK":
        # JPEG CMYK from Adobe tools is stored inverted; PIL handles that on convert.
        return im.convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and normalise one image to upright RGB, or raise ImageError."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror}") from exc
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # The header gives the size before any pixel is decoded.
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels} "
                        "(decompression bomb guard; raise --max-pixels if the image is genuine)"
                    )
                im.load()  # a truncated file fails here, never silently padded
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image PIL can read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode ({exc})") from exc


def encode_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def pixel_hash(im: Image.Image) -> str:
    """Hash of decoded pixels: the same picture saved under another name or format hashes equal."""
    h = hashlib.sha256()
    h.update(f"{im.size}".encode())
    h.update(im.tobytes())
    return h.hexdigest()
