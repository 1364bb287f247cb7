"""Routed-expert LoRA: fused in memory, one pair per expert on disk.

ocrtune's models (and transformers' OCR-2) hold a MoE layer's routed experts as 3-D
parameters laid out (experts, out, in), which PEFT adapts through `target_parameters`: one
ParamWrapper per parameter, with lora_A [experts * r, in] (row e*r + k belongs to expert e)
and lora_B [out, r * experts] (column k*experts + e). The published checkpoints, and the
tools that train or serve them (vLLM, Unsloth, ms-swift, DeepSeek's code), have one Linear
per expert and projection, so an adapter on disk holds one lora_A/lora_B pair for each,
under `<layers>.N.mlp.experts.E.<proj>`.

Both directions are exact. Writing: expert e's slice of a wrapper is that expert's LoRA; a
parameter that stacks several projections (OCR-2's gate_up_proj = gate_proj rows, then
up_proj rows) gives each projection its rows of lora_B and the shared lora_A. Reading: a
parameter's per-expert pairs are stacked back; where the projections of one parameter carry
different lora_A (any adapter another tool trained), the wrapper gets rank r_gate + r_up with
a block-diagonal lora_B, which is the same delta, and no approximation is made.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from finetune.errors import InputError

# base_model.model.<...>.layers.N.mlp.experts.E.<proj>.lora_{A,B}.weight
EXPERT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<experts>.+\.layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\."
                        r"(?P<proj>[A-Za-z_]+)\.lora_(?P<ab>[AB])\.weight$")


def wrappers(peft_model, adapter_name: str) -> dict[str, tuple[str, object]]:
    """{fused parameter's name in the base model: (PEFT module name, its ParamWrapper)}."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper) and adapter_name in module.lora_A:
            # Several parameters of one module nest wrappers: experts, experts.base_layer, ...
            owner = re.sub(r"(\.base_layer)+$", "", name.removeprefix("base_model.model."))
            found[f"{owner}.{module.parameter_name}"] = (name, module)
    return found


def _factors(wrapper, adapter_name: str, module_name: str = "", state_dict: dict | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [experts, r, in], B [experts, out, r]) of one wrapper, in PEFT's layout; read from
    `state_dict` (the whole model's, gathered from sharded processes) when there is one: under
    FSDP the module's own tensors are this process's shards."""
    if not wrapper._did_swap_in_out_features:
        raise InputError(f"expert parameter {wrapper.parameter_name}: laid out (experts, in, out); ocrtune stores "
                         "experts as (experts, out, in)")
    n, r = wrapper.num_experts, wrapper.r[adapter_name]
    if state_dict is not None:
        a = state_dict[f"{module_name}.lora_A.{adapter_name}.weight"]
        b = state_dict[f"{module_name}.lora_B.{adapter_name}.weight"]
    else:
        a = wrapper.lora_A[adapter_name].weight.detach()
        b = wrapper.lora_B[adapter_name].weight.detach()
    return a.reshape(n, r, a.shape[-1]), b.reshape(b.shape[0], r, n).permute(2, 0, 1)


def to_disk(peft_model, adapter_name: str, family, state_dict: dict | None = None
            ) -> tuple[set[str], dict[str, torch.Tensor]]:
    """(PEFT state-dict keys of the fused-expert LoRA tensors, the same LoRA as per-expert
    tensors under the published names). `state_dict`: as save_adapter's."""
    fused = dict(family.LAYOUT.fused_experts)
    drop, out = set(), {}
    for param, (module_name, wrapper) in wrappers(peft_model, adapter_name).items():
        owner, leaf = param.rsplit(".", 1)
        projections = fused[leaf]
        a, b = _factors(wrapper, adapter_name, module_name, state_dict)
        rows = b.shape[1] // len(projections)
        published = family.published_module_name(owner)[0]
        for e in range(a.shape[0]):
            for i, proj in enumerate(projections):
                stem = f"base_model.model.{published}.{e}.{proj}"
                out[f"{stem}.lora_A.weight"] = a[e].clone()
                out[f"{stem}.lora_B.weight"] = b[e, i * rows:(i + 1) * rows].clone()
        drop |= {f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"}
    return drop, out


def target_regex(family) -> str:
    """target_modules' alternative naming the per-expert modules, in published names."""
    layers = family.published_module_name(family.LAYOUT.decoder_layers)[0]
    projections = sorted({p for _, names in family.LAYOUT.fused_experts for p in names})
    return re.escape(layers) + r"\.\d+\.mlp\.experts\.\d+\.(" + "|".join(projections) + ")"


@dataclass
class FusedPlan:
    """How one fused parameter's wrapper is filled from per-expert tensors."""
    rank: int
    alpha: float
    a: torch.Tensor  # [experts, rank, in]
    b: torch.Tensor  # [experts, out, rank]
    # (projection, expert, disk A, disk B, scaling) for the check after loading
    pieces: list


def split(tensors: dict[str, torch.Tensor], family) -> tuple[dict, dict]:
    """(tensors that are not per-expert LoRA, {published experts module: {proj: {e: {A|B: t}}}});
    a family whose experts are separate Linears (no fused_experts) loads them as modules."""
    rest, grouped = {}, {}
    for key, t in tensors.items():
        m = EXPERT_KEY.match(key) if family.LAYOUT.fused_experts else None
        if m is None:
            rest[key] = t
        else:
            grouped.setdefault(m["experts"], {}).setdefault(m["proj"], {}).setdefault(int(m["e"]), {})[m["ab"]] = t
    return rest, grouped


def plan(model, grouped: dict, family, alpha: float, use_rslora: bool, where: str) -> dict[str, FusedPlan]:
    """{fused parameter name: FusedPlan} for per-expert tensors read from `where`."""
    if not grouped:
        return {}
    fused = dict(family.LAYOUT.fused_experts)
    suffixes = tuple("." + p for p in family.LAYOUT.routed_expert_params)
    params = {n: p for n, p in model.named_parameters() if n.endswith(suffixes) and ".base_layer" not in n}
    owners = {family.published_module_name(n.rsplit(".", 1)[0])[0]: n.rsplit(".", 1)[0] for n in params}

    def scale(r):
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    plans = {}
    for published, by_proj in grouped.items():
        owner = owners.get(published)
        known = {p for names in fused.values() for p in names}
        if owner is None or set(by_proj) - known:
            bad = published if owner is None else f"{published}.E.{sorted(set(by_proj) - known)[0]}"
            raise InputError(f"{where}: LoRA tensors for {bad}: no routed-expert module of that name in this "
                             f"{family.MODEL_TYPE} model (expected {sorted(owners)[:1]}... with projections "
                             f"{sorted(known)})")
        for leaf, projections in fused.items():
            present = [p for p in projections if p in by_proj]
            if not present:
                continue
            weight = params[f"{owner}.{leaf}"]
            n, out, fan_in = weight.shape
            rows = out // len(projections)
            ranks = {}
            for p in present:
                for e, pair in by_proj[p].items():
                    a, b = pair.get("A"), pair.get("B")
                    if e >= n or a is None or b is None or a.shape[1] != fan_in or b.shape[0] != rows \
                            or a.shape[0] != b.shape[1] or ranks.setdefault(p, a.shape[0]) != a.shape[0]:
                        raise InputError(f"{where}: {published}.{e}.{p}: lora_A/lora_B missing or of shapes that "
                                         f"do not fit expert {e} of {n} ({rows} x {fan_in}, one rank per projection)")
            experts = sorted({e for p in present for e in by_proj[p]})
            shared = len(present) > 1 and len(set(ranks.values())) == 1 and all(
                set(by_proj[p]) == set(experts) for p in present) and all(
                torch.equal(by_proj[p][e]["A"], by_proj[present[0]][e]["A"]) for p in present for e in experts)
            rank = ranks[present[0]] if shared else sum(ranks.values())
            s_wrapper = scale(ranks[present[0]])
            big_a = torch.zeros(n, rank, fan_in)
            big_b = torch.zeros(n, out, rank)
            pieces, col = [], 0
            for p in present:
                i, r = projections.index(p), ranks[p]
                span = slice(0, r) if shared else slice(col, col + r)
                for e, pair in by_proj[p].items():
                    big_a[e, span] = pair["A"].float()
                    # the wrapper scales every block by s_wrapper; this block's own scaling is s_p
                    big_b[e, i * rows:(i + 1) * rows, span] = pair["B"].float() * (scale(r) / s_wrapper)
                    pieces.append((p, e, pair["A"], pair["B"], scale(r)))
                col += 0 if shared else r
            # PEFT scales the wrapper by alpha / rank (or / sqrt(rank)): this alpha gives s_wrapper
            rank_alpha = s_wrapper * (math.sqrt(rank) if use_rslora else rank)
            plans[f"{owner}.{leaf}"] = FusedPlan(rank, rank_alpha, big_a, big_b, pieces)
    return plans


def fill(peft_model, adapter_name: str, plans: dict[str, FusedPlan], family, where: str) -> None:
    """Copy the planned factors into the wrappers, then check every per-expert delta on disk
    equals the wrapper's delta for that expert and projection's rows."""
    fused = dict(family.LAYOUT.fused_experts)
    live = wrappers(peft_model, adapter_name)
    bad = []
    for param, p in plans.items():
        _, wrapper = live[param]
        n = p.a.shape[0]
        with torch.no_grad():
            a_w = wrapper.lora_A[adapter_name].weight
            b_w = wrapper.lora_B[adapter_name].weight
            a_w.copy_(p.a.reshape(n * p.rank, -1).to(a_w.dtype))
            b_w.copy_(p.b.permute(1, 2, 0).reshape(p.b.shape[1], p.rank * n).to(b_w.dtype))
        a, b = _factors(wrapper, adapter_name)
        s = wrapper.scaling[adapter_name]
        projections = fused[param.rsplit(".", 1)[1]]
        rows = b.shape[1] // len(projections)
        for proj, e, disk_a, disk_b, s_disk in p.pieces:
            i = projections.index(proj)
            got = s * (b[e, i * rows:(i + 1) * rows].float() @ a[e].float())
            want = s_disk * (disk_b.float() @ disk_a.float())
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6 * max(1.0, float(want.abs().max()))):
                bad.append(f"{param}[{e}] {proj}")
    if bad:
        raise InputError(f"{where}: {len(bad)} per-expert LoRA deltas did not land, e.g. {bad[:3]}")
