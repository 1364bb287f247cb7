"""The model families ocrtune knows, and which one reads a given checkpoint.

Adding a family: see the README's "Adding a model family" checklist.
"""

from __future__ import annotations

from finetune.models.deepseek_ocr import DeepseekOcr
from finetune.models.deepseek_ocr2 import DeepseekOcr2
from finetune.models.family import ModelFamily, ModelNameError

FAMILIES: tuple[ModelFamily, ...] = (DeepseekOcr(), DeepseekOcr2())


def family_for_config(raw: dict, where: str) -> ModelFamily:
    """The family that reads a checkpoint whose config.json is `raw`; `where` names the file
    in errors. Decided from config.json alone (no weights are read)."""
    model_type = raw.get("model_type", "")
    readers = [f for f in FAMILIES if model_type in f.CONFIG_MODEL_TYPES]
    # A model_type two families share: config.json's architectures name the family; a config
    # that names neither goes to the first, whose check_config says what it is missing.
    named = [f for f in readers if set(raw.get("architectures") or ()) & set(f.ARCHITECTURES)]
    for family in (named or readers)[:1]:
        family.check_config(raw, where)
        return family
    known = ", ".join(f"{t} ({f.MODEL_TYPE})" for f in FAMILIES for t in f.CONFIG_MODEL_TYPES)
    raise ModelNameError(f"{where}: model_type {model_type!r} is not supported by ocrtune (supported: {known})")


def family_named(name: str) -> ModelFamily:
    """The family recorded as `name` (MODEL_TYPE) in an adapter or report."""
    for family in FAMILIES:
        if family.MODEL_TYPE == name:
            return family
    raise ModelNameError(f"model family {name!r} is unknown (known: {', '.join(f.MODEL_TYPE for f in FAMILIES)})")


def hub_alias(repo_id: str) -> str:
    """The id to download for `repo_id` (a family may publish the same weights in a layout it reads)."""
    for family in FAMILIES:
        if repo_id in family.HUB_ALIASES:
            return family.HUB_ALIASES[repo_id]
    return repo_id
