"""DeepSeek-OCR (v1), native: token layout per resolution mode, the official checkpoint
layout (tiny round trip with values, real dimensions on the meta device), the published
LoRA arithmetic at full size, and gradients reaching the projector and vision LoRA when
asked (the official code runs them under no_grad)."""

import json
import shutil

import pytest
import torch
from PIL import Image

from finetune.lora import lora_config, parameter_ledger, resolve_targets
from finetune.models import BUILTIN_DIR, ModelNameError, load_model
from finetune.models.deepseek_ocr import DeepseekOcr
from finetune.models.deepseek_ocr import processor as v1
from finetune.models.deepseek_ocr.checkpoint import (
    OfficialLayoutError,
    check_keys,
    config_from_official,
    from_official,
    to_official,
)
from finetune.models.deepseek_ocr.modeling import DeepseekOcrForConditionalGeneration
from finetune.sequence import builder_for

TINY_V1 = "builtin:tiny-random-deepseek-ocr"

# deepseek-ai/DeepSeek-OCR's config.json, the fields that shape the model (REFERENCE.md section 1).
OFFICIAL_CONFIG = {
    "architectures": ["DeepseekOCRForCausalLM"],
    "model_type": "deepseek_vl_v2",
    "language_config": {
        "vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848, "moe_intermediate_size": 896,
        "num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 10, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "max_position_embeddings": 8192, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
        "use_mla": False, "norm_topk_prob": False, "bos_token_id": 0, "eos_token_id": 1,
    },
    "projector_config": {"input_dim": 2048, "n_embed": 1280, "projector_type": "linear"},
    "vision_config": {
        "image_size": 1024, "mlp_ratio": 3.7362, "model_name": "deeplip_b_l",
        "width": {
            "clip-l-14-224": {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024},
            "sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11], "heads": 12,
                          "layers": 12, "width": 768},
        },
    },
}


def official_shapes() -> dict[str, tuple]:
    """Every tensor of the published checkpoint (2,710), by name, as the file declares them."""
    s = {"model.sam_model.pos_embed": (1, 64, 64, 768), "model.sam_model.patch_embed.proj.weight": (768, 3, 16, 16),
         "model.sam_model.patch_embed.proj.bias": (768,)}
    for i in range(12):
        b, rows = f"model.sam_model.blocks.{i}.", 127 if i in (2, 5, 8, 11) else 27
        s.update({b + "norm1.weight": (768,), b + "norm1.bias": (768,), b + "attn.rel_pos_h": (rows, 64),
                  b + "attn.rel_pos_w": (rows, 64), b + "attn.qkv.weight": (2304, 768), b + "attn.qkv.bias": (2304,),
                  b + "attn.proj.weight": (768, 768), b + "attn.proj.bias": (768,), b + "norm2.weight": (768,),
                  b + "norm2.bias": (768,), b + "mlp.lin1.weight": (3072, 768), b + "mlp.lin1.bias": (3072,),
                  b + "mlp.lin2.weight": (768, 3072), b + "mlp.lin2.bias": (768,)})
    s.update({"model.sam_model.neck.0.weight": (256, 768, 1, 1), "model.sam_model.neck.1.weight": (256,),
              "model.sam_model.neck.1.bias": (256,), "model.sam_model.neck.2.weight": (256, 256, 3, 3),
              "model.sam_model.neck.3.weight": (256,), "model.sam_model.neck.3.bias": (256,),
              "model.sam_model.net_2.weight": (512, 256, 3, 3), "model.sam_model.net_3.weight": (1024, 512, 3, 3)})
    v = "model.vision_model."
    s.update({v + "embeddings.class_embedding": (1024,), v + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
              v + "embeddings.position_embedding.weight": (257, 1024), v + "pre_layrnorm.weight": (1024,),
              v + "pre_layrnorm.bias": (1024,)})
    for i in range(24):
        b = f"{v}transformer.layers.{i}."
        s.update({b + "layer_norm1.weight": (1024,), b + "layer_norm1.bias": (1024,),
                  b + "self_attn.qkv_proj.weight": (3072, 1024), b + "self_attn.qkv_proj.bias": (3072,),
                  b + "self_attn.out_proj.weight": (1024, 1024), b + "self_attn.out_proj.bias": (1024,),
                  b + "layer_norm2.weight": (1024,), b + "layer_norm2.bias": (1024,), b + "mlp.fc1.weight": (4096, 1024),
                  b + "mlp.fc1.bias": (4096,), b + "mlp.fc2.weight": (1024, 4096), b + "mlp.fc2.bias": (1024,)})
    s.update({"model.projector.layers.weight": (1280, 2048), "model.projector.layers.bias": (1280,),
              "model.image_newline": (1280,), "model.view_seperator": (1280,),
              "model.embed_tokens.weight": (129280, 1280), "model.norm.weight": (1280,),
              "lm_head.weight": (129280, 1280)})
    for i in range(12):
        b = f"model.layers.{i}."
        s.update({b + "input_layernorm.weight": (1280,), b + "post_attention_layernorm.weight": (1280,)})
        s.update({f"{b}self_attn.{p}_proj.weight": (1280, 1280) for p in "qkvo"})
        if i == 0:
            s.update({b + "mlp.gate_proj.weight": (6848, 1280), b + "mlp.up_proj.weight": (6848, 1280),
                      b + "mlp.down_proj.weight": (1280, 6848)})
            continue
        s[b + "mlp.gate.weight"] = (64, 1280)
        for e in range(64):
            s.update({f"{b}mlp.experts.{e}.gate_proj.weight": (896, 1280), f"{b}mlp.experts.{e}.up_proj.weight": (896, 1280),
                      f"{b}mlp.experts.{e}.down_proj.weight": (1280, 896)})
        s.update({b + "mlp.shared_experts.gate_proj.weight": (1792, 1280),
                  b + "mlp.shared_experts.up_proj.weight": (1792, 1280),
                  b + "mlp.shared_experts.down_proj.weight": (1280, 1792)})
    return s


