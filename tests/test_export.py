"""`ocrtune export`: the adapter as vLLM loads it (published names, no modules_to_save), refused
with a reason when vLLM would drop part of it, and `--merge` into a full published-layout
checkpoint that loads back with the adapter's outputs."""

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.compat import get_peft_model
from finetune.export import ExportError, export_adapter, export_merged
from finetune.lora import load_adapter, lora_config, resolve_targets, save_adapter
from finetune.models import load_model, resolve_model
from finetune.models.deepseek_ocr import DeepseekOcr
from finetune.runtime import ADAPTER_META
from finetune.sequence import builder_for

V1 = DeepseekOcr()
BASE = "builtin:tiny-random-deepseek-ocr"


@pytest.fixture(scope="module")
def base():
    _, model, processor = load_model(BASE)
    builder = builder_for(V1, processor, model.config, "<image>\nFree OCR.", V1.vision_settings(processor, "gundam"))
    batch = builder.collate([builder.build("p", Image.new("RGB", (900, 500), "white"), "x")])
    for key in ("ids", "labels"):
        batch.pop(key)
    return model, batch


def _adapter(folder, model, preset="all", projector=False):
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(
        resolve_targets(model, preset, V1.LAYOUT), r=4, alpha=8, dropout=0.0,
        modules_to_save=["model.projector"] if projector else None))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    folder.mkdir()
    save_adapter(peft_model, folder, V1)
    (folder / ADAPTER_META).write_text(json.dumps({"base_model": BASE, "family": V1.MODEL_TYPE}))
    return peft_model


def test_vllm_adapter_has_published_names_and_loads_back_identically(base, tmp_path):
    model, batch = base
    peft_model = _adapter(tmp_path / "adapter", model)
    done = export_adapter(tmp_path / "adapter", tmp_path / "vllm")
    keys = set(load_file(tmp_path / "vllm" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["base_model_name_or_path"] == BASE
    # One full published name per adapted module: attention, dense MLP, shared and routed experts.
    assert done["modules"] == len(cfg["target_modules"]) == len(keys) // 2
    assert "model.layers.1.mlp.experts.3.gate_proj" in cfg["target_modules"]
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = load_adapter(copy.deepcopy(model), tmp_path / "vllm", "adapted", V1)(**batch).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_projector_adapter_is_refused_and_merge_is_the_way(base, tmp_path):
    model, batch = base
    peft_model = _adapter(tmp_path / "adapter", model, preset="attention", projector=True)
    with pytest.raises(ExportError, match=r"modules_to_save \['model\.projector\.layers'\].*vLLM refuses them.*"
                                          r"tensors outside the language model.*--merge"):
        export_adapter(tmp_path / "adapter", tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()

    done = export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert done == {"family": "deepseek_ocr", "base_model": BASE}
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(files)
    base_dir = resolve_model(BASE).path
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):  # the base's, unchanged
        assert (tmp_path / "merged" / name).read_bytes() == (base_dir / name).read_bytes()
    raw = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert raw["model_type"] == "deepseek_vl_v2" and raw["tile_tag"] == "2D"
    assert "model.projector.layers.weight" in load_file(tmp_path / "merged" / "model.safetensors")
    _, merged, _ = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft_model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_existing_output_is_kept(base, tmp_path):
    model, _ = base
    _adapter(tmp_path / "adapter", model, preset="attention")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="--output .*out already exists; pass --overwrite"):
        export_adapter(tmp_path / "adapter", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    export_adapter(tmp_path / "adapter", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                   ADAPTER_META]


def test_bad_adapter_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: expected adapter_config.json and adapter_model.safetensors"):
        export_adapter(tmp_path / "empty", tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/adapter_config.json: invalid JSON"):
        export_merged(broken, tmp_path / "out")
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"broken: no ocrtune_adapter.json names the base model: pass --model"):
        export_merged(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
