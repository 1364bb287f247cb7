"""The shipped tiny model is exactly what its build script makes (so it can be regenerated)."""

from safetensors.torch import load_file
import torch

from finetune.models import BUILTIN_DIR
from finetune.models.tiny import build_tiny_random


def test_tiny_random_regenerates_identically(tmp_path):
    build_tiny_random(tmp_path / "m", seed=0)
    shipped = BUILTIN_DIR / "tiny-random-deepseek-ocr-2"
    a, b = load_file(str(shipped / "model.safetensors")), load_file(str(tmp_path / "m" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (shipped / "tokenizer.json").read_text() == (tmp_path / "m" / "tokenizer.json").read_text()
