"""LoRA targets anchored to decoder paths, and a parameter ledger per group.

Bare suffixes such as "q_proj" would also match OCR-2's vision encoder (it has
q_proj/gate_proj too); every target here is a regex over full decoder module paths,
and the routed experts (fused 3-D parameters that `target_modules` cannot reach) are
named one by one through PEFT's `target_parameters`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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
        # A 4-bit weight (model.quantization nf4) is stored packed, two per byte: count the
        # weights it holds, from the shape it was quantized from.
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        row["total"] += n
        if p.requires_grad:
            row["trainable"] += n
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


def _spec_matches(spec, name: str) -> bool:
    """PEFT's rule for target_modules / modules_to_save: a regex full-matches the module name;
    a list entry equals it or is a dotted suffix of it."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def native_modules(model: nn.Module, spec, family, key: str, linear_only: bool) -> list[str]:
    """ocrtune's module names for a PEFT spec written against the published checkpoint's names
    (what Unsloth, ms-swift and vLLM use, and what ocrtune writes): each module is matched
    under its published name, so a short name such as "q_proj" reaches exactly the modules it
    reaches in the published model (not CLIP's q/k/v, which are one fused qkv_proj there)."""
    found, fused = [], []
    for name, module in model.named_modules():
        if not name or (linear_only and not isinstance(module, nn.Linear)):
            continue
        published, same = family.published_module_name(name)
        if _spec_matches(spec, published):
            (found if same else fused).append(name)
    if fused:
        raise InputError(f"adapter_config.json {key}: targets {family.published_module_name(fused[0])[0]} "
                         f"({len(fused)} modules), which ocrtune splits into separate q/k/v projections; a LoRA on "
                         "the fused projection cannot be applied to them exactly: merge the adapter into the base "
                         "with the tool that trained it and load the merged checkpoint")
    if not found:  # adapters ocrtune wrote before it used published names name its own modules
        found = [n for n, m in model.named_modules()
                 if n and (not linear_only or isinstance(m, nn.Linear)) and _spec_matches(spec, n)]
    return found


def _published_spec(spec, family, model: nn.Module, linear_only: bool):
    """ocrtune's own target spec (a regex over its module names, or a list of names) -> the same
    modules in published names: a regex when the renaming keeps it exact, else the name list."""
    if spec is None:
        return None
    candidates = _unwrapped_names(model, linear_only)
    published = sorted({family.published_module_name(n)[0] for n in candidates if _spec_matches(spec, n)})
    if isinstance(spec, str):
        pattern = spec
        for ours, theirs in family.PUBLISHED_PREFIXES:
            pattern = pattern.replace(re.escape(ours.rstrip(".")), re.escape(theirs.rstrip(".")))
        everything = {family.published_module_name(n)[0] for n in candidates}
        if sorted(n for n in everything if re.fullmatch(pattern, n)) == published:
            return pattern
    return published


def _unwrapped_names(model: nn.Module, linear_only: bool) -> list[str]:
    """Module names as they were before PEFT wrapped them (a wrapped Linear's weights sit in
    `.base_layer`; its lora_A/lora_B and modules_to_save copies are PEFT's own)."""
    names = []
    for name, module in model.named_modules():
        if not name or re.search(r"\.(lora_[A-Za-z_]+|modules_to_save|original_module)(\.|$)", name):
            continue
        if name.endswith(".base_layer"):
            names.append(name.removesuffix(".base_layer"))
        elif not linear_only or isinstance(module, nn.Linear):
            if not hasattr(module, "base_layer"):
                names.append(name)
    return names


