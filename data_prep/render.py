"""Render text lines as scan-like images: fonts from installed packages, spans in mixed
fonts, and augmentation that imitates a scanner (skew, blur, noise, uneven ink and paper).

Fonts are named by where they come from, so a spec works on any machine that has the
packages installed (nothing is downloaded):

    matplotlib:DejaVuSans-Bold.ttf     a font file shipped with matplotlib
    package:font_intuitive             every .ttf/.otf inside an installed Python package
    /path/to/MyHand.ttf                a font file of your own

Everything takes an explicit `random.Random`, so a seed reproduces every pixel.
"""

from __future__ import annotations

import functools
import importlib.resources
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data_prep.errors import OcrtuneError

# Printed text: matplotlib's DejaVu and STIX families (sans, serif, mono, bold, italic).
PRINTED_FONTS = (
    "matplotlib:DejaVuSans.ttf",
    "matplotlib:DejaVuSans-Oblique.ttf",
    "matplotlib:DejaVuSerif.ttf",
    "matplotlib:DejaVuSerif-Italic.ttf",
    "matplotlib:DejaVuSansMono.ttf",
    "matplotlib:STIXGeneral.ttf",
    "matplotlib:STIXGeneralItalic.ttf",
)
# Bold printed text: what Markdown **labels** look like on a printed form.
BOLD_FONTS = (
    "matplotlib:DejaVuSans-Bold.ttf",
    "matplotlib:DejaVuSerif-Bold.ttf",
    "matplotlib:DejaVuSansMono-Bold.ttf",
    "matplotlib:STIXGeneralBol.ttf",
)
# Printed typefaces from Google Fonts, packaged on PyPI by fontpkg: serif, sans, slab, mono and
# condensed faces, so a base pretrained on them learns letter shapes rather than one family's quirks.
TYPESET_FONTS = tuple(
    f"package:fontpkg_{name}"
    for name in ("arimo", "bitter", "crimson_text", "eb_garamond", "inconsolata", "libre_baskerville", "nunito",
                 "open_sans", "oswald", "pt_sans", "pt_serif", "roboto", "roboto_slab", "source_serif_4",
                 "space_mono")
)
# Hand-drawn fonts published on PyPI (dependencies of ocrtune, for the demo domain).
HANDWRITING_FONTS = (
    "package:font_intuitive",
    "package:font_amatic_sc",
    "package:fontpkg_dancing_script",
    "package:fontpkg_permanent_marker",
)
# Fonts that draw lowercase letters as capitals (Amatic SC as small capitals, Permanent Marker
# as capitals): a line written in one reads as capitals, so its Markdown must say capitals;
# a mixed-case target would ask the model for a case the page does not show.
CAPITALS_ONLY = ("package:font_amatic_sc", "package:fontpkg_permanent_marker")


class FontError(OcrtuneError, ValueError):
    """A font spec that names no usable font file."""


@functools.lru_cache(maxsize=None)
def font_files(spec: str) -> tuple[Path, ...]:
    """The font files a spec names (see the module docstring)."""
    if spec.startswith("matplotlib:"):
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / spec.split(":", 1)[1]
        if not path.is_file():
            raise FontError(f"font {spec!r}: matplotlib has no {path.name}")
        return (path,)
    if spec.startswith("package:"):
        pkg = spec.split(":", 1)[1]
        try:
            root = importlib.resources.files(pkg)
        except ModuleNotFoundError:
            raise FontError(f"font {spec!r}: Python package {pkg!r} is not installed") from None
        found = sorted(Path(str(p)) for p in _walk(root) if p.name.lower().endswith((".ttf", ".otf")))
        if not found:
            raise FontError(f"font {spec!r}: package {pkg!r} contains no .ttf/.otf file")
        return tuple(found)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FontError(f"font {spec!r}: no such font file")
    return (path,)


def _walk(node):
    for child in node.iterdir():
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


