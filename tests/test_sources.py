"""Each source adapter on small fixtures written in the real format, built end to end."""

import json

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image

from data_prep.build import BuildError, build_dataset
from data_prep.sources.funsd import form_markdown
from data_prep.sources.pdf import split_pages
from tests.helpers import line_text, render_line, run_cli


def _rows(out):
    dd = load_from_disk(str(out))
    # (datasets 5.2 raises IndexError when iterating an empty split, hence the len check)
    return {r["id"]: {**r, "split": s} for s in ("train", "validation", "test") if len(dd[s]) for r in dd[s]}


# ---------------------------------------------------------------- IAM

IAM_FORMS = {  # form id -> (writer, [(line id, text)])
    "a01-000u": ("000", [("a01-000u-00", 'A MOVE to stop "Mr. Gaitskell"'), ("a01-000u-01", "from nominating any more")]),
    "a01-003": ("001", [("a01-003-00", "Labour life Peers & M Ps"), ("a01-003-01", "is to be made at a meeting")]),
    "b02-010": ("000", [("b02-010-00", "of Labour MPs tomorrow."), ("b02-010-01", "Mr. Michael Foot has put")]),
}


def _write_iam(root, with_xml=True):
    from xml.sax.saxutils import quoteattr

    for form_id, (writer, lines) in IAM_FORMS.items():
        prefix = form_id.split("-")[0]
        (root / "lines" / prefix / form_id).mkdir(parents=True, exist_ok=True)
        (root / "forms").mkdir(exist_ok=True)
        form = Image.new("RGB", (900, 700), "white")
        xml_lines = []
        for k, (line_id, text) in enumerate(lines):
            img = render_line(text, width=400, height=50)
            img.save(root / "lines" / prefix / form_id / f"{line_id}.png")
            y = 300 + 60 * k
            form.paste(img, (100, y))
            xml_lines.append(
                f'<line id="{line_id}" text={quoteattr(text)} segmentation="ok">'
                f'<word id="{line_id}-00" text="w"><cmp x="100" y="{y}" width="400" height="50"/></word></line>'
            )
        form.save(root / "forms" / f"{form_id}.png")
        if with_xml:
            (root / "xml").mkdir(exist_ok=True)
            (root / "xml" / f"{form_id}.xml").write_text(
                f'<?xml version="1.0" encoding="ISO-8859-1"?>\n<form id="{form_id}" writer-id="{writer}">'
                f'<machine-printed-part/><handwritten-part>{"".join(xml_lines)}</handwritten-part></form>\n'
            )
    if not with_xml:
        (root / "ascii").mkdir(exist_ok=True)
        lines_txt = ["# IAM lines.txt"]
        forms_txt = ["# IAM forms.txt"]
        for form_id, (writer, lines) in IAM_FORMS.items():
            forms_txt.append(f"{form_id} {writer} 2 prt 7 5 52 36")
            for k, (line_id, text) in enumerate(lines):
                lines_txt.append(f"{line_id} ok 154 1 100 {300 + 60 * k} 400 50 {text.replace(' ', '|')}")
        (root / "ascii" / "lines.txt").write_text("\n".join(lines_txt) + "\n")
        (root / "ascii" / "forms.txt").write_text("\n".join(forms_txt) + "\n")


def test_iam_xml_line_level_groups_by_writer(tmp_path):
    _write_iam(tmp_path / "iam")
    (tmp_path / "iam" / "lines" / "a01" / "a01-003" / "a01-003-01.png").unlink()  # one image missing
    res = build_dataset("iam", tmp_path / "iam", tmp_path / "out", val_fraction=0, test_fraction=0.3,
                        max_rejected=0.5, progress=False)
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == ["a01-000u-00", "a01-000u-01", "a01-003-00", "b02-010-00", "b02-010-01"]
    assert rows["a01-000u-00"]["markdown"] == 'A MOVE to stop "Mr. Gaitskell"'  # xml entities decoded
    assert rows["a01-003-00"]["markdown"] == "Labour life Peers & M Ps"
    assert {r["group"] for r in rows.values()} == {"writer-000", "writer-001"}
    splits_of_writer = {}
    for r in rows.values():
        splits_of_writer.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_writer.values())
    assert res.report["rejected"] == [{"item": "lines/a01/a01-003/a01-003-01.png",
                                       "reason": "lines/a01/a01-003/a01-003-01.png: line image missing"}]
    assert json.loads(rows["b02-010-00"]["meta"])["form"] == "b02-010"