@pytest.fixture(scope="module")
def real_processor():
    """The official processor settings (patch 16, downsample 4, the five modes, crops 2-6)."""
    _, _, proc = load_model(TINY_V1)
    return v1.DeepseekOcrProcessor(proc.tokenizer)


@pytest.fixture(scope="module")
def full_size_meta_model():
    config = config_from_official(OFFICIAL_CONFIG, "test", image_token_id=128815)
    with torch.device("meta"):
        return DeepseekOcrForConditionalGeneration(config)


# --- token layout --------------------------------------------------------------------------

@pytest.mark.parametrize("mode,tokens,ids,side", [("tiny", 64, 73, 512), ("small", 100, 111, 640),
                                                  ("base", 256, 273, 1024), ("large", 400, 421, 1280)])
@pytest.mark.parametrize("page", [(800, 1200), (1600, 900), (500, 500), (3000, 400)])
def test_single_view_modes_count_tokens_and_ids(real_processor, mode, tokens, ids, side, page):
    vision = DeepseekOcr().vision_settings(real_processor, mode)
    pixels, n = v1.encode_image(real_processor, Image.new("RGB", page, "white"), vision)
    assert n == ids
    assert v1.vision_tokens(real_processor, vision, pixels["grid"]) == tokens
    assert tuple(pixels["pixel_values"].shape) == (1, 3, side, side)
    assert pixels["pixel_values_local"] is None


@pytest.mark.parametrize("page,grid,ids", [
    ((1000, 1500), (2, 3), 903),  # portrait: 2 tiles across, 3 down = 273 + 21 x 30
    ((2000, 1000), (2, 1), 273 + 21 * 10),
    ((1500, 1500), (2, 2), 273 + 21 * 20),  # square: 1 x 1 is below min_crops
    ((3000, 500), (6, 1), 273 + 61 * 10),  # capped at max_crops = 6
    ((600, 400), (1, 1), 273),  # within one 640 tile: no tiles, global view only
])
def test_gundam_tiles_by_aspect_ratio(real_processor, page, grid, ids):
    vision = DeepseekOcr().vision_settings(real_processor, "gundam")
    assert (vision.base_size, vision.image_size, vision.min_tiles, vision.max_tiles) == (1024, 640, 2, 6)
    pixels, n = v1.encode_image(real_processor, Image.new("RGB", page, "white"), vision)
    assert pixels["grid"] == grid and n == ids
    assert v1.vision_tokens(real_processor, vision, grid) == 256 + (100 * grid[0] * grid[1] if grid != (1, 1) else 0)
    local = pixels["pixel_values_local"]
    assert (local is None) if grid == (1, 1) else tuple(local.shape) == (grid[0] * grid[1], 3, 640, 640)


def test_global_view_padding_is_mean_grey_and_small_modes_squash(real_processor):
    page = Image.new("RGB", (400, 200), "white")
    base, _ = v1.encode_image(real_processor, page, DeepseekOcr().vision_settings(real_processor, "base"))
    px = base["pixel_values"][0]
    grey = (127 / 255 - 0.5) / 0.5  # mean = std = 0.5
    assert torch.allclose(px[:, 0, :], torch.full_like(px[:, 0, :], grey))  # top band is padding
    assert torch.allclose(px[:, 512, :], torch.ones_like(px[:, 512, :]))  # the page, white
    tiny, _ = v1.encode_image(real_processor, page, DeepseekOcr().vision_settings(real_processor, "tiny"))
    assert torch.allclose(tiny["pixel_values"], torch.ones_like(tiny["pixel_values"]))  # squashed: no padding


