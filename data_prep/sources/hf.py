"""`hf` source: any dataset the `datasets` library loads.

    ocrtune data build --source hf --input user/receipts --image-column image --text-column text
    ocrtune data build --source hf --input ./saved_dataset          (save_to_disk output)
    ocrtune data build --source hf --input ./parquet_dir            (*.parquet files)
    ocrtune data build --source hf --input ./images --text-column text   (imagefolder + metadata.jsonl)

A local folder is recognised by what it holds; anything else is a Hub id (with
`--hf-config`). Every split is read unless `--hf-split` names one; the original split
goes into `meta` (ocrtune re-splits by group so nothing leaks). Images are read
undecoded and go through the same safety checks as files on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import OcrtuneError
from data_prep.schema import Candidate
from data_prep.sources.paths import UnsafePath, resolve_inside
from data_prep.text import clean_text


class SourceError(OcrtuneError, ValueError):
    """The input cannot be read at all (as opposed to a bad record, which is rejected)."""


def _load(spec: str, config: str | None, split: str | None):
    import datasets

    path = Path(spec)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        elif any(path.rglob("*.parquet")):
            ds = datasets.load_dataset("parquet", data_dir=str(path))
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    elif path.is_file() and path.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(path))
    else:
        ds = datasets.load_dataset(spec, config)
    if isinstance(ds, datasets.Dataset):
        return {split or "train": ds}
    if split is not None:
        if split not in ds:
            raise SourceError(f"--hf-split {split!r}: {spec} has splits {', '.join(ds)}")
        return {split: ds[split]}
    return dict(ds)


def _image_path(value: str, root: Path | None) -> tuple[Path | None, str | None]:
    """A path named in a local dataset must stay inside it; a Hub dataset's files live in
    datasets' own cache, which it chose itself."""
    if root is None:
        return Path(value), None
    path = Path(value)
    try:
        if path.is_absolute():  # imagefolder records absolute paths of files it found under root
            return resolve_inside(root, str(path.resolve().relative_to(root.resolve()))), None
        return resolve_inside(root, value), None
    except (UnsafePath, ValueError):
        return None, f"{value!r} is outside the dataset folder {root}"


def iter_hf(spec: str, image_column: str = "image", text_column: str = "markdown", group_column: str | None = None,
            id_column: str | None = None, config: str | None = None, split: str | None = None) -> Iterator[Candidate]:
    import datasets

    try:
        splits = _load(spec, config, split)
    except SourceError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the spec and the reason
        raise SourceError(f"--input {spec}: cannot load with datasets ({type(exc).__name__}: {exc})") from exc
    root = Path(spec) if Path(spec).is_dir() else None
    for split_name, ds in splits.items():
        for option, column in (("--image-column", image_column), ("--text-column", text_column),
                               ("--group-column", group_column), ("--id-column", id_column)):
            if column is not None and column not in ds.column_names:
                raise SourceError(f"{option} {column!r}: not in split {split_name!r} (columns: {', '.join(ds.column_names)})")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes, checked by our loader
        for index, row in enumerate(ds):
            rid = str(row[id_column]) if id_column else f"{split_name}-{index:06d}"
            cand = Candidate(id=rid, image_path=None, markdown=None, source="hf",
                             meta={"file": f"{split_name}[{index}]", "split": split_name, "row": index})
            value = row[image_column]
            if isinstance(value, dict) and value.get("bytes"):
                cand.image_bytes = value["bytes"]
            elif isinstance(value, dict) and value.get("path"):
                value = value["path"]
            if cand.image_bytes is None:
                if isinstance(value, str):
                    cand.image_path, cand.problem = _image_path(value, root)
                    if cand.problem:
                        cand.problem = f"{split_name}[{index}] {image_column}: {cand.problem}"
                else:
                    cand.problem = f"{split_name}[{index}] {image_column}: no image ({type(value).__name__})"
            text = row[text_column]
            if not isinstance(text, str) or not text.strip():
                cand.problem = cand.problem or f"{split_name}[{index}] {text_column}: empty or not a string"
            else:
                cand.markdown = clean_text(text)
            if group_column and row[group_column] is not None:
                cand.group = str(row[group_column])
            yield cand
