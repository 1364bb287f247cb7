"""Resolve a path named inside the data so that it cannot leave the data root."""

from __future__ import annotations

from pathlib import Path

from data_prep.errors import OcrtuneError


class UnsafePath(OcrtuneError, ValueError):
    pass


def resolve_inside(root: Path, name: str) -> Path:
    """`root / name`, refusing absolute paths, URLs, `..` escapes and symlinks out of root."""
    if not isinstance(name, str) or not name:
        raise UnsafePath("image path is empty or not a string")
    if "://" in name:
        raise UnsafePath(f"{name!r}: URLs are not accepted, give a path relative to the manifest")
    if Path(name).is_absolute() or name.startswith("\\"):
        raise UnsafePath(f"{name!r}: absolute paths are not accepted, give a path relative to the manifest")
    root_real = root.resolve()
    candidate = (root / name).resolve()  # follows symlinks, so a link pointing outside is caught too
    if candidate != root_real and root_real not in candidate.parents:
        raise UnsafePath(f"{name!r}: resolves outside the data root {root}")
    return root / name
