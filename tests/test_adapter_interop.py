"""One adapter layout on disk per family: the published checkpoint's module names (v1:
model.layers.N..., as vLLM, Unsloth, ms-swift and the official code name them). Adapters
saved that way by other tools load, each delta applied where the published model applies it:
checked against a manual merge of the same deltas into the base weights."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.lora import load_adapter, lora_config, resolve_targets, save_adapter
from finetune.models import load_model
from finetune.models.deepseek_ocr import DeepseekOcr

V1 = DeepseekOcr()
SHORT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Unsloth's notebook


@pytest.fixture(scope="module")
def v1_base():
    _, model, processor = load_model("builtin:tiny-random-deepseek-ocr")
    return model, processor


def _inputs(model, processor):
    from PIL import Image

    from finetune.sequence import builder_for

    builder = builder_for(V1, processor, model.config, "<image>\nFree OCR.", V1.vision_settings(processor, "base"))
    batch = builder.collate([builder.build("p", Image.new("RGB", (300, 200), "white"), "total 12")])
    batch.pop("ids")
    batch.pop("labels")
    return batch


def _foreign_adapter(folder, model, target_modules, r=4, alpha=8, seed=0):
    """An adapter as Unsloth or ms-swift save one over the remote-code tree: keys
    base_model.model.<published module>.lora_{A,B}.weight, target_modules in published names.
    Returns {native module: (A, B)} for the manual merge."""
    from finetune.lora import _spec_matches

    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        published, same = V1.published_module_name(name)
        if not same or not _spec_matches(target_modules, published):
            continue
        a = torch.randn(r, module.in_features, generator=g) * 0.3
        b = torch.randn(module.out_features, r, generator=g) * 0.3
        tensors[f"base_model.model.{published}.lora_A.weight"] = a
        tensors[f"base_model.model.{published}.lora_B.weight"] = b
        deltas[name] = (a, b)
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
    with torch.no_grad():
        for name, (a, b) in deltas.items():
            modules[name].weight += scale * (b @ a)
        return merged(**batch).logits


@pytest.mark.parametrize("targets", [SHORT_NAMES, r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"],
                         ids=["unsloth-short-names", "ms-swift-regex"])
def test_foreign_adapter_applies_where_the_published_model_would(v1_base, tmp_path, targets):
    model, processor = v1_base
    deltas = _foreign_adapter(tmp_path / "adapter", model, targets)
    # Short names reach the decoder's attention, dense MLP, shared and routed experts, and never
    # CLIP's q/k/v (one fused qkv_proj in the published model) nor SAM.
    assert deltas and not [n for n in deltas if "vision_model" in n or "sam_model" in n]
    if isinstance(targets, list):
        assert any(".mlp.experts." in n for n in deltas) and any(".shared_experts." in n for n in deltas)
    batch = _inputs(model, processor)
    expected = _merged_logits(model, deltas, 8 / 4, batch)
    adapted = load_adapter(copy.deepcopy(model), tmp_path / "adapter", "adapted", V1)
    with torch.no_grad():
        got = adapted(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    wrapped = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for n, _ in adapted.named_parameters() if ".lora_A." in n}
    assert wrapped == set(deltas)


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
    assert cfg["target_modules"].startswith(r"model\.layers\.\d+\.(") and cfg["modules_to_save"] == ["model.projector.layers"]
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
