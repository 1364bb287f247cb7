"""DeepSeek-OCR-2's published layout (deepseek-ai/DeepSeek-OCR-2: config.json with model_type
deepseek_vl_v2 and architectures DeepseekOCR2ForCausalLM, the remote-code tensor names), the
one vLLM's DeepseekOCR2ForCausalLM loads: read, and written by `export --merge` whatever
layout the base was read from."""

import copy
import json
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.compat import get_peft_model
from finetune.export import export_merged
from finetune.lora import lora_config, resolve_targets, save_adapter
from finetune.models import BUILTIN_DIR, ModelNameError, load_model
from finetune.models.deepseek_ocr2 import DeepseekOcr2
from finetune.models.deepseek_ocr2.checkpoint import (PublishedLayoutError, config_from_published, is_published_config,
                                                      published_config, to_published)
from finetune.models.registry import family_for_config
from finetune.runtime import ADAPTER_META
from finetune.sequence import builder_for

OCR2 = DeepseekOcr2()
BASE = "builtin:tiny-random-deepseek-ocr-2"

# deepseek-ai/DeepSeek-OCR-2's config.json as published (language fields, repeated there at the
# top level for the remote code, left out; auto_map left out: neither reader uses it).
PUBLISHED = {
    "model_type": "deepseek_vl_v2", "architectures": ["DeepseekOCR2ForCausalLM"], "tile_tag": "2D",
    "global_view_pos": "head", "candidate_resolutions": [[1024, 1024]], "torch_dtype": "bfloat16",
    "projector_config": {"input_dim": 896, "model_type": "mlp_projector", "n_embed": 1280, "projector_type": "linear"},
    "vision_config": {"image_size": 1024, "mlp_ratio": 3.7362, "model_name": "deepencoderv2", "model_type": "vision",
                      "width": {"qwen2-0-5b": {"dim": 896},
                                "sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11],
                                              "heads": 12, "layers": 12, "width": 768}}},
    "language_config": {
        "architectures": ["DeepseekV2ForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1,
        "hidden_size": 1280, "intermediate_size": 6848, "kv_lora_rank": None, "lm_head": True,
        "max_position_embeddings": 8192, "moe_intermediate_size": 896, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_attention_heads": 10, "num_experts_per_tok": 6, "num_hidden_layers": 12,
        "num_key_value_heads": 10, "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "rm_head": False,
        "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "use_mla": False, "v_head_dim": 0,
        "vocab_size": 129280},
}