def test_iam_page_level_crops_to_the_handwriting(tmp_path):
    _write_iam(tmp_path / "iam")
    build_dataset("iam", tmp_path / "iam", tmp_path / "out", source_options={"level": "page"}, progress=False)
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == ["a01-000u", "a01-003", "b02-010"]
    page = rows["a01-003"]
    assert page["markdown"] == "Labour life Peers & M Ps\nis to be made at a meeting"
    assert page["image"].size == (400 + 40, 110 + 40)  # union of the two line boxes plus a 20 px margin


def test_iam_ascii_lines_txt(tmp_path):
    _write_iam(tmp_path / "iam", with_xml=False)
    build_dataset("iam", tmp_path / "iam", tmp_path / "out", progress=False)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 6 and rows["a01-000u-01"]["markdown"] == "from nominating any more"
    assert rows["b02-010-00"]["group"] == "writer-000"


# ---------------------------------------------------------------- FUNSD

FUNSD_FORM = [
    {"id": 0, "box": [300, 20, 520, 50], "text": "RESEARCH  REQUEST", "label": "header", "linking": []},
    {"id": 1, "box": [40, 100, 120, 120], "text": "DATE:", "label": "question", "linking": [[1, 2]]},
    {"id": 2, "box": [140, 100, 260, 120], "text": "12/03/98", "label": "answer", "linking": [[1, 2]]},
    {"id": 3, "box": [400, 102, 480, 122], "text": "TO:", "label": "question", "linking": [[3, 4], [3, 5]]},
    {"id": 5, "box": [500, 128, 600, 148], "text": "Dr. Smith", "label": "answer", "linking": [[3, 5]]},
    {"id": 4, "box": [500, 101, 600, 121], "text": "R&D", "label": "answer", "linking": [[3, 4]]},
    {"id": 6, "box": [40, 200, 400, 220], "text": "Please return by Friday.", "label": "other", "linking": []},
    {"id": 7, "box": [40, 240, 200, 260], "text": "SIGNATURE:", "label": "question", "linking": []},
    {"id": 8, "box": [40, 300, 200, 320], "text": "", "label": "other", "linking": []},
]


def test_funsd_markdown_reading_order_and_links():
    assert form_markdown(FUNSD_FORM) == (
        "## RESEARCH REQUEST\n\n**DATE:** 12/03/98\n\n**TO:** R&D Dr. Smith\n\n"
        "Please return by Friday.\n\n**SIGNATURE:**"
    )


def test_funsd_build(tmp_path):
    for split in ("training_data", "testing_data"):
        (tmp_path / "funsd" / split / "annotations").mkdir(parents=True)
        (tmp_path / "funsd" / split / "images").mkdir()
        for k in range(3):
            name = f"{split[:4]}{k:04d}"
            (tmp_path / "funsd" / split / "annotations" / f"{name}.json").write_text(json.dumps({"form": FUNSD_FORM}))
            render_line(f"form {split} {k}", width=640, height=400).save(tmp_path / "funsd" / split / "images" / f"{name}.png")
    (tmp_path / "funsd" / "testing_data" / "annotations" / "orphan.json").write_text(json.dumps({"form": FUNSD_FORM}))
    res = build_dataset("funsd", tmp_path / "funsd", tmp_path / "out", max_rejected=0.2, near_duplicate_threshold=0,
                        progress=False)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 6 and rows["training_data/trai0001"]["markdown"].startswith("## RESEARCH REQUEST\n\n**DATE:**")
    assert json.loads(rows["testing_data/test0002"]["meta"])["split"] == "testing_data"
    assert res.report["rejected"][0]["item"] == "testing_data/annotations/orphan.json"
    assert "no image" in res.report["rejected"][0]["reason"]


# ---------------------------------------------------------------- PDF

