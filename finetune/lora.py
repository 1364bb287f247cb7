"""LoRA targets anchored to decoder paths, and a parameter ledger per group.

Bare suffixes such as "q_proj" would also match OCR-2's vision encoder (it has
q_proj/gate_proj too); every target here is a regex over full decoder module paths,
and the routed experts (fused 3-D parameters that `target_modules` cannot reach) are
named one by one through PEFT's `target_parameters`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from finetune.errors import InputError

PRESETS = ("attention", "attention+mlp", "all")
FULL = "full"  # no LoRA: train.py trains every weight and saves a whole checkpoint
PRESET_CHOICES = PRESETS + (FULL,)  # what lora.preset accepts
GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "router", "vision", "projector", "other")


@dataclass(frozen=True)
class LoraTargets:
    target_modules: str | None  # one anchored regex, PEFT full-matches it against module names
    target_parameters: list[str]  # full parameter names of fused expert weights
    n_modules: int


def resolve_targets(model: nn.Module, preset: str, layout, vision_lora: bool = False) -> LoraTargets:
    """`vision_lora`: also adapt the vision encoder's attention and MLP (the family's
    `layout.vision_lora` paths); off by default, as in every public recipe."""
    if preset not in PRESETS:
        raise InputError(f"lora.preset {preset!r}: choose one of {', '.join(PRESETS)}")
    leaves = [re.escape(leaf) for leaf in layout.attention]
    if preset in ("attention+mlp", "all"):
        leaves += [re.escape(leaf) for leaf in layout.dense_mlp + layout.shared_experts]
    if preset == "all" and layout.routed_expert_modules:
        leaves.append(layout.routed_expert_modules)  # v1: one Linear per routed expert
    pattern = re.escape(layout.decoder_layers) + r"\.\d+\.(" + "|".join(leaves) + ")"
    matched = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    if not matched:
        raise InputError(f"LoRA preset {preset!r} matched no decoder module (pattern {pattern})")
    if vision_lora:
        if not layout.vision_lora:
            raise InputError("lora.vision_lora: this model family has no vision LoRA targets")
        pattern = f"({pattern})|({layout.vision_lora})"
        matched = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    params: list[str] = []
    if preset == "all" and layout.routed_expert_params:
        suffixes = tuple("." + p for p in layout.routed_expert_params)
        params = [n for n, _ in model.named_parameters() if n.startswith(layout.decoder_layers + ".") and n.endswith(suffixes)]
        if not params:
            raise InputError("LoRA preset 'all' found no routed-expert parameters in the decoder")
    return LoraTargets(target_modules=pattern, target_parameters=params, n_modules=len(matched))


def lora_config(targets: LoraTargets, r: int, alpha: int, dropout: float, use_rslora: bool = False,
                use_dora: bool = False, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        target_modules=targets.target_modules,
        target_parameters=targets.target_parameters or None,
        modules_to_save=modules_to_save or None,  # trained in full and saved with the adapter
        bias="none",
    )


def group_of(name: str, layout) -> str:
    """The ledger group of a parameter name (PEFT wrappers' prefixes are ignored)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if name.startswith(layout.vision):
        return "vision"
    if name.startswith(layout.projector):
        return "projector"
    if not name.startswith(layout.decoder_layers + "."):
        return "other"  # embeddings, final norm, lm_head
    rest = name[len(layout.decoder_layers) + 1 :].split(".", 1)[1]
    if rest.startswith("self_attn."):
        return "attention"
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts"
    if rest.startswith("mlp.experts."):
        return "routed_experts"
    if rest.startswith(layout.router + "."):
        return "router"
    if rest.startswith("mlp."):
        return "dense_mlp"
    return "other"  # layer norms


def parameter_ledger(model: nn.Module, layout) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per group, plus a 'total' row."""
    ledger = {g: {"trainable": 0, "total": 0} for g in GROUPS}
    for name, p in model.named_parameters():
        row = ledger[group_of(name, layout)]
        row["total"] += p.numel()
        if p.requires_grad:
            row["trainable"] += p.numel()
    ledger["total"] = {k: sum(ledger[g][k] for g in GROUPS) for k in ("trainable", "total")}
    return ledger


def format_ledger(ledger: dict) -> str:
    lines = [f"{'group':<16}{'trainable':>14}{'total':>16}"]
    for g, row in ledger.items():
        lines.append(f"{g:<16}{row['trainable']:>14,}{row['total']:>16,}")
    t = ledger["total"]
    share = 100.0 * t["trainable"] / max(t["total"], 1)
    lines.append(f"trainable share: {share:.4f}%")
    return "\n".join(lines)


def _rename(key: str, renames) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def save_adapter(peft_model, out_dir, renames, state_dict=None) -> None:
    """PEFT save, then rewrite tensor names into the family's on-disk naming. `state_dict`:
    the full model state gathered from sharded processes (FSDP, ZeRO-3), else None."""
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False,
                               state_dict=state_dict)
    path = f"{out_dir}/adapter_model.safetensors"
    tensors = load_file(path)
    save_file({_rename(k, renames): v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def load_adapter(model, adapter_dir, adapter_name: str, renames):
    """`PeftModel.from_pretrained`, then prove every tensor in the file landed in the model.

    A LoRA tensor that fails to load stays at its initial value (B = 0), which would make
    the "adapted" system silently equal to the base model; here that is an error.
    """
    import torch
    from safetensors.torch import load_file

    from finetune.compat import peft_from_pretrained

    peft_model = peft_from_pretrained(model, str(adapter_dir), adapter_name)
    params = dict(peft_model.named_parameters())
    on_disk = load_file(f"{adapter_dir}/adapter_model.safetensors")
    inverse = [(new, old) for old, new in renames]
    bad = []
    for key, tensor in on_disk.items():
        native = _rename(key, inverse)
        stem, _, leaf = native.rpartition(".")
        # LoRA tensors sit under the adapter's name; modules trained in full (train_projector)
        # under modules_to_save.<name>.
        loaded = params.get(f"{stem}.{adapter_name}.{leaf}", params.get(f"{stem}.modules_to_save.{adapter_name}.{leaf}"))
        if loaded is None or loaded.shape != tensor.shape or not torch.equal(loaded.detach().cpu().to(tensor.dtype), tensor):
            bad.append(key)
    if bad:
        raise InputError(f"{adapter_dir}: {len(bad)} of {len(on_disk)} adapter tensors did not load, e.g. {bad[:3]}")
    return peft_model