def test_the_published_config_reads_as_the_published_model():
    """The published config.json -> transformers' config -> a model (on the meta device) whose
    tensors, named as published, are the published checkpoint's: 2,707 keys, 64 routed experts
    per MoE layer one key each, the encoder's 24 layers, SAM's net_3 at the encoder's width."""
    from transformers import DeepseekOcr2ForConditionalGeneration

    config = config_from_published(PUBLISHED, "config.json", image_token_id=128815)
    t, s, e = config.text_config, config.vision_config.sam_config, config.vision_config.encoder_config
    assert (t.hidden_size, t.num_hidden_layers, t.n_routed_experts, t.num_experts_per_tok, t.moe_intermediate_size,
            t.vocab_size, t.head_dim) == (1280, 12, 64, 6, 896, 129280, 128)
    assert t.mlp_layer_types == ["dense"] + ["sparse"] * 11
    assert (s.hidden_size, s.num_hidden_layers, s.downsample_channels) == (768, 12, [512, 896])
    assert (e.hidden_size, e.num_hidden_layers, e.num_attention_heads, e.num_key_value_heads,
            e.intermediate_size) == (896, 24, 14, 2, 4864)
    assert config.image_token_id == 128815
    with torch.device("meta"):
        model = DeepseekOcr2ForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in to_published(model.state_dict()).items()}
    assert len(shapes) == 2707
    experts = [k for k in shapes if re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", k)]
    assert len(experts) == 11 * 64 * 3
    assert shapes["model.layers.1.mlp.experts.63.gate_proj.weight"] == (896, 1280)
    assert shapes["model.sam_model.net_3.weight"] == (896, 512, 3, 3)
    assert shapes["model.qwen2_model.query_768.weight"] == (144, 896)
    assert shapes["model.view_seperator"] == (1280,) and shapes["model.projector.layers.weight"] == (1280, 896)
    assert not [k for k in shapes if "language_model" in k or "vision_tower" in k]
    # written back, the fields vLLM and the remote code read are the published ones
    again = published_config(config)
    for key, value in PUBLISHED["language_config"].items():
        if key != "torch_dtype":
            assert again["language_config"][key] == value, key
    assert {k: again[k] for k in ("model_type", "architectures", "tile_tag", "global_view_pos")} == {
        k: PUBLISHED[k] for k in ("model_type", "architectures", "tile_tag", "global_view_pos")}
    assert again["projector_config"] == PUBLISHED["projector_config"]
    assert again["hidden_size"] == 1280 and again["n_routed_experts"] == 64  # the remote code reads the top level


def test_published_config_round_trips_the_tiny_model():
    _, model, _ = load_model(BASE)
    back = config_from_published(json.loads(json.dumps(published_config(model.config))), "x").to_dict()
    want = model.config.to_dict()
    for d in (back, want):
        for drop in ("_name_or_path", "architectures", "dtype", "transformers_version"):
            d.pop(drop, None)
        d["text_config"].pop("dtype", None)
        d["text_config"].pop("output_router_logits", None)  # a runtime switch (None or False by release)
        d["vision_config"].pop("dtype", None)
    # one expert group, written as 1 (vLLM refuses null): the same routing under topk_method greedy
    assert (want["text_config"].pop("n_group"), back["text_config"].pop("n_group")) == (None, 1)
    assert (want["text_config"].pop("topk_group"), back["text_config"].pop("topk_group")) == (None, 1)
    assert back == want


def test_the_registry_tells_the_families_apart_by_architectures():
    assert family_for_config(PUBLISHED, "c").MODEL_TYPE == "deepseek_ocr2"
    v1 = json.loads((BUILTIN_DIR / "tiny-random-deepseek-ocr" / "config.json").read_text())
    assert family_for_config(v1, "c").MODEL_TYPE == "deepseek_ocr"
    with pytest.raises(ModelNameError, match="is not DeepSeek-OCR \\(v1\\), and its architectures do not name "
                                             "DeepseekOCR2ForCausalLM"):
        family_for_config({**PUBLISHED, "architectures": []}, "c")
    bad = copy.deepcopy(PUBLISHED)
    bad["projector_config"]["projector_type"] = "mlp_gelu"
    with pytest.raises(PublishedLayoutError, match="c: projector_config.projector_type 'mlp_gelu'"):
        family_for_config(bad, "c")
    del bad["vision_config"]["width"]["qwen2-0-5b"]
    with pytest.raises(PublishedLayoutError, match="c: vision_config.width.qwen2-0-5b is missing"):
        family_for_config(bad, "c")


def test_a_folder_with_deepseeks_processor_config_gets_transformers_processor(tmp_path):
    """The published repository's processor_config.json is DeepSeek's own (for its remote
    code): transformers' processor at its defaults (the published settings) is used instead."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN_DIR / "tiny-random-deepseek-ocr-2" / name, tmp_path / name)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "DeepseekVLV2Processor", "candidate_resolutions": [[1024, 1024]], "patch_size": 16,
         "downsample_ratio": 4, "image_token": "<image>"}))
    processor = OCR2.load_processor(tmp_path)
    ip = processor.image_processor
    assert type(processor).__name__ == "DeepseekOcr2Processor"
    assert (ip.size["height"], ip.tile_size, ip.min_patches, ip.max_patches, ip.crop_to_patches) == (1024, 768, 2, 6, True)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 3


def _transformers_layout_copy(folder, max_shard_size="50GB"):
    """The tiny base saved the way transformers' own hub copy is read: transformers' tensor
    names (fused experts, language_model.*, vision_tower.*) and config.json."""
    from transformers import DeepseekOcr2ForConditionalGeneration

    src = BUILTIN_DIR / "tiny-random-deepseek-ocr-2"
    DeepseekOcr2ForConditionalGeneration.from_pretrained(str(src)).save_pretrained(
        str(folder), save_original_format=False, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(src / name, folder / name)
    keys = {k for shard in folder.glob("*.safetensors") for k in load_file(shard)}
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in keys
    return str(folder)


def _tensors(folder):
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


@pytest.mark.parametrize("shard_size", ["50GB", "200KB"])
def test_a_transformers_layout_folder_is_converted_for_vllm(tmp_path, shard_size):
    """What `--engine vllm` hands vLLM for an OCR-2 checkpoint in transformers' layout: the
    published config.json and tensors, shard by shard, equal tensor for tensor to the published
    checkpoint it was made from; a published folder is used as it is."""
    src = tmp_path / "base"
    _transformers_layout_copy(src, shard_size)
    n_shards = len(list(src.glob("*.safetensors")))
    assert (n_shards == 1) == (shard_size == "50GB")
    out = OCR2.published_checkpoint(src, tmp_path / "published")
    assert out == tmp_path / "published"
    assert is_published_config(json.loads((out / "config.json").read_text()))
    assert len(list(out.glob("*.safetensors"))) == n_shards
    assert (out / "model.safetensors.index.json").is_file() == (n_shards > 1)
    expected = _tensors(BUILTIN_DIR / "tiny-random-deepseek-ocr-2")  # stored under the published names
    got = _tensors(out)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    if n_shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(index) == set(got) and all((out / shard).is_file() for shard in index.values())
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert OCR2.published_checkpoint(out, tmp_path / "again") == out and not (tmp_path / "again").exists()


@pytest.mark.parametrize("layout", ["published", "transformers"])
def test_merge_export_writes_the_published_layout_and_loads_back(tmp_path, layout):
    """An adapter on everything (attention, MLPs, routed experts, vision encoder LoRA, trained
    projector) merged: the published key set and config.json whichever layout the base came
    in, and ocrtune reads the folder back to the adapted model's logits."""
    base_name = BASE if layout == "published" else _transformers_layout_copy(tmp_path / "base")
    _, model, processor = load_model(base_name)
    targets = resolve_targets(model, "all", OCR2.LAYOUT, vision_lora=True)
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(targets, r=4, alpha=8, dropout=0.0,
                                                                   modules_to_save=["model.multi_modal_projector"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(peft_model, tmp_path / "adapter", OCR2)
    (tmp_path / "adapter" / ADAPTER_META).write_text(json.dumps({"base_model": base_name, "family": OCR2.MODEL_TYPE}))

    export_merged(tmp_path / "adapter", tmp_path / "merged")
    raw = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (raw["model_type"], raw["architectures"], raw["tile_tag"]) == ("deepseek_vl_v2", ["DeepseekOCR2ForCausalLM"], "2D")
    lang = raw["language_config"]
    assert (lang["qk_nope_head_dim"], lang["qk_rope_head_dim"], lang["kv_lora_rank"], lang["use_mla"]) == (0, 0, None, False)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        merged_keys = set(f.keys())
    with safe_open(str(BUILTIN_DIR / "tiny-random-deepseek-ocr-2" / "model.safetensors"), "pt") as f:
        assert merged_keys == set(f.keys())  # the builtin base is stored under the published names
    for name in ("tokenizer.json", "processor_config.json"):  # the base's, byte for byte
        assert (tmp_path / "merged" / name).read_bytes() == (BUILTIN_DIR / "tiny-random-deepseek-ocr-2" / name).read_bytes()

    resolved, merged, _ = load_model(str(tmp_path / "merged"))
    assert resolved.family.MODEL_TYPE == "deepseek_ocr2"
    builder = builder_for(OCR2, processor, model.config, "<image>\nFree OCR.", OCR2.vision_settings(processor, "gundam"))
    batch = builder.collate([builder.build("p", Image.new("RGB", (300, 200), "white"), "total 12")])
    for key in ("ids", "labels"):
        batch.pop(key)
    with torch.no_grad():
        expected = peft_model(**batch).logits
        assert (expected - model(**batch).logits).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def _real_size_processor():
    """transformers' processor at its defaults: the published sizes (1024 global view, 768
    tiles, 2-6 tiles), around the builtin tokenizer."""
    from transformers import AutoTokenizer, DeepseekOcr2ImageProcessor, DeepseekOcr2Processor

    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_DIR / "tiny-random-deepseek-ocr-2"))
    return DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessor(), tokenizer=tokenizer)


