"""`ocrtune predict`: images and every PDF page to Markdown files, grounding kept or stripped."""

import json

import pytest

from finetune.predict import PAGE_BREAK, strip_grounding
from tests.helpers import TINY, make_folder, run_cli
from tests.test_sources import _pdf

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


def test_strip_grounding_keeps_the_text():
    text = "<|ref|>Title<|/ref|><|det|>[[10, 20, 300, 60]]<|/det|>\n# Title\n<|ref|>text<|/ref|><|det|>[[1,2,3,4]]<|/det|>body"
    assert strip_grounding(text) == "Title\n# Title\ntextbody"
    assert strip_grounding("plain") == "plain"


def test_predict_images_and_pdf_pages(tmp_path):
    scans = make_folder(tmp_path / "in" / "scans", 3)
    _pdf(tmp_path / "in" / "doc.pdf", ["page one", "page two"])
    (tmp_path / "in" / "broken.pdf").write_bytes(b"%PDF-1.4 nope")
    res = run_cli("predict", "--model", TINY, "--input", str(scans), str(tmp_path / "in" / "doc.pdf"),
                  str(tmp_path / "in" / "broken.pdf"), "--output", str(tmp_path / "out"), "--max-new-tokens", "8",
                  "--dpi", "50", "--no-progress")
    assert res.returncode == 1, res.stderr  # one input failed; the others are written
    assert "wrote 4 Markdown files (5 pages)" in res.stdout and "failed" in res.stdout
    mds = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.md"))
    assert mds == ["doc.md", "page_000.md", "page_001.md", "page_002.md"]
    doc = (tmp_path / "out" / "doc.md").read_text()
    assert doc.count(PAGE_BREAK.strip()) == 1  # two pages, one break: `data build --source pdf` reads it back
    summary = json.loads((tmp_path / "out" / "predict_summary.json").read_text())
    assert summary["pages"] == 5 and summary["files"] == 4 and len(summary["hit_max_tokens"]) == 5
    assert summary["failed"][0]["file"].endswith("broken.pdf") and "cannot open PDF" in summary["failed"][0]["reason"]

    # the same decoding as eval: predict's text for a page equals generate_pages' output
    from finetune.generate import generate_pages
    from finetune.runtime import load_for_inference
    from finetune.sequence import builder_for
    from data_prep.images import load_image

    inf = load_for_inference(TINY, None, None, "auto", 30, 90)
    builder = builder_for(inf.family, inf.processor, inf.model.config, inf.prompt, inf.vision)
    gen = generate_pages(inf.model, builder, [("p", load_image(scans / "page_001.png"))], 1, 8, guard=inf.guard)
    assert (tmp_path / "out" / "page_001.md").read_text() == gen[0].text.strip() + "\n"


def test_predict_missing_input_is_an_error(tmp_path):
    res = run_cli("predict", "--model", TINY, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "no such file or folder" in res.stderr
