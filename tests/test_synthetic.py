"""data_prep.render and data_prep.synthetic: fonts from packages, reproducible rendering,
digit-scan shards kept inside one split."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from datasets import load_from_disk

from data_prep.build import build_dataset
from data_prep.render import (
    BOLD_FONTS,
    CAPITALS_ONLY,
    HANDWRITING_FONTS,
    PRINTED_FONTS,
    TYPESET_FONTS,
    FontError,
    Span,
    capitals_only,
    compose,
    font_files,
    pick_font,
    text_mask,
)
from data_prep.synthetic import DigitScans, generate


@pytest.mark.parametrize("spec", PRINTED_FONTS + TYPESET_FONTS + BOLD_FONTS + HANDWRITING_FONTS)
def test_every_shipped_font_spec_resolves_to_files(spec):
    files = font_files(spec)
    assert files and all(f.is_file() and f.suffix.lower() in (".ttf", ".otf") for f in files)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("package:no_such_font_pkg", "is not installed"),
        ("matplotlib:NoSuchFont.ttf", "matplotlib has no NoSuchFont.ttf"),
        ("/nonexistent/Hand.ttf", "no such font file"),
        ("package:json", "contains no .ttf/.otf"),
    ],
)
def test_bad_font_specs_are_named(spec, message):
    with pytest.raises(FontError, match=message):
        font_files(spec)


def test_pick_font_refuses_text_no_font_can_draw():
    with pytest.raises(FontError, match="no font among"):
        pick_font(random.Random(0), HANDWRITING_FONTS, "漢字")


def test_compose_without_augmentation_has_flat_paper_and_ink():
    rng = random.Random(3)
    font = font_files(PRINTED_FONTS[0])[0]
    mask = text_mask([Span("Total 12", font)], 30, rng)
    im = compose(mask, rng, None)
    pixels = np.asarray(im).reshape(-1, 3)
    alpha = np.asarray(mask).reshape(-1)
    assert im.size == mask.size and im.mode == "RGB"
    assert len(np.unique(pixels[alpha == 0], axis=0)) == 1  # one paper colour, no noise or shading
    assert len(np.unique(pixels[alpha == 255], axis=0)) == 1  # one ink colour


def test_generate_is_reproducible_and_seed_dependent(tmp_path):
    a = generate("handwriting", 24, 5, tmp_path / "a", progress=False)
    b = generate("handwriting", 24, 5, tmp_path / "b", progress=False)
    c = generate("handwriting", 24, 6, tmp_path / "c", progress=False)
    assert (a / "manifest.jsonl").read_text() == (b / "manifest.jsonl").read_text()
    for i in range(24):
        assert (a / f"images/{i:05d}.png").read_bytes() == (b / f"images/{i:05d}.png").read_bytes()
    assert (a / "manifest.jsonl").read_text() != (c / "manifest.jsonl").read_text()
    rows = [json.loads(x) for x in (a / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["markdown"].strip() for r in rows)
    assert len({r["id"] for r in rows}) == 24
    with pytest.raises(FileExistsError):
        generate("handwriting", 2, 5, tmp_path / "a", progress=False)


def test_shards_render_in_parallel_and_depend_on_shards_not_workers(tmp_path):
    one = generate("handwriting", 30, 5, tmp_path / "one", progress=False)
    par = generate("handwriting", 30, 5, tmp_path / "par", progress=False, shards=3, workers=3)
    seq = generate("handwriting", 30, 5, tmp_path / "seq", progress=False, shards=3, workers=1)
    manifest = lambda d: (d / "manifest.jsonl").read_text()  # noqa: E731
    assert manifest(par) == manifest(seq)
    assert all((par / f"images/{i:05d}.png").read_bytes() == (seq / f"images/{i:05d}.png").read_bytes()
               for i in range(30))
    # shard 0 has its own RNG, seeded by (seed, 0): not the single-stream lines
    assert manifest(par) != manifest(one)
    rows = [json.loads(x) for x in manifest(par).splitlines()]
    assert [r["id"] for r in rows] == [f"handwriting-{i:05d}" for i in range(30)]
    assert sorted(p.name for p in (par / "images").iterdir()) == [f"{i:05d}.png" for i in range(30)]
    with pytest.raises(ValueError, match="--shards 31"):
        generate("handwriting", 30, 5, tmp_path / "bad", progress=False, shards=31)
    assert not (tmp_path / "bad").exists()


def _glyph_iou(font, a: str, b: str) -> float:
    """Overlap of two characters' ink, each cropped to its box and scaled to 32x32."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    def mask(ch):
        im = Image.new("L", (192, 192), 0)
        ImageDraw.Draw(im).text((48, 24), ch, font=ImageFont.truetype(str(font), 96), fill=255)
        im = im.crop(im.getbbox()).resize((32, 32), Image.BILINEAR).filter(ImageFilter.MaxFilter(3))
        return np.asarray(im) > 64

    x, y = mask(a), mask(b)
    return float((x & y).sum() / (x | y).sum())