def test_views_are_deepseeks_not_the_image_processors():
    """A 700 x 1900 page at the published sizes: the global view is DeepSeek's (PIL's pad:
    bicubic, centred with round(), so 324 grey columns on the left where transformers' processor
    leaves 323), three 768 tiles cut top to bottom from the page resized to 768 x 2304, and 256 +
    3 x 144 + 1 placeholders. Base mode keeps the 1024 view its 257 placeholders stand for."""
    import numpy as np
    from PIL import ImageOps

    processor = _real_size_processor()
    page = Image.new("RGB", (700, 1900), (30, 60, 90))
    page.paste((200, 10, 10), (0, 0, 700, 950))  # a top half unlike the bottom: tile order shows

    def tensor(view):
        return (torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5

    pixels, n = OCR2.encode_image(processor, page, OCR2.vision_settings(processor, "gundam"))
    expected = tensor(ImageOps.pad(page, (1024, 1024), method=Image.BICUBIC, color=(127, 127, 127)))
    assert torch.equal(pixels["pixel_values"][0], expected)
    grey = (pixels["pixel_values"][0, :, 512] == expected[:, 512, :1]).all(0)  # the middle row, column by column
    assert int(grey.int().argmin()) == 324
    resized = page.resize((768, 2304), Image.BICUBIC)
    tiles = torch.stack([tensor(resized.crop((0, 768 * r, 768, 768 * (r + 1)))) for r in range(3)])
    assert pixels["num_local_patches"] == 3 and torch.equal(pixels["pixel_values_local"], tiles)
    assert n == 256 + 3 * 144 + 1

    pixels, n = OCR2.encode_image(processor, page, OCR2.vision_settings(processor, "base"))
    assert torch.equal(pixels["pixel_values"][0], expected) and pixels["pixel_values_local"] is None and n == 257


def test_engines_fetch_the_published_repository_and_ocrtune_transformers_copy(tmp_path, monkeypatch):
    """deepseek-ai/DeepSeek-OCR-2 is fetched as transformers' copy for ocrtune's own loading,
    and as published for vLLM (resolve_model(hub_aliases=False)). Only the Hub is faked."""
    import huggingface_hub

    from finetune.models import resolve_model

    folder = tmp_path / "snapshot"
    shutil.copytree(BUILTIN_DIR / "tiny-random-deepseek-ocr-2", folder)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(folder))
    assert resolve_model("deepseek-ai/DeepSeek-OCR-2").family.MODEL_TYPE == "deepseek_ocr2"
    resolve_model("deepseek-ai/DeepSeek-OCR-2", hub_aliases=False)
    assert asked == ["deepseek-community/DeepSeek-OCR-2", "deepseek-ai/DeepSeek-OCR-2"]


def test_a_folder_without_weights_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "base").mkdir()
    shutil.copy(BUILTIN_DIR / "tiny-random-deepseek-ocr-2" / "config.json", tmp_path / "base" / "config.json")
    with pytest.raises(ModelNameError, match=r"base: no \*\.safetensors weights to convert to the published layout"):
        OCR2.published_checkpoint(tmp_path / "base", tmp_path / "published")
    assert not (tmp_path / "published").exists()
