"""Reading transcripts: strict UTF-8, BOM stripped, NFC, LF line endings."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from data_prep.errors import OcrtuneError


class TextError(OcrtuneError, ValueError):
    """A transcript that cannot be used; the message says why."""


def clean_text(text: str) -> str:
    """The canonical stored form of a target: no BOM, LF endings, NFC, no outer blank lines."""
    text = text.lstrip("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    return text.strip("\n").rstrip()


def read_transcript(path: str | Path) -> str:
    """Read a sidecar transcript; undecodable bytes are an error naming file and line."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TextError(
            f"{path}: not valid UTF-8 at line {line} (byte 0x{raw[exc.start]:02x}); "
            "re-save the file as UTF-8"
        ) from exc
    text = clean_text(text)
    if not text.strip():
        raise TextError(f"{path}: empty transcript")
    return text