def _pdf(path, texts):
    """A real PDF with a text layer (matplotlib's PDF backend embeds the fonts and text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        for text in texts:
            fig = plt.figure(figsize=(4, 3))  # 288 x 216 points
            fig.text(0.1, 0.5, text, fontsize=14)
            pdf.savefig(fig)
            plt.close(fig)


def test_pdf_pages_rendered_and_paired(tmp_path):
    import pypdfium2 as pdfium

    docs = tmp_path / "docs"
    docs.mkdir()
    _pdf(docs / "report.pdf", ["Quarterly report", "Revenue 1,234"])
    (docs / "report.md").write_text("# Quarterly report\n\n<!-- pagebreak -->\n\n**Revenue** 1,234\n")
    _pdf(docs / "memo.pdf", ["Memo one", "Memo two", "Memo three"])
    (docs / "memo").mkdir()
    for k, text in enumerate(["Memo one", "Memo two", "Memo three"], start=1):
        (docs / "memo" / f"{k}.md").write_text(text)
    _pdf(docs / "short.pdf", ["one page", "two pages"])
    (docs / "short.md").write_text("only one page of Markdown")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (docs / "broken.md").write_text("x")
    assert "Quarterly report" in pdfium.PdfDocument(str(docs / "report.pdf"))[0].get_textpage().get_text_range()

    res = build_dataset("pdf", docs, tmp_path / "out", source_options={"dpi": 100}, max_rejected=0.5,
                        val_fraction=0, test_fraction=0.4, progress=False)
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == ["memo.pdf#page=1", "memo.pdf#page=2", "memo.pdf#page=3", "report.pdf#page=1",
                            "report.pdf#page=2"]
    assert rows["report.pdf#page=2"]["markdown"] == "**Revenue** 1,234"
    assert rows["memo.pdf#page=3"]["markdown"] == "Memo three"
    assert rows["report.pdf#page=1"]["image"].size == (400, 300)  # 288 x 216 pt at 100 dpi
    ink = np.asarray(rows["report.pdf#page=1"]["image"].convert("L"))
    assert ink.min() < 100 and ink.mean() > 200  # text on a white page
    assert len({rows[i]["split"] for i in rows if i.startswith("memo")}) == 1  # a document is one group
    reasons = {r["item"]: r["reason"] for r in res.report["rejected"]}
    assert "2 pages but 1 Markdown pages" in reasons["short.pdf"]
    assert "cannot open PDF" in reasons["broken.pdf"]


def test_pdf_page_cap_checked_before_rendering(tmp_path):
    _pdf(tmp_path / "big.pdf", ["big"])
    (tmp_path / "big.md").write_text("big")
    with pytest.raises(BuildError, match="exceeds the cap of 1000"):
        build_dataset("pdf", tmp_path / "big.pdf", tmp_path / "out", max_pixels=1000, progress=False)
    assert not (tmp_path / "out").exists()


def test_split_pages_marker_and_form_feed():
    assert split_pages("a\n<!-- pagebreak -->\nb\fc\n  <!--pagebreak-->  \nd") == ["a", "b", "c", "d"]


# ---------------------------------------------------------------- Hugging Face datasets

def _hf_dataset(n=12):
    import datasets

    return datasets.Dataset.from_dict(
        {"img": [render_line(line_text(i) + " hf") for i in range(n)], "text": [line_text(i) + " hf" for i in range(n)],
         "writer": [f"w{i % 4}" for i in range(n)]},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"),
                                    "writer": datasets.Value("string")}),
    )


def test_hf_saved_to_disk_parquet_and_imagefolder(tmp_path):
    import datasets

    ds = _hf_dataset()
    datasets.DatasetDict({"train": ds.select(range(8)), "test": ds.select(range(8, 12))}).save_to_disk(str(tmp_path / "saved"))
    opts = {"image_column": "img", "text_column": "text", "group_column": "writer"}
    build_dataset("hf", tmp_path / "saved", tmp_path / "out1", source_options=opts, near_duplicate_threshold=0,
                  progress=False)
    rows = _rows(tmp_path / "out1")
    assert sorted(rows) == [f"test-{i:06d}" for i in range(4)] + [f"train-{i:06d}" for i in range(8)]
    assert rows["test-000001"]["markdown"] == line_text(9) + " hf" and rows["test-000001"]["group"] == "w1"
    assert json.loads(rows["test-000001"]["meta"]) == {"file": "test[1]", "row": 1, "split": "test"}

    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "data.parquet"))
    build_dataset("hf", tmp_path / "pq", tmp_path / "out2", source_options={**opts, "split": "train"},
                  near_duplicate_threshold=0, progress=False)
    assert len(_rows(tmp_path / "out2")) == 12

    folder = tmp_path / "imgs"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as fh:
        for i in range(6):
            render_line(line_text(i)).save(folder / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "transcript": line_text(i)}) + "\n")
    build_dataset("hf", folder, tmp_path / "out3", source_options={"text_column": "transcript"},
                  near_duplicate_threshold=0, progress=False)
    assert sorted(r["markdown"] for r in _rows(tmp_path / "out3").values()) == sorted(line_text(i) for i in range(6))


def test_hf_unknown_column_and_split_named(tmp_path):
    _hf_dataset().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(BuildError, match=r"--text-column 'markdown': not in split 'train' \(columns: img, text, writer\)"):
        build_dataset("hf", tmp_path / "saved", tmp_path / "out", source_options={"image_column": "img"}, progress=False)
    with pytest.raises(BuildError, match="does not take dpi"):
        build_dataset("hf", tmp_path / "saved", tmp_path / "out", source_options={"dpi": 3}, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- CSV manifest, synthetic corpus, CLI

def test_csv_manifest(tmp_path):
    (tmp_path / "img").mkdir()
    lines = ["image,markdown,group,writer_age"]
    for i in range(6):
        render_line(line_text(i)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f'img/{i}.png,"**Line:** {line_text(i)}\nsecond row",g{i % 2},{30 + i}')
    lines.append("img/../../x.png,escape,g0,1")
    (tmp_path / "pages.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    res = build_dataset("manifest", tmp_path / "pages.csv", tmp_path / "out", max_rejected=0.2,
                        near_duplicate_threshold=0, progress=False)
    rows = _rows(tmp_path / "out")
    assert rows["img/3"]["markdown"] == f"**Line:** {line_text(3)}\nsecond row" and rows["img/3"]["group"] == "g1"
    assert json.loads(rows["img/3"]["meta"])["writer_age"] == "33"
    assert [r["item"] for r in res.report["rejected"]] == ["pages.csv:14"]  # the line its record starts on


def test_synthetic_corpus_renders_each_block(tmp_path):
    corpus = tmp_path / "corpus.md"
    corpus.write_text("# Receipt\n\n**Total:** 12.50 EUR\n**Date:** 03/04/2021\n\nThank you for shopping.\n")
    out = build_dataset("synthetic", corpus, tmp_path / "out", source_options={"augment": "scan", "seed": 7},
                        val_fraction=0, test_fraction=0, progress=False)
    rows = _rows(tmp_path / "out")
    assert [rows[k]["markdown"] for k in sorted(rows)] == [
        "# Receipt", "**Total:** 12.50 EUR\n**Date:** 03/04/2021", "Thank you for shopping."]
    two_lines = rows["corpus-000001"]["image"]
    assert two_lines.height > rows["corpus-000002"]["image"].height  # stacked baselines
    again = build_dataset("synthetic", corpus, tmp_path / "again", source_options={"augment": "scan", "seed": 7},
                          val_fraction=0, test_fraction=0, progress=False)
    assert out.report["counts"] == again.report["counts"]
    assert np.array_equal(np.asarray(_rows(tmp_path / "again")["corpus-000001"]["image"]), np.asarray(two_lines))


@pytest.mark.integration  # a CLI subprocess or a training run
def test_cli_sources_and_misplaced_flags(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line number {i}" for i in range(12)))
    ok = run_cli("data", "build", "--source", "synthetic", "--input", str(corpus), "--output", str(tmp_path / "out"),
                 "--unit", "line", "--fonts", "package:font_intuitive", "--augment", "none", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert "train 10, validation 1, test 1; rejected 0 of 12" in ok.stdout
    bad = run_cli("data", "build", "--source", "folder", "--input", str(tmp_path), "--output", str(tmp_path / "o2"),
                  "--dpi", "100")
    assert bad.returncode == 2 and "--source folder does not use --dpi" in bad.stderr
    font = run_cli("data", "build", "--source", "synthetic", "--input", str(corpus), "--output", str(tmp_path / "o3"),
                   "--fonts", "nofont.ttf")
    assert font.returncode == 2 and "nofont.ttf" in font.stderr and not (tmp_path / "o3").exists()