@functools.lru_cache(maxsize=None)
def _cmap(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTFont  # matplotlib depends on fontTools

    with TTFont(str(path), lazy=True) as tt:
        return frozenset(tt.getBestCmap() or {})


def covers(path: Path, text: str) -> bool:
    """Whether the font has a glyph for every non-space character of `text`."""
    cmap = _cmap(path)
    return all(ord(ch) in cmap for ch in text if not ch.isspace())


@functools.lru_cache(maxsize=256)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def capitals_only(font: Path) -> bool:
    """Whether `font` is one of CAPITALS_ONLY's files."""
    return any(font in font_files(spec) for spec in CAPITALS_ONLY)


def pick_font(rng: random.Random, specs: tuple[str, ...], text: str) -> Path:
    """A random font file among `specs` that can draw `text`."""
    files = [f for s in specs for f in font_files(s)]
    usable = [f for f in files if covers(f, text)]
    if not usable:
        raise FontError(f"no font among {', '.join(specs)} has glyphs for {text!r}")
    return rng.choice(usable)


@dataclass(frozen=True)
class Span:
    """A run of text in one font file; `bold` only records what the Markdown should say."""

    text: str
    font: Path
    bold: bool = False


def text_mask(spans: list[Span], height: int, rng: random.Random) -> Image.Image:
    """Ink coverage (L mode, 255 = ink) of the spans on one baseline, with margins."""
    size = height
    widths = [_font(s.font, size).getlength(s.text) for s in spans]
    margin_x = int(size * rng.uniform(0.3, 1.2))
    margin_y = int(size * rng.uniform(0.25, 0.6))
    width = int(sum(widths)) + 2 * margin_x
    canvas = Image.new("L", (max(width, 4 * size), int(size * 1.45) + 2 * margin_y), 0)
    draw = ImageDraw.Draw(canvas)
    x = margin_x
    baseline = margin_y + int(size * 1.05)
    for span, w in zip(spans, widths):
        draw.text((x, baseline), span.text, font=_font(span.font, size), fill=255, anchor="ls")
        x += w
    return canvas


def text_glyph(text: str, font: Path, height: int) -> Image.Image:
    """Ink mask of `text` on a strip exactly `height` tall, baseline at 78% of it."""
    f = _font(font, max(int(height * 0.7), 4))
    im = Image.new("L", (max(int(f.getlength(text)) + 2, 1), height), 0)
    ImageDraw.Draw(im).text((1, int(height * 0.78)), text, font=f, fill=255, anchor="ls")
    return im


def paste_glyphs(glyphs: list[Image.Image], gaps: list[float], height: int, rng: random.Random) -> Image.Image:
    """Lay equal-height glyph masks (L, 255 = ink) side by side with jitter and margins."""
    margin_x = int(height * rng.uniform(0.3, 1.0))
    margin_y = int(height * rng.uniform(0.2, 0.45))
    width = 2 * margin_x + sum(g.width for g in glyphs) + int(sum(max(gap, 0) for gap in gaps))
    canvas = Image.new("L", (max(width, 3 * height), height + 2 * margin_y), 0)
    x = margin_x
    for g, gap in zip(glyphs, gaps):
        y = margin_y + int(rng.uniform(-0.05, 0.05) * height)
        canvas.paste(Image.new("L", g.size, 255), (x, y), g)
        x += g.width + int(gap)
    return canvas


@dataclass(frozen=True)
class Augment:
    """Scan-like degradation; each knob is the upper end of a uniform draw per image.

    `light` suits clean printed pages, `scan` a phone photo or a cheap scanner.
    """

    rotate_deg: float  # page rotation, both directions
    shear: float  # horizontal slant of the line (handwriting slants; so do skewed scans)
    blur: float  # Gaussian blur radius in pixels
    noise: float  # std of per-pixel Gaussian noise, 0-255 scale
    ink_fade: float  # how much ink intensity may fade across the line (0 = even ink)
    paper_shade: float  # strength of a low-frequency brightness gradient on the paper


LIGHT = Augment(rotate_deg=1.0, shear=0.05, blur=0.6, noise=6.0, ink_fade=0.15, paper_shade=0.05)
SCAN = Augment(rotate_deg=3.0, shear=0.25, blur=1.2, noise=14.0, ink_fade=0.45, paper_shade=0.2)
AUGMENTS = {"none": None, "light": LIGHT, "scan": SCAN}


def _smooth_field(rng: random.Random, shape: tuple[int, int]) -> np.ndarray:
    """A smooth random field in [0, 1]: a 3x3 grid of random values, bilinearly upsampled."""
    grid = np.array([[rng.random() for _ in range(3)] for _ in range(3)], dtype=np.float32)
    im = Image.fromarray((grid * 255).astype(np.uint8), "L").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def compose(mask: Image.Image, rng: random.Random, augment: Augment | None) -> Image.Image:
    """Ink mask -> RGB page: geometry first, then ink and paper, then sensor blur and noise."""
    if augment is not None:
        shear = rng.uniform(-augment.shear, augment.shear)
        if shear:
            w, h = mask.size
            pad = int(abs(shear) * h) + 1
            wide = Image.new("L", (w + 2 * pad, h), 0)
            wide.paste(mask, (pad, 0))
            mask = wide.transform(wide.size, Image.AFFINE, (1, shear, -shear * h / 2, 0, 1, 0), Image.BILINEAR)
        angle = rng.uniform(-augment.rotate_deg, augment.rotate_deg)
        if angle:
            mask = mask.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=0)
    alpha = np.asarray(mask, dtype=np.float32) / 255.0
    h, w = alpha.shape
    ink = np.array([rng.uniform(0, 60), rng.uniform(0, 60), rng.uniform(0, 90)], dtype=np.float32)
    paper = np.array([rng.uniform(225, 255) for _ in range(3)], dtype=np.float32)
    if augment is not None:
        alpha = alpha * (1.0 - augment.ink_fade * _smooth_field(rng, (h, w)))
        shade = 1.0 - augment.paper_shade * _smooth_field(rng, (h, w))
    else:
        shade = np.ones((h, w), dtype=np.float32)
    page = paper[None, None, :] * shade[..., None]
    out = page * (1.0 - alpha[..., None]) + ink[None, None, :] * alpha[..., None]
    im = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    if augment is not None:
        radius = rng.uniform(0, augment.blur)
        if radius > 0.2:
            im = im.filter(ImageFilter.GaussianBlur(radius))
        sigma = rng.uniform(0, augment.noise)
        if sigma > 0.5:
            noise = np.random.default_rng(rng.getrandbits(32)).normal(0, sigma, (h, w, 1))
            im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")
    return im
