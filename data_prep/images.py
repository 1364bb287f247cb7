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

from data_prep.errors import OcrtuneError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")

# 100 megapixels: a 600-dpi A3 scan is ~70 MP; anything larger is almost certainly
# a mistake or a decompression bomb. Configurable per build (--max-pixels).
DEFAULT_MAX_PIXELS = 100_000_000


class ImageError(OcrtuneError, ValueError):
    """An image that cannot be used; the message says why."""


# What each decoder's format is usually called on disk, to notice a misnamed file.
_EXTENSIONS_OF = {
    "PNG": (".png",), "JPEG": (".jpg", ".jpeg", ".jpe"), "TIFF": (".tif", ".tiff"), "BMP": (".bmp",),
    "WEBP": (".webp",), "GIF": (".gif",),
}


def _to_rgb(im: Image.Image, fixes: list[str]) -> Image.Image:
    """Convert any PIL mode to RGB the way a reader of the page would expect; say what changed."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        fixes.append(f"{im.mode} grey scaled to 8 bits")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "P":
        fixes.append("palette image converted to RGB")
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white paper, not black.
        fixes.append(f"{im.mode} composited on white")
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "CMYK":
        # JPEG CMYK from Adobe tools is stored inverted; PIL handles that on convert.
        fixes.append("CMYK converted to RGB")
        return im.convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def load_image(src: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and normalise one image to upright RGB, or raise ImageError."""
    return open_image(src, max_pixels)[0]


def open_image(src: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """Like `load_image`, and also the list of repairs made (for the build report).

    `src` is a file path or the encoded bytes of an image (Hugging Face datasets, rendered
    PDF pages); both go through the same checks.
    """
    fixes: list[str] = []
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError("empty image (0 bytes)")
        fp, suffix = io.BytesIO(src), None
    else:
        path = Path(src)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageError(f"cannot read: {exc.strerror}") from exc
        if size == 0:
            raise ImageError("empty file (0 bytes)")
        fp, suffix = path, path.suffix.lower()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                # The header gives the size before any pixel is decoded.
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"{width}x{height} = {width * height} pixels exceeds the cap of {max_pixels} "
                        "(decompression bomb guard; raise --max-pixels if the image is genuine)"
                    )
                if suffix and im.format in _EXTENSIONS_OF and suffix not in _EXTENSIONS_OF[im.format]:
                    fixes.append(f"named {suffix} but holds {im.format}; decoded by content")
                im.load()  # a truncated file fails here, never silently padded
                orientation = im.getexif().get(0x0112, 1)
                if orientation not in (1, None):
                    fixes.append(f"EXIF orientation {orientation} applied")
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im, fixes), fixes
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image PIL can read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode ({exc})") from exc


def encode_png(im: Image.Image) -> bytes:
    """Lossless PNG at zlib level 1: a dataset build is bound by this encode, and level 6
    takes ~3x longer for files that are at most a few tenths smaller (noisy scans: none)."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


NEAR_HASH_SIZE = (65, 32)  # thumbnail: fine enough that two different text lines differ
NEAR_HASH_BITS = 2 * 64 * 32


def near_hash(im: Image.Image) -> int:
    """Edge signature for near-duplicate detection (rescans, recompression, resizing).

    The page is first cut to its ink (pixels darker than mid-grey), so margins and scan
    borders do not matter; then a grey 65x32 thumbnail (aspect ignored, so a text line keeps
    its detail); for each
    horizontal neighbour pair one bit for "clearly brighter to the right" and one for
    "clearly darker" (more than 12 grey levels). Flat paper sets no bits, so JPEG noise
    and paper tint do not count; strokes do.
    """
    grey = im.convert("L")
    box = grey.point(lambda v: 255 if v < 128 else 0).getbbox()
    if box:
        grey = grey.crop(box)
    small = np.asarray(grey.resize(NEAR_HASH_SIZE, Image.BILINEAR), dtype=np.int16)
    diff = small[:, 1:] - small[:, :-1]
    bits = np.concatenate([(diff > 12).ravel(), (diff < -12).ravel()])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def pixel_hash(im: Image.Image) -> str:
    """Hash of decoded pixels: the same picture saved under another name or format hashes equal."""
    h = hashlib.sha256()
    h.update(f"{im.size}".encode())
    h.update(im.tobytes())
    return h.hexdigest()