def save_adapter(peft_model, out_dir, family, state_dict=None) -> None:
    """PEFT save, then the tensor names (and, where the family reads adapter configs in
    published names, adapter_config.json's targets) rewritten into the family's on-disk
    naming; fused routed-expert LoRA is written per expert, as published (expert_lora).
    `state_dict`: the full model state gathered from sharded processes (FSDP, ZeRO-3), else None."""
    import json

    from safetensors.torch import load_file, save_file

    from finetune import expert_lora

    peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False,
                               state_dict=state_dict)
    path = f"{out_dir}/adapter_model.safetensors"
    tensors = load_file(path)
    drop, per_expert = expert_lora.to_disk(peft_model, peft_model.active_adapter, family, state_dict)
    tensors = {family.adapter_key_to_disk(k): v.contiguous() for k, v in tensors.items() if k not in drop}
    save_file(tensors | per_expert, path, metadata={"format": "pt"})
    cfg_path = Path(out_dir) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    base = peft_model.get_base_model()
    if family.ADAPTER_CONFIG_PUBLISHED:
        cfg["target_modules"] = _published_spec(cfg.get("target_modules"), family, base, linear_only=True)
        if cfg.get("modules_to_save"):
            cfg["modules_to_save"] = _published_spec(cfg["modules_to_save"], family, base, linear_only=False)
    if per_expert:
        # The experts are named as modules now, as other tools name them; PEFT's
        # target_parameters (fused names) would point at tensors that are not in the file.
        cfg["target_parameters"] = None
        experts = expert_lora.target_regex(family)
        spec = cfg.get("target_modules")
        if isinstance(spec, str) or not spec:
            cfg["target_modules"] = f"({spec})|({experts})" if spec else experts
        else:
            names = {expert_lora.EXPERT_KEY.match(k)["experts"] + "." + expert_lora.EXPERT_KEY.match(k)["e"] + "."
                     + expert_lora.EXPERT_KEY.match(k)["proj"] for k in per_expert}
            cfg["target_modules"] = sorted(set(spec) | names)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _load_published(model, adapter_dir: Path, adapter_name: str, family, on_disk: dict):
    """An adapter whose config and tensors use the published checkpoint's names (ocrtune's own,
    Unsloth's, ms-swift's) or ocrtune's: the targets are mapped onto ocrtune's modules, the
    model wrapped with that config, and the tensors loaded under their native names; per-expert
    tensors go onto the fused experts (expert_lora). Returns (model, the tensors still to check)."""
    import json
    import warnings

    import torch
    from peft import LoraConfig

    from finetune import expert_lora
    from finetune.compat import get_peft_model

    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    where = f"{adapter_dir}/adapter_config.json"
    if raw.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{where}: peft_type {raw['peft_type']!r}: only LoRA adapters load")
    for key in ("layers_to_transform", "layers_pattern"):
        if raw.get(key):
            raise InputError(f"{where}: {key} {raw[key]!r} is not supported for "
                             f"{family.MODEL_TYPE} adapters (name the modules in target_modules)")
    if not raw.get("target_modules"):
        raise InputError(f"{where}: target_modules is empty")
    rest, grouped = expert_lora.split(on_disk, family)
    plans = expert_lora.plan(model, grouped, family, raw.get("lora_alpha", 8), bool(raw.get("use_rslora")),
                             f"{adapter_dir}/adapter_model.safetensors")
    known = set(LoraConfig.__dataclass_fields__)
    cfg = {k: v for k, v in raw.items() if k in known}
    cfg["target_modules"] = native_modules(model, raw["target_modules"], family, "target_modules", linear_only=True)
    if not cfg["target_modules"] and not plans:
        raise InputError(f"{where}: target_modules {raw['target_modules']!r} matches no "
                         f"module of this {family.MODEL_TYPE} model")
    if raw.get("modules_to_save"):
        cfg["modules_to_save"] = native_modules(model, raw["modules_to_save"], family, "modules_to_save",
                                                linear_only=False)
    if plans:
        cfg["target_parameters"] = sorted(plans)
        cfg["rank_pattern"] = dict(cfg.get("rank_pattern") or {}) | {re.escape(n): p.rank for n, p in plans.items()}
        cfg["alpha_pattern"] = dict(cfg.get("alpha_pattern") or {}) | {re.escape(n): p.alpha for n, p in plans.items()}
        cfg["lora_dropout"] = 0.0  # PEFT's expert wrapper takes no dropout; a loaded adapter runs without it anyway
    cfg["inference_mode"] = True  # as PeftModel.from_pretrained: the loaded adapter is frozen
    base_name = cfg.pop("base_model_name_or_path", None)  # PEFT would warn that the model has no name
    with warnings.catch_warnings():
        # PEFT checks rank_pattern and alpha_pattern against modules, not parameters, and warns that these
        # keys "did not match"; the wrappers' scaling is checked exactly in expert_lora.fill.
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match.*")
        peft_model = get_peft_model(model, LoraConfig(**cfg), adapter_name)
    peft_model.peft_config[adapter_name].base_model_name_or_path = base_name
    # Copied by name rather than through set_peft_model_state_dict, which on transformers v5
    # runs the checkpoint's key conversion over them again (native names would be mangled).
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, tensor in rest.items():
            target = _adapter_param(params, family.adapter_key_from_disk(key), adapter_name)
            if target is not None and target.shape == tensor.shape:
                target.copy_(tensor.to(target.dtype))
    expert_lora.fill(peft_model, adapter_name, plans, family, f"{adapter_dir}/adapter_model.safetensors")
    return peft_model, rest


def _adapter_param(params: dict, native_key: str, adapter_name: str):
    """The model parameter an adapter tensor (PEFT key in ocrtune's names) loads into: LoRA
    tensors sit under the adapter's name, modules trained in full (train_projector) under
    modules_to_save.<name>; None if there is none."""
    if native_key.endswith(".lora_magnitude_vector"):  # DoRA: saved without PEFT's inner ".weight"
        return params.get(f"{native_key}.{adapter_name}.weight")
    stem, _, leaf = native_key.rpartition(".")
    return params.get(f"{stem}.{adapter_name}.{leaf}", params.get(f"{stem}.modules_to_save.{adapter_name}.{leaf}"))


def load_adapter(model, adapter_dir, adapter_name: str, family):
    """The adapter onto `model`, then proof that every tensor in the file landed in the model.

    A LoRA tensor that fails to load stays at its initial value (B = 0), which would make
    the "adapted" system silently equal to the base model; here that is an error.
    """
    import json

    import torch
    from safetensors.torch import load_file

    from finetune.compat import peft_from_pretrained

    adapter_dir = Path(adapter_dir)
    on_disk = load_file(f"{adapter_dir}/adapter_model.safetensors")
    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    if raw.get("target_parameters"):
        # An older ocrtune OCR-2 adapter: fused expert tensors under PEFT's own names.
        peft_model, to_check = peft_from_pretrained(model, str(adapter_dir), adapter_name), on_disk
    else:
        peft_model, to_check = _load_published(model, adapter_dir, adapter_name, family, on_disk)
    params = dict(peft_model.named_parameters())
    bad = []
    for key, tensor in to_check.items():
        loaded = _adapter_param(params, family.adapter_key_from_disk(key), adapter_name)
        if loaded is None or loaded.shape != tensor.shape or not torch.equal(loaded.detach().cpu().to(tensor.dtype), tensor):
            bad.append(key)
    if bad:
        raise InputError(f"{adapter_dir}: {len(bad)} of {len(on_disk)} adapter tensors did not load, e.g. {bad[:3]}")
    return peft_model