@pytest.mark.parametrize("mode", DeepseekOcr.MODES)
def test_tiny_model_agrees_with_processor_and_places_newlines(mode):
    _, model, proc = load_model(TINY_V1)
    vision = DeepseekOcr().vision_settings(proc, mode)
    builder = builder_for(DeepseekOcr(), proc, model.config, "<image>\nFree OCR.", vision)
    pages = [Image.new("RGB", size, "white") for size in ((200, 60), (60, 150), (30, 30))]
    examples = [builder.build(str(i), p, "ab") for i, p in enumerate(pages)]
    batch = builder.collate(examples)
    batch.pop("ids")
    out = model(**batch)  # a placeholder/feature mismatch raises
    assert torch.isfinite(out.loss)
    feats = model.model.image_features(batch["pixel_values"], batch.get("pixel_values_local"), batch["images_spatial_crop"])
    for f, grid, ex in zip(feats, batch["images_spatial_crop"].tolist(), examples):
        assert f.shape[0] == ex.input_ids.count(model.config.image_token_id)
        assert torch.equal(f[-1], model.model.view_seperator)
        g = proc.tokens_per_side(vision.base_size)
        global_rows = f[-1 - g * (g + 1):-1].reshape(g, g + 1, -1)
        assert torch.equal(global_rows[:, -1], model.model.image_newline.expand(g, -1))


# --- the official checkpoint layout ----------------------------------------------------------

def test_real_dimensions_key_and_shape_check(full_size_meta_model):
    published = official_shapes()
    assert len(published) == 2710
    assert sum(torch.Size(s).numel() for s in published.values()) == 3_336_106_240  # 6.67 GB in bf16
    expected = {k: tuple(v.shape) for k, v in full_size_meta_model.state_dict().items()}
    meta = {k: torch.empty(s, device="meta") for k, s in published.items()}
    check_keys(expected, from_official(meta), "published layout")  # raises on any mismatch
    written = to_official({k: torch.empty(s, device="meta") for k, s in expected.items()})
    assert {k: tuple(v.shape) for k, v in written.items()} == published


def _write_official_copy(folder, seed=1):
    """A copy of the tiny v1 checkpoint with fresh random values, written as official tensors."""
    from safetensors.torch import load_file, save_file

    src = BUILTIN_DIR / "tiny-random-deepseek-ocr"
    shutil.copytree(src, folder)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def test_tiny_official_checkpoint_loads_every_tensor_where_it_belongs(tmp_path):
    written = _write_official_copy(tmp_path / "ckpt")
    assert "model.vision_model.transformer.layers.0.self_attn.qkv_proj.weight" in written
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in written and "model.sam_model.net_3.weight" in written
    _, model, _ = load_model(str(tmp_path / "ckpt"))
    params = dict(model.named_parameters())
    native = from_official(written)
    assert set(native) == set(params)
    for key, value in native.items():
        assert torch.equal(params[key].detach(), value), key
    w = written["model.vision_model.transformer.layers.0.self_attn.qkv_proj.weight"]
    attn = model.model.vision_model.transformer.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, w[:32]) and torch.equal(attn.v_proj.weight, w[64:])
    assert torch.equal(model.model.sam_model.proj.conv2.weight, written["model.sam_model.net_3.weight"])
    assert torch.equal(model.model.language_model.layers[1].mlp.experts.down_proj[3],
                       written["model.layers.1.mlp.experts.3.down_proj.weight"])
    assert torch.equal(model.model.view_seperator, written["model.view_seperator"])


def test_missing_and_unexpected_keys_are_listed_by_official_name(tmp_path):
    from safetensors.torch import save_file

    tensors = _write_official_copy(tmp_path / "ckpt")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(32)
    save_file(tensors, str(tmp_path / "ckpt/model.safetensors"))
    with pytest.raises(OfficialLayoutError) as err:
        load_model(str(tmp_path / "ckpt"))
    msg = str(err.value)
    assert "1 missing (model.layers.1.mlp.experts.3.up_proj.weight)" in msg
    assert "1 unexpected (model.layers.0.self_attn.q_norm.weight)" in msg


