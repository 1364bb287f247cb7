"""Model names -> a loaded (model, processor) and the family that knows its layout.

Accepted names, everywhere a model is asked for:
  builtin:NAME            a model shipped inside the package (finetune/builtin/NAME)
  /path/to/dir            a local checkpoint directory (config.json + weights)
  owner/name              a Hugging Face Hub id (downloaded with huggingface_hub)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.models.family import ModelFamily, ModelNameError
from finetune.models.registry import family_for_config, hub_alias

__all__ = ["BUILTIN_DIR", "BUILTIN_PREFIX", "ModelFamily", "ModelNameError", "ResolvedModel", "builtin_names",
           "load_model", "looks_like_hub_id", "resolve_model"]

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
BUILTIN_PREFIX = "builtin:"


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a relative or absolute path (what resolve_model downloads)."""
    return name.count("/") == 1 and not name.startswith((".", "/"))


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # canonical name to record in adapters and cards (hub id or builtin:NAME or a path)
    path: Path  # local directory with config.json
    family: ModelFamily  # the family that reads it (from its config.json)
    is_local_path: bool  # True when `name` is a filesystem path (cannot be published as a base id)


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file())


def _family_of(path: Path, where: str) -> ModelFamily:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNameError(f"{where}: no config.json in {path}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNameError(f"{cfg_file}: invalid JSON ({exc.msg})") from exc
    return family_for_config(raw, str(cfg_file))


def resolve_model(name: str, hub_aliases: bool = True) -> ResolvedModel:
    """Find the checkpoint directory for `name`, downloading from the Hub if needed.
    `hub_aliases=False`: download a Hub id as published, even where a family reads the same
    weights from another repository (HUB_ALIASES); for engines that read the published layout."""
    if not name:
        raise ModelNameError("model name is empty")
    if name.startswith(BUILTIN_PREFIX):
        short = name[len(BUILTIN_PREFIX):]
        path = BUILTIN_DIR / short
        if not (path / "config.json").is_file():
            raise ModelNameError(
                f"unknown model {name!r}: builtin models are {', '.join(BUILTIN_PREFIX + n for n in builtin_names())}"
            )
        return ResolvedModel(name, path, _family_of(path, name), is_local_path=False)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNameError(f"model {name!r}: is a file, expected a checkpoint directory")
        return ResolvedModel(str(local.resolve()), local, _family_of(local, name), is_local_path=True)
    if not looks_like_hub_id(name):
        raise ModelNameError(
            f"unknown model {name!r}: not a local directory, not builtin:NAME and not a Hub id (owner/name)"
        )
    repo_id = hub_alias(name) if hub_aliases else name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except RepositoryNotFoundError as exc:
        raise ModelNameError(f"unknown model {name!r}: no such repository on the Hugging Face Hub") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelNameError(
            f"model {name!r}: not a local directory and could not be downloaded from the Hub ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    return ResolvedModel(repo_id, path, _family_of(path, name), is_local_path=False)


def load_model(name: str, dtype=None, device=None):
    """(ResolvedModel, model, processor) for any accepted model name."""
    resolved = resolve_model(name)
    try:
        model, processor = resolved.family.load(resolved.path, dtype=dtype, device=device)
    except OSError as exc:  # transformers' word for a tokenizer, processor or weight file it cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNameError(f"model {name!r}: cannot read the checkpoint in {resolved.path} ({first})") from exc
    return resolved, model, processor
