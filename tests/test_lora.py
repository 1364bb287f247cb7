"""LoRA resolver and ledger: exact trainable counts per group, nothing in vision or projector."""

import pytest
from peft import get_peft_model
from torch import nn

from finetune.lora import lora_config, parameter_ledger, resolve_targets
from finetune.models import load_model
from finetune.models.deepseek_ocr2 import DeepseekOcr2
from tests.helpers import TINY

LAYOUT = DeepseekOcr2.LAYOUT

# Tiny model: hidden 32, 2 decoder layers (layer 0 dense MLP 32->64, layer 1 MoE with
# 4 routed experts of width 16 and 1 shared expert of width 16). LoRA r=8 adds
# r * (in + out) per matrix: q,k,v,o 4 x 8 x 64 = 2,048 per layer.
EXPECTED = {
    "attention": {"attention": 4096},
    "attention+mlp": {"attention": 4096, "dense_mlp": 3 * 8 * (32 + 64), "shared_experts": 3 * 8 * (32 + 16)},
    # routed: gate_up A (8*4, 32) + B (32, 8*4) = 2,048; down A (8*4, 16) + B (32, 8*4) = 1,536
    "all": {"attention": 4096, "dense_mlp": 2304, "shared_experts": 1152, "routed_experts": 2048 + 1536},
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_ledger_exact_counts_per_preset(preset):
    _, model, _ = load_model(TINY)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(resolve_targets(model, preset, LAYOUT), r=8, alpha=16, dropout=0.0))
    ledger = parameter_ledger(peft_model, LAYOUT)
    trainable = {g: row["trainable"] for g, row in ledger.items() if g != "total" and row["trainable"]}
    assert trainable == EXPECTED[preset]
    assert ledger["vision"]["trainable"] == 0
    assert ledger["projector"]["trainable"] == 0
    assert ledger["router"]["trainable"] == 0
    assert ledger["total"]["trainable"] == sum(EXPECTED[preset].values())
    lora_modules = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora_modules and all(".language_model.layers." in n for n in lora_modules)


def test_resolver_never_touches_vision_encoder_twins(tiny):
    _, model, _ = tiny
    # OCR-2's vision encoder has q_proj/gate_proj too: bare suffixes would adapt it.
    twins = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(("q_proj", "gate_proj"))]
    assert any(n.startswith("model.vision_tower.") for n in twins)
    targets = resolve_targets(model, "all", LAYOUT)
    import re

    hits = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets.target_modules, n)]
    assert len(hits) == targets.n_modules == 2 * 4 + 3 + 3
    assert not [h for h in hits if "vision_tower" in h]
    assert targets.target_parameters == [
        "model.language_model.layers.1.mlp.experts.gate_up_proj",
        "model.language_model.layers.1.mlp.experts.down_proj",
    ]


def test_unknown_preset_is_an_error(tiny):
    with pytest.raises(ValueError, match="lora.preset 'everything'"):
        resolve_targets(tiny[1], "everything", LAYOUT)


def test_dora_adds_one_magnitude_per_output_feature_and_rslora_scales_by_sqrt_r():
    """DoRA on attention: + one magnitude per output feature of q,k,v,o (4 x 32 x 2 layers);
    rsLoRA: scale alpha / sqrt(r) = 16 / sqrt(8) instead of alpha / r = 2."""
    _, model, _ = load_model(TINY)
    model.requires_grad_(False)
    targets = resolve_targets(model, "attention", LAYOUT)
    dora = get_peft_model(model, lora_config(targets, r=8, alpha=16, dropout=0.0, use_dora=True))
    ledger = parameter_ledger(dora, LAYOUT)
    assert ledger["attention"]["trainable"] == 4096 + 4 * 32 * 2
    assert ledger["total"]["trainable"] == 4096 + 256

    _, model, _ = load_model(TINY)
    model.requires_grad_(False)
    rs = get_peft_model(model, lora_config(targets, r=8, alpha=16, dropout=0.0, use_rslora=True))
    q = rs.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / 8 ** 0.5)
    assert parameter_ledger(rs, LAYOUT)["total"]["trainable"] == 4096


def test_dora_with_routed_experts_is_refused_by_the_config(tmp_path):
    from finetune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="lora.use_dora: not available with lora.preset 'all'"):
        load_config(None, ["model.name=x", "data.path=y", "lora.preset=all", "lora.use_dora=true"])
