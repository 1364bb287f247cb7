"""QLoRA (`model.quantization: nf4`): the decoder's Linear weights in 4-bit through bitsandbytes,
everything else as loaded, and the same adapter format as without quantization. Runs on this
CPU when bitsandbytes (>= 0.50, its CPU backend) is installed; without it, train names the
install command."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ConfigError, load_config
from tests.helpers import REPO, TINY, train_env

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
TINY_V1 = "builtin:tiny-random-deepseek-ocr"


def test_nf4_with_full_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="model.quantization nf4: lora.preset 'full' trains every weight, and "
                                          "4-bit weights cannot train"):
        load_config(REPO / "configs/runs/tiny_smoke.yaml", ["data.path=x", "model.quantization=nf4",
                                                            "lora.preset=full"])


@pytest.mark.integration  # a CLI subprocess
@pytest.mark.skipif(HAVE_BNB, reason="checks the message for a machine without bitsandbytes")
def test_nf4_without_bitsandbytes_exits_2_with_the_install_command(tiny_dataset, tmp_path):
    done = subprocess.run([sys.executable, "-m", "finetune.train", str(REPO / "configs/runs/tiny_smoke.yaml"),
                           f"data.path={tiny_dataset}", f"output_dir={tmp_path / 'run'}", "model.quantization=nf4",
                           "--no-progress"], cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: model.quantization nf4 needs the bitsandbytes package: pip install bitsandbytes")


def _train(data, out, model, *extra):
    from finetune.train import train

    cfg = load_config(REPO / "configs/runs/tiny_smoke.yaml", [f"data.path={data}", f"output_dir={out}",
                                                              f"model.name={model}", "train.max_steps=3", *extra])
    return train(cfg, progress=False)


@pytest.mark.integration  # training runs
@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")
@pytest.mark.parametrize("model", [TINY, TINY_V1], ids=["ocr2", "v1"])
def test_qlora_quantizes_the_decoder_only_and_writes_the_usual_adapter(tiny_dataset, tmp_path, model):
    import bitsandbytes as bnb

    from finetune.models import load_model

    plain = _train(tiny_dataset, tmp_path / "plain", model, "train.max_steps=1")
    result = _train(tiny_dataset, tmp_path / "nf4", model, "model.quantization=nf4")
    family = load_model(model)[0].family
    layers = "base_model.model." + family.LAYOUT.decoder_layers + "."
    four_bit = [n for n, m in result.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    linears = [n for n, m in result.model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n]
    assert four_bit and all(n.startswith(layers) for n in four_bit)  # the decoder's Linears, nothing else
    assert not [n for n in linears if n.startswith(layers)]  # and all of them
    assert all(m.weight.dtype == torch.uint8 for n, m in result.model.named_modules() if n in four_bit)
    # Vision tower, projector, embeddings and LM head: exactly the loaded weights.
    _, fresh, _ = load_model(model)
    reference = dict(fresh.named_parameters())
    kept = {n.removeprefix("base_model.model."): p for n, p in result.model.named_parameters()
            if not n.startswith(layers)}
    assert kept and all(torch.equal(p, reference[n]) for n, p in kept.items())
    # The ledger counts weights, not packed bytes; the adapter is the unquantized run's format.
    assert result.summary["ledger"]["total"] == plain.summary["ledger"]["total"]
    a = load_file(str(plain.saved_dir / "adapter_model.safetensors"))
    b = load_file(str(result.saved_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert json.loads((result.saved_dir / "adapter_config.json").read_text()) == \
        json.loads((plain.saved_dir / "adapter_config.json").read_text())
    # It loads on the unquantized base; ocrtune's loader checks every tensor landed.
    from finetune.lora import load_adapter

    resolved, base, _ = load_model(model)
    adapted = load_adapter(base, result.saved_dir, "adapted", resolved.family)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in adapted.modules())
