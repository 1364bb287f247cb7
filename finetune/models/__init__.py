"""Model names -> a loaded (model, processor) and the family module that knows its layout.

Accepted names, everywhere a model is asked for:
  builtin:NAME            a model shipped inside the package (finetune/builtin/NAME)
  /path/to/dir            a local checkpoint directory (config.json + weights)
  owner/name              a Hugging Face Hub id (downloaded with huggingface_hub)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from finetune.errors import OcrtuneError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
BUILTIN_PREFIX = "builtin:"


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a relative or absolute path (what resolve_model downloads)."""
    return name.count("/") == 1 and not name.startswith((".", "/"))


class ModelNameError(OcrtuneError, ValueError):
    """A model name that resolves to nothing usable; the message says what was tried."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # canonical name to record in adapters and cards (hub id or builtin:NAME or a path)
    path: Path  # local directory with config.json
    family: ModuleType  # finetune.models.<family> module
    is_local_path: bool  # True when `name` is a filesystem path (cannot be published as a base id)


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").is_file())


def family_for_model_type(model_type: str, where: str, raw: dict | None = None) -> ModuleType:
    # Imported lazily so that `import finetune.models` stays cheap.
    if model_type == "deepseek_ocr2":
        from finetune.models import deepseek_ocr2

        return deepseek_ocr2
    if model_type == "deepseek_vl_v2":
        from finetune.models import deepseek_ocr
        from finetune.models.deepseek_ocr_checkpoint import is_v1_config

        if is_v1_config(raw or {}):
            return deepseek_ocr
        raise ModelNameError(
            f"{where}: model_type 'deepseek_vl_v2' without CLIP-L in vision_config.width is not DeepSeek-OCR (v1); "
            "for DeepSeek-OCR-2 use the transformers layout (deepseek-community/DeepSeek-OCR-2)"
        )
    raise ModelNameError(
        f"{where}: model_type {model_type!r} is not supported by ocrtune "
        "(supported: deepseek_ocr2, and deepseek_vl_v2 for DeepSeek-OCR v1)"
    )


def _family_of(path: Path, where: str) -> ModuleType:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNameError(f"{where}: no config.json in {path}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNameError(f"{cfg_file}: invalid JSON ({exc.msg})") from exc
    return family_for_model_type(raw.get("model_type", ""), str(cfg_file), raw)


def resolve_model(name: str) -> ResolvedModel:
    """Find the checkpoint directory for `name`, downloading from the Hub if needed."""
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
    from finetune.models import deepseek_ocr2

    repo_id = deepseek_ocr2.HUB_ALIASES.get(name, name)
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
    model, processor = resolved.family.load(resolved.path, dtype=dtype, device=device)
    return resolved, model, processor
