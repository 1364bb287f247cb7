"""`pdf` source: PDFs with the Markdown of each page; pages rendered at `--dpi`.

    docs/
      report.pdf     report.md     one .md for the whole PDF, pages separated by a line
                                   that is exactly  <!-- pagebreak -->  (or a form feed, \\f)
      memo.pdf       memo/1.md memo/2.md ...   or one .md per page (1-based), in a folder
                                               named after the PDF

Every page of one PDF shares one group, so a document never straddles train and test.
A PDF whose page count differs from its Markdown pages is rejected as a whole: a shifted
pairing would teach the model the wrong text for every page after the shift.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import InputError
from data_prep.schema import Candidate
from data_prep.text import TextError, clean_text, read_transcript

PAGE_BREAK = "<!-- pagebreak -->"
_BREAK_RE = re.compile(r"^[ \t]*<!--\s*pagebreak\s*-->[ \t]*$|\f", re.MULTILINE)


def split_pages(markdown: str) -> list[str]:
    """Markdown of a whole document -> one string per page."""
    return [clean_text(part) for part in _BREAK_RE.split(markdown)]


def _page_texts(pdf: Path) -> list[str]:
    per_page = pdf.with_suffix("")
    if per_page.is_dir():
        files = sorted((p for p in per_page.glob("*.md") if p.stem.isdigit()), key=lambda p: int(p.stem))
        if [int(p.stem) for p in files] != list(range(1, len(files) + 1)):
            raise TextError(f"{per_page}: page files must be 1.md, 2.md, ... with no gaps")
        return [read_transcript(p) for p in files]
    whole = pdf.with_suffix(".md")
    if not whole.is_file():
        raise TextError(f"no Markdown: expected {whole.name} or {per_page.name}/1.md, 2.md, ...")
    return split_pages(read_transcript(whole))


def render_page(page, dpi: int):
    """One pypdfium2 page -> RGB PIL image at `dpi` (transparent backgrounds on white)."""
    from PIL import Image

    image = page.render(scale=dpi / 72).to_pil()
    if image.mode == "RGBA":
        return _on_white(image, Image)
    return image.convert("RGB") if image.mode != "RGB" else image


def page_pixels(page, dpi: int) -> int:
    """Pixels a page renders to at `dpi`, known before rendering (points are 1/72 inch)."""
    width, height = page.get_size()
    return round(width * dpi / 72) * round(height * dpi / 72)


def iter_pdf(root: Path, dpi: int = 144, max_pixels: int | None = None) -> Iterator[Candidate]:
    import pypdfium2 as pdfium

    if not 36 <= dpi <= 1200:
        raise InputError(f"--dpi {dpi}: choose between 36 and 1200")
    root = Path(root)
    pdfs = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() == ".pdf")
    base = root.parent if root.is_file() else root
    for pdf in pdfs:
        rel = pdf.relative_to(base).as_posix()
        doc_cand = Candidate(id=rel, image_path=None, markdown=None, group=rel, source="pdf", meta={"file": rel})
        try:
            texts = _page_texts(pdf)
        except TextError as exc:
            doc_cand.problem = f"{rel}: {exc}"
            yield doc_cand
            continue
        try:
            doc = pdfium.PdfDocument(str(pdf))
        except pdfium.PdfiumError as exc:
            doc_cand.problem = f"{rel}: cannot open PDF ({exc})"
            yield doc_cand
            continue
        try:
            if len(doc) != len(texts):
                doc_cand.problem = f"{rel}: {len(doc)} pages but {len(texts)} Markdown pages; fix the page breaks"
                yield doc_cand
                continue
            for number, text in enumerate(texts, start=1):
                cand = Candidate(id=f"{rel}#page={number}", image_path=None, markdown=text or None, group=rel,
                                 source="pdf", meta={"file": f"{rel}#page={number}", "page": number, "dpi": dpi})
                page = doc[number - 1]
                pixels = page_pixels(page, dpi)
                if max_pixels is not None and pixels > max_pixels:
                    cand.problem = f"{rel} page {number}: {pixels} pixels at {dpi} dpi exceeds the cap of {max_pixels}"
                elif not text:
                    cand.problem = f"{rel} page {number}: empty Markdown"
                else:
                    image = render_page(page, dpi)
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    cand.image_bytes = buf.getvalue()
                page.close()
                yield cand
        finally:
            doc.close()


def _on_white(image, Image):
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")
