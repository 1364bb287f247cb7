"""Training in-process: base weights untouched, only LoRA tensors move, loss normalised per token."""

import json

import pytest
import torch

from finetune.config import load_config
from finetune.models import load_model
from finetune.train import train
from tests.helpers import REPO, TINY

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


def test_base_weights_bit_identical_after_training(tiny_dataset, tmp_path):
    cfg = load_config(REPO / "configs/runs/tiny_smoke.yaml",
                      [f"data.path={tiny_dataset}", f"output_dir={tmp_path / 'run'}", "train.max_steps=4"])
    result = train(cfg, progress=False)
    _, fresh, _ = load_model(TINY)
    reference = dict(fresh.named_parameters())
    moved = 0
    for name, param in result.model.named_parameters():
        if "lora_" in name:
            moved += int(param.requires_grad)
            continue
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param.detach(), reference[clean].detach()), name
    assert moved == 28  # 14 adapted Linear modules x (A, B)
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained
    import json

    meta = json.loads((tmp_path / "run" / "adapter" / "ocrtune_adapter.json").read_text())
    assert meta["vision"] == {"crop_to_patches": False, "min_tiles": 2, "max_tiles": 6, "mode": "base"}


def test_full_preset_trains_every_weight_and_saves_a_loadable_checkpoint(tiny_dataset, tmp_path):
    cfg = load_config(REPO / "configs/runs/tiny_smoke.yaml",
                      [f"data.path={tiny_dataset}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                       "lora.preset=full", "train.lr=1e-3"])
    result = train(cfg, progress=False)
    assert result.saved_dir == tmp_path / "run" / "model"
    assert not (tmp_path / "run" / "adapter").exists()
    written = sorted(p.name for p in result.saved_dir.iterdir())
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(written)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no staging left behind
    saved = json.loads((result.saved_dir / "config.json").read_text())  # OCR-2's published layout
    assert (saved["model_type"], saved["architectures"]) == ("deepseek_vl_v2", ["DeepseekOCR2ForCausalLM"])
    _, before, _ = load_model(TINY)
    _, after, _ = load_model(str(result.saved_dir))
    old = dict(before.named_parameters())
    changed = {name.split(".")[1] for name, p in after.named_parameters()
               if name.startswith("model.") and not torch.equal(p, old[name])}
    assert {"vision_tower", "language_model", "multi_modal_projector"} <= changed
    assert result.summary["ledger"]["total"]["trainable"] == result.summary["ledger"]["total"]["total"]


def test_unknown_preset_is_a_config_error(tmp_path):
    import pytest

    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match="lora.preset 'everything': choose one of attention, attention\\+mlp, all, full"):
        load_config(REPO / "configs/runs/tiny_smoke.yaml", ["data.path=x", "lora.preset=everything"])


def test_length_grouped_order_is_a_seeded_permutation_sorted_within_windows():
    from finetune.train import EpochShuffle

    lengths = [(i * 37) % 23 for i in range(100)]
    plain = EpochShuffle(100, seed=3)
    grouped = EpochShuffle(100, seed=3, lengths=lengths, window=20)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        grouped.set_epoch(epoch)
        a, b = list(plain), list(grouped)
        assert sorted(b) == list(range(100))
        for w in range(0, 100, 20):  # same samples per window as the shuffle, longest first
            assert sorted(a[w:w + 20]) == sorted(b[w:w + 20])
            assert [lengths[i] for i in b[w:w + 20]] == sorted((lengths[i] for i in b[w:w + 20]), reverse=True)
    grouped.set_epoch(0)
    first = list(grouped)
    grouped.set_epoch(1)
    assert list(grouped) != first  # a new order every epoch
    grouped.set_epoch(0)
    assert list(grouped) == first  # and the same order again for the same (seed, epoch): exact resume
