"""Source adapters: each turns one input format into `Candidate` records.

An adapter never decodes images or validates text (that is `data_prep.build`'s job);
it only finds pairs, and reports the items it could not pair as candidates with a
`problem` so they land in the reject list instead of vanishing. An input that cannot be
read at all (wrong layout, unknown column) raises ValueError with the option to fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import InputError
from data_prep.schema import Candidate

SOURCES = ("folder", "manifest", "hf", "pdf", "iam", "funsd", "synthetic")


def _adapter(kind: str):
    # Imported on use: the pdf and hf adapters pull in pypdfium2 / datasets' loaders.
    if kind == "folder":
        from data_prep.sources.folder import iter_folder as fn
    elif kind == "manifest":
        from data_prep.sources.manifest import iter_manifest as fn
    elif kind == "hf":
        from data_prep.sources.hf import iter_hf as fn
    elif kind == "pdf":
        from data_prep.sources.pdf import iter_pdf as fn
    elif kind == "iam":
        from data_prep.sources.iam import iter_iam as fn
    elif kind == "funsd":
        from data_prep.sources.funsd import iter_funsd as fn
    elif kind == "synthetic":
        from data_prep.sources.synthetic import iter_synthetic as fn
    else:
        raise InputError(f"--source {kind!r}: unknown source; choose one of {', '.join(SOURCES)}")
    return fn


def open_source(kind: str, input_path: str | Path, options: dict | None = None) -> Iterator[Candidate]:
    """Candidates of `input_path` read as `kind`; `options` are that adapter's keyword arguments."""
    fn = _adapter(kind)
    options = dict(options or {})
    accepted = set(inspect.signature(fn).parameters) - {next(iter(inspect.signature(fn).parameters))}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError(f"--source {kind}: does not take {', '.join(unknown)} (it takes: {', '.join(sorted(accepted)) or 'nothing'})")
    path = Path(input_path) if kind != "hf" else str(input_path)
    if kind in ("folder", "iam", "funsd") and not Path(path).is_dir():
        raise InputError(f"--input {input_path}: not a directory (the {kind} source reads a folder)")
    if kind == "manifest" and not Path(path).is_file():
        raise InputError(f"--input {input_path}: no such manifest file")
    if kind == "pdf" and not Path(path).exists():
        raise InputError(f"--input {input_path}: no such PDF or folder")
    return fn(path, **options)