@pytest.mark.parametrize("spec", HANDWRITING_FONTS)
def test_capitals_only_lists_exactly_the_fonts_whose_lowercase_is_capitals(spec):
    # Scaled to the same box, 'a' and 'A' (and b/d/e/g/q/r) overlap >= 0.67 in Amatic SC and
    # Permanent Marker and <= 0.55 in the other hands.
    for font in font_files(spec):
        overlap = min(_glyph_iou(font, ch, ch.upper()) for ch in "abdegqr")
        assert capitals_only(font) == (spec in CAPITALS_ONLY) == (overlap > 0.6), (font.name, overlap)


def test_lines_in_capitals_only_fonts_have_capital_markdown(tmp_path):
    scans = generate("handwriting", 160, 3, tmp_path / "scans", progress=False)
    rows = [json.loads(x) for x in (scans / "manifest.jsonl").read_text().splitlines()]
    caps = {f.name for spec in CAPITALS_ONLY for f in font_files(spec)}

    def value(row):  # the written value, without a printed bold label
        return row["markdown"].split("** ", 1)[1] if row["markdown"].startswith("**") else row["markdown"]

    in_caps = [value(r) for r in rows if r["font"] in caps]
    others = [value(r) for r in rows if r["font"] not in caps]
    assert len(in_caps) > 30 and all(v == v.upper() for v in in_caps)
    assert sum(v != v.upper() for v in others) > 20  # lowercase stays where the font draws it (25)


def test_digit_scans_shards_cover_every_digit_and_partition_the_set():
    scans = DigitScans()
    seen = [i for shard in scans.shards for i in shard]
    assert seen == list(range(len(scans.targets)))  # every scan in exactly one shard
    for per_digit in scans.by_shard:
        assert all(per_digit[d] for d in range(10))


def test_digit_scan_shards_never_cross_splits(tmp_path):
    scans = generate("handwriting", 300, 0, tmp_path / "scans", progress=False)
    rows = [json.loads(x) for x in (scans / "manifest.jsonl").read_text().splitlines()]
    shard_rows = [r for r in rows if "digits_shard" in r]
    assert len(shard_rows) > 20 and all(r["group"] == f"digits-shard-{r['digits_shard']}" for r in shard_rows)
    build_dataset("manifest", scans / "manifest.jsonl", tmp_path / "data", test_fraction=0.2, progress=False)
    data = load_from_disk(str(tmp_path / "data"))
    owner = {}
    for split in data:
        for group in data[split]["group"]:
            owner.setdefault(group, set()).add(split)
    assert all(len(v) == 1 for v in owner.values())


def test_small_test_split_gets_its_share_of_big_groups():
    # The demo's shape: ~7,300 single lines and 29 digit shards of 94 lines. Sizes are split
    # by class, so each seed's 4% test split holds exactly one shard (94 of 2,726 shard lines)
    # and validation (2%) one; single lines fill the rest close to the fractions.
    from data_prep.split import assign_splits

    groups = [f"line-{i}" for i in range(7274)] + [f"shard-{k}" for k in range(29) for _ in range(94)]
    for seed in range(4):
        splits = assign_splits(groups, 0.02, 0.04, seed)
        in_shards = Counter(s for g, s in zip(groups, splits) if g.startswith("shard"))
        assert in_shards == {"train": 2538, "test": 94, "validation": 94}
        assert Counter(splits) == {"train": 9376, "test": 385, "validation": 239}
    # Too few records for the fraction: the split still gets the smallest group.
    assert Counter(assign_splits(["a"] * 5 + ["b"] * 5 + ["c"] * 5, 0.0, 0.1, 0)) == {"train": 10, "test": 5}


@pytest.mark.integration  # a CLI subprocess or a training run
def test_synthetic_cli_errors_exit_2(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "data_prep.synthetic", *args], capture_output=True, text=True)

    bad = run("--domain", "printed", "--n", "0", "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--n 0" in bad.stderr and not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    exists = run("--domain", "printed", "--n", "2", "--output", str(tmp_path / "y"))
    assert exists.returncode == 2 and "already exists" in exists.stderr
    workers = run("--domain", "printed", "--n", "4", "--shards", "2", "--workers", "0", "--output", str(tmp_path / "w"))
    assert workers.returncode == 2 and "--workers 0" in workers.stderr and not (tmp_path / "w").exists()
    shards = run("--domain", "printed", "--n", "4", "--shards", "0", "--output", str(tmp_path / "s"))
    assert shards.returncode == 2 and "--shards 0" in shards.stderr and not (tmp_path / "s").exists()


def test_max_chars_keeps_only_short_lines(tmp_path):
    out = generate("printed", 40, 2, tmp_path / "short", progress=False, max_chars=6)
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(1 <= len(r["markdown"]) <= 6 for r in rows)
    with pytest.raises(ValueError, match="--max-chars 0"):
        generate("printed", 2, 2, tmp_path / "none", progress=False, max_chars=0)


def test_failed_render_leaves_nothing_behind(tmp_path, monkeypatch):
    import data_prep.synthetic as synthetic

    real, calls = synthetic.render_line, []

    def fails_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args)

    monkeypatch.setattr(synthetic, "render_line", fails_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        generate("printed", 5, 0, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
