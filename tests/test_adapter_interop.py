"""One adapter layout on disk per family: the published checkpoint's module names (v1:
model.layers.N..., as vLLM, Unsloth, ms-swift and the official code name them). Adapters
saved that way by other tools load, each delta applied where the published model applies it:
checked against a manual merge of the same deltas into the base weights."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.lora import load_adapter, lora_config, resolve_targets, save_adapter
from finetune.models import load_model
from finetune.models.deepseek_ocr import DeepseekOcr
from finetune.models.deepseek_ocr2 import DeepseekOcr2

V1 = DeepseekOcr()
SHORT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Unsloth's notebook


@pytest.fixture(scope="module")
def v1_base():
    _, model, processor = load_model("builtin:tiny-random-deepseek-ocr")
    return model, processor


def _inputs(model, processor, family=V1, mode="base"):
    from PIL import Image

    from finetune.sequence import builder_for

    builder = builder_for(family, processor, model.config, "<image>\nFree OCR.", family.vision_settings(processor, mode))
    batch = builder.collate([builder.build("p", Image.new("RGB", (300, 200), "white"), "total 12")])
    batch.pop("ids")
    batch.pop("labels")
    return batch


def _foreign_adapter(folder, model, target_modules, r=4, alpha=8, seed=0, family=V1, spread=0.3):
    """An adapter as Unsloth or ms-swift save one over the remote-code tree: keys
    base_model.model.<published module>.lora_{A,B}.weight, target_modules in published names,
    one pair per routed expert and projection (each with its own lora_A). Returns
    {native module or (fused parameter, expert, row slice): (A, B)} for the manual merge."""
    from finetune.lora import _spec_matches

    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}

    def pair(published, fan_out, fan_in, where):
        a = torch.randn(r, fan_in, generator=g) * spread
        b = torch.randn(fan_out, r, generator=g) * spread
        tensors[f"base_model.model.{published}.lora_A.weight"] = a
        tensors[f"base_model.model.{published}.lora_B.weight"] = b
        deltas[where] = (a, b)

    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        published, same = family.published_module_name(name)
        if same and _spec_matches(target_modules, published):
            pair(published, module.out_features, module.in_features, name)
    fused = dict(family.LAYOUT.fused_experts)
    for name, weight in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf not in fused or not owner.startswith(family.LAYOUT.decoder_layers + "."):
            continue
        experts, fan_out, fan_in = weight.shape
        rows = fan_out // len(fused[leaf])
        for e in range(experts):
            for i, proj in enumerate(fused[leaf]):
                published = f"{family.published_module_name(owner)[0]}.{e}.{proj}"
                if _spec_matches(target_modules, published):
                    pair(published, rows, fan_in, (name, e, i * rows, (i + 1) * rows))
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": target_modules, "task_type": "CAUSAL_LM", "base_model_name_or_path": "deepseek-ai/DeepSeek-OCR",
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None}))
    return deltas


def _merged_logits(model, deltas, scale, batch):
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for where, (a, b) in deltas.items():
            if isinstance(where, str):
                modules[where].weight += scale * (b @ a)
            else:  # one expert's projection: its rows of a fused (experts, out, in) parameter
                name, e, start, stop = where
                params[name][e, start:stop] += scale * (b @ a)
        return merged(**batch).logits


@pytest.mark.parametrize("targets", [SHORT_NAMES, r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"],
                         ids=["unsloth-short-names", "ms-swift-regex"])
def test_foreign_adapter_applies_where_the_published_model_would(v1_base, tmp_path, targets):
    model, processor = v1_base
    deltas = _foreign_adapter(tmp_path / "adapter", model, targets)
    # Short names reach the decoder's attention, dense MLP, shared and routed experts, and never
    # CLIP's q/k/v (one fused qkv_proj in the published model) nor SAM.
    assert deltas and not [n for n in deltas if isinstance(n, str) and ("vision_model" in n or "sam_model" in n)]
    if isinstance(targets, list):
        assert any(".mlp.experts." in str(n) for n in deltas) and any(".shared_experts." in str(n) for n in deltas)
    batch = _inputs(model, processor)
    expected = _merged_logits(model, deltas, 8 / 4, batch)
    adapted = load_adapter(copy.deepcopy(model), tmp_path / "adapter", "adapted", V1)
    with torch.no_grad():
        got = adapted(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    wrapped = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for n, _ in adapted.named_parameters() if ".lora_A." in n}
    wrapped = {n for n in wrapped if not re.search(r"\.experts(\.base_layer)*$", n)}  # fused experts' wrappers
    assert wrapped == {n for n in deltas if isinstance(n, str)}


def test_fused_clip_qkv_target_is_refused_by_name(v1_base, tmp_path):
    model, _ = v1_base
    folder = tmp_path / "adapter"
    _foreign_adapter(folder, model, ["q_proj"])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = ["qkv_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"target_modules: targets model\.vision_model\.transformer\.layers\.0\."
                                         r"self_attn\.qkv_proj \(\d+ modules\), which ocrtune splits"):
        load_adapter(copy.deepcopy(model), folder, "adapted", V1)


def test_ocrtune_adapter_is_written_in_published_names_and_loads_back(v1_base, tmp_path):
    from finetune.compat import get_peft_model

    model, processor = v1_base
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(resolve_targets(model, "all", V1.LAYOUT), r=4, alpha=8,
                                                                   dropout=0.0, modules_to_save=["model.projector"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(peft_model, tmp_path / "a", V1)
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in keys
    assert "base_model.model.model.projector.layers.weight" in keys  # the published projector's name
    assert not [k for k in keys if "language_model" in k]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # published names throughout; the routed experts as per-expert modules, as published
    assert cfg["target_modules"].startswith(r"(model\.layers\.\d+\.(") and cfg["modules_to_save"] == ["model.projector.layers"]
    assert cfg["target_modules"].endswith(r"|(model\.layers\.\d+\.mlp\.experts\.\d+\.(down_proj|gate_proj|up_proj))")
    assert cfg["target_parameters"] is None
    batch = _inputs(model, processor)
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = load_adapter(copy.deepcopy(model), tmp_path / "a", "adapted", V1)(**batch).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_older_adapter_in_ocrtune_native_names_still_loads(v1_base, tmp_path):
    from finetune.compat import get_peft_model

    model, processor = v1_base
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(resolve_targets(model, "attention", V1.LAYOUT), r=4,
                                                                   alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(str(tmp_path / "old"))  # what ocrtune wrote before: native names throughout
    assert any("language_model" in k for k in load_file(tmp_path / "old" / "adapter_model.safetensors"))
    batch = _inputs(model, processor)
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = load_adapter(copy.deepcopy(model), tmp_path / "old", "adapted", V1)(**batch).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_unreadable_adapter_configs_are_refused_by_key(v1_base, tmp_path):
    model, _ = v1_base
    folder = tmp_path / "adapter"
    _foreign_adapter(folder, model, ["q_proj"])
    good = json.loads((folder / "adapter_config.json").read_text())
    for change, message in [({"target_modules": ["no_such_proj"]}, r"target_modules \['no_such_proj'\] matches no module"),
                            ({"layers_to_transform": [0]}, r"layers_to_transform \[0\] is not supported"),
                            ({"peft_type": "IA3"}, r"peft_type 'IA3': only LoRA adapters load"),
                            ({"target_modules": []}, "target_modules is empty")]:
        (folder / "adapter_config.json").write_text(json.dumps(dict(good, **change)))
        with pytest.raises(ValueError, match=r"adapter/adapter_config.json: " + message):
            load_adapter(copy.deepcopy(model), folder, "adapted", V1)


OCR2 = DeepseekOcr2()


@pytest.fixture(scope="module")
def ocr2_base():
    _, model, processor = load_model("builtin:tiny-random-deepseek-ocr-2")
    return model, processor


def test_unsloth_ocr2_adapter_applies_experts_and_vision_encoder_exactly(ocr2_base, tmp_path):
    """Unsloth's OCR-2 notebook: short names over the remote-code tree reach the decoder, each
    routed expert's gate/up/down (fused into gate_up_proj/down_proj in transformers' model) and
    the Qwen2 vision encoder (model.qwen2_model...), never SAM or the projector."""
    model, processor = ocr2_base
    # smaller deltas than v1's: OCR-2's tiny model adapts 3x more modules (vision encoder,
    # every expert), and fp32 rounding of the larger activations would exceed 1e-4 absolute
    deltas = _foreign_adapter(tmp_path / "adapter", model, SHORT_NAMES, family=OCR2, spread=0.15)
    experts = [d for d in deltas if not isinstance(d, str)]
    n_experts = model.config.text_config.n_routed_experts
    moe_layers = {d[0] for d in experts if d[0].endswith("gate_up_proj")}
    assert len(experts) == 3 * n_experts * len(moe_layers) and moe_layers
    assert any("vision_tower.vision_encoder" in d for d in deltas if isinstance(d, str))
    assert not [d for d in deltas if isinstance(d, str) and ("sam_encoder" in d or "projector" in d)]
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.model.qwen2_model.model.model.layers.0.") for k in keys)
    assert "base_model.model.model.layers.1.mlp.experts.0.up_proj.lora_A.weight" in keys
    batch = _inputs(model, processor, OCR2, "gundam")
    expected = _merged_logits(model, deltas, 8 / 4, batch)
    adapted = load_adapter(copy.deepcopy(model), tmp_path / "adapter", "adapted", OCR2)
    with torch.no_grad():
        got = adapted(**batch).logits
    assert (got - model(**batch).logits).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ocr2_adapter_with_experts_vision_and_projector_round_trips_per_expert(ocr2_base, tmp_path):
    from finetune.compat import get_peft_model

    model, processor = ocr2_base
    targets = resolve_targets(model, "all", OCR2.LAYOUT, vision_lora=True)
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(targets, r=4, alpha=8, dropout=0.0,
                                                                   modules_to_save=["model.multi_modal_projector"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(peft_model, tmp_path / "a", OCR2)
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    n_experts = model.config.text_config.n_routed_experts
    per_expert = [k for k in keys if ".mlp.experts." in k]
    assert len(per_expert) == 2 * 3 * n_experts * len(targets.target_parameters) // 2  # A and B, 3 projections
    assert not [k for k in keys if "language_model" in k or "vision_tower" in k]
    # the projector keeps transformers' name: PEFT's load-time key conversion renames LoRA keys only
    assert "base_model.model.model.multi_modal_projector.weight" in keys
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] is None and cfg["target_modules"].endswith(
        r"(model\.layers\.\d+\.mlp\.experts\.\d+\.(down_proj|gate_proj|up_proj))")
    batch = _inputs(model, processor, OCR2, "gundam")
    adapted = load_adapter(copy.deepcopy(model), tmp_path / "a", "adapted", OCR2)
    # gate and up share lora_A per expert in ocrtune's wrapper: read back at the same rank
    ranks = {m.parameter_name: m.r["adapted"] for m in adapted.modules() if type(m).__name__ == "ParamWrapper"}
    assert ranks == {"gate_up_proj": 4, "down_proj": 4}
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, peft_model(**batch).logits, atol=0, rtol=0)


def test_expert_tensors_for_a_missing_layer_are_refused_by_name(ocr2_base, tmp_path):
    model, _ = ocr2_base
    folder = tmp_path / "adapter"
    _foreign_adapter(folder, model, ["q_proj"], family=OCR2)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.9.mlp.experts.0.gate_proj.lora_A.weight"] = torch.zeros(4, 8)
    tensors["base_model.model.model.layers.9.mlp.experts.0.gate_proj.lora_B.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: LoRA tensors for model\.layers\.9\.mlp\.experts: "
                                         r"no routed-expert module of that name"):
        load_adapter(copy.deepcopy(model), folder, "adapted", OCR2)


@pytest.mark.parametrize("family_name", ["v1", "ocr2"])
def test_dora_adapter_loads_back(v1_base, ocr2_base, tmp_path, family_name):
    """DoRA's magnitude vectors are saved without PEFT's inner `.weight`; the verified load must
    still find them (it refused every DoRA adapter before)."""
    from finetune.compat import get_peft_model

    family, (model, processor) = (V1, v1_base) if family_name == "v1" else (OCR2, ocr2_base)
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(resolve_targets(model, "attention", family.LAYOUT),
                                                                   r=4, alpha=8, dropout=0.0, use_dora=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    save_adapter(peft_model, tmp_path / "a", family)
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(tmp_path / "a" / "adapter_model.safetensors"))
    batch = _inputs(model, processor, family, "base")
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = load_adapter(copy.deepcopy(model), tmp_path / "a", "adapted", family)(**batch).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
