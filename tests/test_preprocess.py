"""Optional preprocessing: each step does what it says and is recorded in the report and card."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from data_prep.build import BuildError, build_dataset
from data_prep.preprocess import Preprocess, otsu_threshold, skew_angle
from data_prep.render import font_files


def _page(lines=6) -> Image.Image:
    font = ImageFont.truetype(str(font_files("matplotlib:DejaVuSans.ttf")[0]), 22)
    im = Image.new("RGB", (700, 60 + 45 * lines), "white")
    draw = ImageDraw.Draw(im)
    for k in range(lines):
        draw.text((30, 30 + 45 * k), f"line {k}: the quick brown fox jumps over", fill="black", font=font)
    return im


def test_deskew_finds_the_tilt():
    tilted = _page().rotate(3.0, resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    assert skew_angle(tilted, 5.0) == pytest.approx(-3.0, abs=0.5)
    assert skew_angle(_page(), 5.0) == pytest.approx(0.0, abs=0.3)
    straight, done = Preprocess(deskew=True).apply(tilted)
    assert len(done) == 1 and done[0].startswith("deskewed by -") and done[0].endswith(" deg")
    assert skew_angle(straight, 5.0) == pytest.approx(0.0, abs=0.5)


def test_binarize_and_resizing():
    grey = np.array([[30] * 10 + [220] * 30], dtype=np.uint8)
    assert 30 <= otsu_threshold(grey) < 220
    shaded = Image.fromarray((np.asarray(_page().convert("L")) * 0.8 + 30).astype(np.uint8)).convert("RGB")
    out, done = Preprocess(binarize=True).apply(shaded)
    assert set(np.unique(np.asarray(out))) == {0, 255} and done[0].startswith("binarized at")
    small = Image.new("RGB", (100, 40), "white")
    assert Preprocess(upscale_min_side=80).apply(small)[0].size == (200, 80)
    assert Preprocess(upscale_min_side=80, downscale_max_side=150).apply(small)[0].size == (150, 60)
    assert Preprocess(downscale_max_side=50).apply(small)[0].size == (50, 20)
    assert Preprocess().apply(small) == (small, [])
    with pytest.raises(ValueError, match="--upscale-min-side is larger"):
        Preprocess(upscale_min_side=500, downscale_max_side=100)


def test_preprocessing_recorded_in_report_and_card(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(5):
        _page(2 + i).save(scans / f"p{i}.png")
        (scans / f"p{i}.md").write_text(f"page {i}")
    res = build_dataset("folder", scans, tmp_path / "out", preprocess=Preprocess(binarize=True, downscale_max_side=300),
                        progress=False)
    assert res.report["preprocess"]["binarize"] is True and res.report["preprocess"]["downscale_max_side"] == 300
    assert res.report["counts"]["fixed"] == 5 and "downscaled" in res.report["fixed"][0]["fixes"][-1]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "binarize=True" in card and "downscale_max_side=300" in card
    plain = build_dataset("folder", scans, tmp_path / "plain", progress=False)
    assert plain.report["preprocess"] is None and "Preprocessing: none." in (tmp_path / "plain" / "README.md").read_text()
    assert json.loads((tmp_path / "plain" / "build_report.json").read_text())["counts"]["fixed"] == 0


def test_token_budget_needs_a_tokenizer(tmp_path):
    with pytest.raises(BuildError, match="--max-target-tokens needs --tokenizer"):
        build_dataset("folder", tmp_path, tmp_path / "out", max_target_tokens=10, progress=False)
