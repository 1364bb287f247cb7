"""The bad-input suite: every broken or unusual file is rejected or repaired, named in
build_report.json, and every good sample is kept."""

import io
import json
import struct
import zlib

import numpy as np
from datasets import load_from_disk
from PIL import Image, ImageDraw, ImageFont

from data_prep.build import build_dataset
from tests.helpers import REPO, line_text, render_line, write_manifest

TOKENIZER = str(REPO / "finetune" / "builtin" / "tiny-random-deepseek-ocr-2")


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring a huge image, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _text_rgba() -> Image.Image:
    """Black text on fully transparent pixels (which are black too, RGBA (0,0,0,0))."""
    im = Image.new("RGBA", (200, 48), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((6, 14), "transparent page", fill=(0, 0, 0, 255))
    return im


def _exif_rotated_jpeg(path):
    """A 120x40 landscape line stored as a 40x120 portrait JPEG with EXIF orientation 6."""
    upright = render_line("rotated line", width=120, height=40)
    upright.paste((0, 0, 0), (0, 0, 10, 10))  # a black marker at the top-left of the upright page
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote (display turns it 90 CW)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_bad_inputs_are_rejected_or_repaired_and_named(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    good = 30
    for i in range(good):
        render_line(line_text(i) + " good").save(scans / f"good_{i:02d}.png")
        (scans / f"good_{i:02d}.md").write_text(line_text(i) + " good\n")

    def pair(name, text="a line"):
        (scans / f"{name}.md").write_text(text + "\n")

    # Rejected.
    (scans / "bomb.png").write_bytes(_bomb_png(50_000, 50_000)); pair("bomb")
    buf = io.BytesIO(); render_line("truncated").save(buf, "JPEG", quality=95)
    (scans / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2]); pair("truncated")
    (scans / "zero.png").write_bytes(b""); pair("zero")
    (scans / "notimage.png").write_text("this is not an image"); pair("notimage")
    render_line("cp1252").save(scans / "cp1252.png")
    (scans / "cp1252.md").write_bytes("Caf\xe9 cr\xe8me 12\x80".encode("latin-1"))
    render_line("too long").save(scans / "toolong.png"); pair("toolong", "word " * 80)
    outside = tmp_path / "outside.png"
    render_line("secret").save(outside)
    (scans / "escape.png").symlink_to(outside); pair("escape")
    # Repaired.
    buf = io.BytesIO(); render_line("png inside").save(buf, "PNG")
    (scans / "misnamed.jpg").write_bytes(buf.getvalue()); pair("misnamed")
    _exif_rotated_jpeg(scans / "exif.jpg"); pair("exif")
    _text_rgba().save(scans / "alpha.png"); pair("alpha")
    ramp = (np.tile(np.linspace(0, 65535, 256), (20, 1))).astype(np.uint16)
    Image.fromarray(ramp).save(scans / "ramp16.png"); pair("ramp16")  # mode I;16
    render_line("cmyk page").convert("CMYK").save(scans / "cmyk.jpg", "JPEG", quality=95); pair("cmyk")
    render_line("palette").convert("P").save(scans / "palette.gif"); pair("palette")
    # Duplicates under different names.
    for name in ("dup_a", "dup_b", "dup_c"):
        render_line("the same page").save(scans / f"{name}.png"); pair(name, "the same page")

    res = build_dataset("folder", scans, tmp_path / "out", max_rejected=0.5, max_pixels=10_000_000,
                        max_target_tokens=64, tokenizer=TOKENIZER, progress=False)
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report == res.report
    reasons = {r["item"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"bomb.png", "truncated.jpg", "zero.png", "notimage.png", "cp1252.png", "toolong.png",
                            "escape.png"}
    assert "2500000000 pixels" in reasons["bomb.png"] and "decompression bomb" in reasons["bomb.png"]
    assert "cannot decode" in reasons["truncated.jpg"]
    assert "empty file (0 bytes)" in reasons["zero.png"]
    assert "not an image" in reasons["notimage.png"]
    assert "cp1252.md: not valid UTF-8 at line 1" in reasons["cp1252.png"]
    assert "tokens > --max-target-tokens 64" in reasons["toolong.png"] and "never truncated" in reasons["toolong.png"]
    assert "outside the data root" in reasons["escape.png"]

    fixes = {f["item"]: f["fixes"] for f in report["fixed"]}
    assert fixes == {
        "misnamed.jpg": ["named .jpg but holds PNG; decoded by content"],
        "exif.jpg": ["EXIF orientation 6 applied"],
        "alpha.png": ["RGBA composited on white"],
        "ramp16.png": ["I;16 grey scaled to 8 bits"],
        "cmyk.jpg": ["CMYK converted to RGB"],
        "palette.gif": ["palette image converted to RGB"],
    }
    accepted = good + len(fixes) + 3
    assert report["counts"]["accepted"] == accepted and report["counts"]["rejected"] == 7

    dd = load_from_disk(str(tmp_path / "out"))
    rows = {r["id"]: r for s in ("train", "validation", "test") for r in dd[s]}
    assert {f"good_{i:02d}" for i in range(good)} <= set(rows)  # every good sample kept
    exif = np.asarray(rows["exif"]["image"])
    assert exif.shape == (40, 120, 3) and exif[:8, :8].max() < 60  # upright, marker back at the top-left
    alpha = np.asarray(rows["alpha"]["image"])
    assert alpha[0, 0].tolist() == [255, 255, 255] and alpha.min() < 50  # white paper, black text kept
    assert len(np.unique(np.asarray(rows["ramp16"]["image"])[..., 0])) > 200  # scaled, not clipped at 255
    assert np.asarray(rows["cmyk"]["image"]).mean() > 200  # white page, not inverted
    where = {r["id"]: s for s in ("train", "validation", "test") for r in dd[s]}
    assert len({where["dup_a"], where["dup_b"], where["dup_c"]}) == 1
    assert report["duplicates"][0] == {"kind": "identical pixels", "ids": ["dup_a", "dup_b", "dup_c"]}
    assert report["leakage"]["shared_images"] == 0 and report["leakage"]["shared_groups"] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "repaired on load: 6" in card and "at most 64 tokens" in card


def test_traversal_in_a_manifest_is_rejected_and_the_rest_kept(tmp_path):
    root = tmp_path / "m"
    (root / "img").mkdir(parents=True)
    for i in range(10):
        render_line(line_text(i)).save(root / "img" / f"{i}.png")
    render_line("secret").save(tmp_path / "secret.png")
    rows = [{"image": f"img/{i}.png", "markdown": line_text(i)} for i in range(10)]
    rows.append({"image": "img/../../secret.png", "markdown": "secret"})
    res = build_dataset("manifest", write_manifest(root / "pages.jsonl", rows), tmp_path / "out", max_rejected=0.2,
                        progress=False)
    assert [r["item"] for r in res.report["rejected"]] == ["pages.jsonl:11"]
    assert "resolves outside the data root" in res.report["rejected"][0]["reason"]
    assert res.report["counts"]["accepted"] == 10


def _scan(text: str) -> Image.Image:
    """A printed line at scan-like size (DejaVu 28 px), as a page of real text would be."""
    from data_prep.render import font_files

    font = ImageFont.truetype(str(font_files("matplotlib:DejaVuSans.ttf")[0]), 28)
    im = Image.new("RGB", (int(font.getlength(text)) + 40, 60), "white")
    ImageDraw.Draw(im).text((20, 14), text, fill="black", font=font)
    return im


def test_near_duplicates_share_a_split(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    words = ["invoice", "total", "Dear Sir", "received", "12/03/1998", "phone", "signature", "amount due", "notes"]
    for i in range(40):
        text = f"{i * 37} " + " ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 4))
        _scan(text).save(scans / f"p{i:02d}.png")
        (scans / f"p{i:02d}.md").write_text(f"page {i}")
    original = _scan("a page scanned twice, once as JPEG")
    original.save(scans / "scan.png")
    original.resize((original.width * 3 // 2, 90)).save(scans / "rescan.jpg", "JPEG", quality=80)  # other size and codec
    for name in ("scan", "rescan"):
        (scans / f"{name}.md").write_text("a page scanned twice, once as JPEG")
    res = build_dataset("folder", scans, tmp_path / "out", val_fraction=0.3, test_fraction=0.3, progress=False)
    assert res.report["duplicates"] == [{"kind": "near-duplicate", "ids": ["rescan", "scan"]}]
    dd = load_from_disk(str(tmp_path / "out"))
    where = {i: s for s in ("train", "validation", "test") for i in dd[s]["id"]}
    assert where["scan"] == where["rescan"]
    assert res.report["leakage"]["near_duplicate_pairs"] == 1 and res.report["leakage"]["shared_near_duplicates"] == 0
    off = build_dataset("folder", scans, tmp_path / "off", near_duplicate_threshold=0, progress=False)
    assert off.report["duplicates"] == []
