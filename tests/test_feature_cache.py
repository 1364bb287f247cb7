"""train.cache_vision_features: each training image is encoded once and its features reused in
later epochs. The loss at every step equals the uncached run's (to float rounding: a cached
page was encoded in another batch), the adapters agree, and the cache saw every training page
exactly once."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from finetune.config import ConfigError, load_config
from finetune.train import train
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


TINY_V1 = "builtin:tiny-random-deepseek-ocr"


def _run(dataset, out, *extra):
    cfg = load_config(REPO / "configs/runs/tiny_smoke.yaml",
                      [f"model.name={TINY_V1}", f"data.path={dataset}", f"output_dir={out}", "lora.preset=all",
                       "train.max_steps=12", "train.batch_size=4", "train.grad_accum=2", *extra])
    return train(cfg, progress=False)


def test_cached_features_give_the_uncached_loss_at_every_step(tiny_dataset, tmp_path):
    plain = _run(tiny_dataset, tmp_path / "plain")
    cached = _run(tiny_dataset, tmp_path / "cached", "train.cache_vision_features=true")
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("plain", "cached")}
    assert [r["sample_ids"] for r in rows["plain"]] == [r["sample_ids"] for r in rows["cached"]]
    seen = [i for r in rows["plain"] for i in r["sample_ids"]]
    assert len(set(seen)) == plain.summary["train_samples"] and len(seen) > 2 * len(set(seen))  # > two epochs
    # Steps of first-seen pages run the very same computation: equal to the bit. Later steps use
    # features encoded in another batch: equal to float rounding (bit-equal on this CPU too).
    first = set()
    for plain_row, cached_row in zip(rows["plain"], rows["cached"]):
        fresh = not first.intersection(plain_row["sample_ids"])
        first.update(plain_row["sample_ids"])
        if fresh:
            assert cached_row["loss"] == plain_row["loss"], plain_row["step"]
    np.testing.assert_allclose([r["loss"] for r in rows["cached"]], [r["loss"] for r in rows["plain"]],
                               rtol=1e-5, atol=0)
    stats = cached.summary["vision_feature_cache"]
    assert stats["images"] == stats["misses"] == plain.summary["train_samples"]
    assert stats["hits"] == len(seen) - stats["misses"] and stats["bytes"] > 0
    assert plain.summary["vision_feature_cache"] is None
    a = load_file(tmp_path / "plain/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "cached/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("extra, message", [
    (("lora.train_projector=true",), "train.cache_vision_features: the vision features change while training "
                                     "with lora.train_projector; turn one or the other off"),
    (("lora.vision_lora=true",), "with lora.vision_lora;"),
    (("lora.preset=full",), "with lora.preset full;"),
])
def test_cache_refused_when_the_vision_side_trains(tiny_dataset, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(tiny_dataset, tmp_path / "run", "train.cache_vision_features=true", *extra)
    assert not (tmp_path / "run").exists()


def test_cache_refused_for_ocr2_through_the_cli(tiny_dataset, tmp_path):
    proc = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={tiny_dataset}",
                   f"output_dir={tmp_path / 'run'}", "train.cache_vision_features=true", "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: train.cache_vision_features: supported for DeepSeek-OCR "
                                                    "(v1) only, not deepseek_ocr2")