def test_pickled_weights_are_never_loaded(tmp_path):
    folder = tmp_path / "ckpt"
    _write_official_copy(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(OfficialLayoutError, match="no \\*.safetensors"):
        load_model(str(folder))


def test_deepseek_vl_v2_neither_v1_nor_ocr2_is_refused_naming_both(tmp_path):
    """No CLIP-L (not v1) and no DeepseekOCR2ForCausalLM in architectures (not OCR-2's
    published layout, which test_ocr2_published reads): DeepSeek-VL2, say."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_vl_v2", "vision_config": {"width": {}}}))
    with pytest.raises(ModelNameError, match=r"not DeepSeek-OCR \(v1\), and its architectures do not name "
                                             "DeepseekOCR2ForCausalLM"):
        load_model(str(tmp_path))


def test_saved_full_model_round_trips(tmp_path):
    _, model, proc = load_model(TINY_V1)
    model.save_pretrained(tmp_path / "saved")
    proc.save_pretrained(tmp_path / "saved")
    _, again, _ = load_model(str(tmp_path / "saved"))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- LoRA ledger at full size, and gradients into vision when asked ----------------------------

def test_full_size_ledger_reproduces_published_lora_count(full_size_meta_model):
    from peft import get_peft_model

    model = full_size_meta_model
    model.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(resolve_targets(model, "all", DeepseekOcr.LAYOUT), r=16, alpha=16, dropout=0.0))
    ledger = parameter_ledger(peft_model, DeepseekOcr.LAYOUT)
    trainable = {g: row["trainable"] for g, row in ledger.items() if row["trainable"] and g != "total"}
    assert trainable == {"attention": 1_966_080, "dense_mlp": 390_144, "shared_experts": 11 * 147_456,
                         "routed_experts": 11 * 64 * 104_448}
    assert ledger["total"]["trainable"] == 77_509_632
    assert ledger["total"]["total"] - 77_509_632 == 3_336_106_240
    assert round(100 * 77_509_632 / ledger["total"]["total"], 2) == 2.27


def test_projector_and_vision_lora_get_gradients_when_asked():
    from peft import get_peft_model

    _, model, proc = load_model(TINY_V1)
    model.requires_grad_(False)
    targets = resolve_targets(model, "attention", DeepseekOcr.LAYOUT, vision_lora=True)
    peft_model = get_peft_model(model, lora_config(targets, r=4, alpha=8, dropout=0.0,
                                                   modules_to_save=list(DeepseekOcr.LAYOUT.projector_modules)))
    ledger = parameter_ledger(peft_model, DeepseekOcr.LAYOUT)
    assert ledger["projector"]["trainable"] == 64 * 32 + 32  # Linear(2048 -> 1280) at tiny size: 64 -> 32
    assert ledger["vision"]["trainable"] == 4 * (4 * (32 + 32) + (32 + 64) + (64 + 32))  # q,k,v,out,fc1,fc2 r=4
    builder = builder_for(DeepseekOcr(), proc, model.config, "<image>\nFree OCR.", DeepseekOcr().vision_settings(proc))
    batch = builder.collate([builder.build("a", Image.new("RGB", (120, 40), "white"), "ab")])
    batch.pop("ids")
    peft_model.train()
    peft_model(**batch).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    proj = [g for n, g in grads.items() if "projector.modules_to_save" in n]
    vis = [g for n, g in grads.items() if "vision_model" in n and "lora_B" in n]
    assert proj and all(g is not None and g.abs().sum() > 0 for g in proj)
    assert vis and all(g is not None and g.abs().sum() > 0 for g in vis)


def test_written_config_has_the_fields_the_official_code_and_vllm_require():
    """tile_tag 2D and the global view first (the official code and vLLM refuse others), plain
    attention spelled the DeepSeek-V2 way (zero rope/nope split, no MLA ranks: else vLLM builds
    MLA), one expert group, and an integer expert count even for a decoder without MoE layers."""
    from finetune.models.deepseek_ocr.checkpoint import official_config

    raw = official_config(config_from_official(OFFICIAL_CONFIG, "official", 128815))
    assert (raw["tile_tag"], raw["global_view_pos"], raw["candidate_resolutions"]) == ("2D", "head", [[1024, 1024]])
    lang = raw["language_config"]
    assert {k: lang[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank",
                                 "n_group", "topk_group", "use_mla")} == {
        "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0, "kv_lora_rank": None, "q_lora_rank": None,
        "n_group": 1, "topk_group": 1, "use_mla": False}
    dense = dict(OFFICIAL_CONFIG, language_config=dict(OFFICIAL_CONFIG["language_config"], first_k_dense_replace=12))
    lang = official_config(config_from_official(dense, "dense", 128815))["language_config"]
    assert lang["n_routed_experts"] == 64 and lang["first_k_dense_replace"] == lang["num_hidden_layers"] == 12
    assert config_from_official({**dense, "language_config": lang}, "x", 1).text_config.mlp_layer_types == ["dense"] * 12
    with pytest.raises(OfficialLayoutError, match="tile_tag '1D'"):
        config_from_official(dict(OFFICIAL_CONFIG, tile_tag="1D"), "x", 1)
