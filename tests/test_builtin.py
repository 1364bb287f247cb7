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


def test_pretrained_v1_base_reads_printed_lines_it_never_saw(tmp_path):
    """builtin:tiny-deepseek-ocr is a printed-text reader, not a random model: on freshly rendered
    printed lines (seed 12345; its pretraining used seed 1) its corpus CER stays far under 100%
    (28.1% on these 60 test lines, 32.6% on its own 240-line test split; builtin:tiny-random-deepseek-ocr: 772%)."""
    from data_prep.build import build_dataset
    from data_prep.synthetic import generate
    from finetune.evaluate import evaluate

    shipped = BUILTIN_DIR / "tiny-deepseek-ocr"
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 25 * 2**20  # the package budget
    generate("printed", 120, 12345, tmp_path / "scans", progress=False)
    build_dataset("manifest", tmp_path / "scans" / "manifest.jsonl", tmp_path / "data", val_fraction=0.05,
                  test_fraction=0.5, seed=0, overwrite=True, progress=False)
    report = evaluate("builtin:tiny-deepseek-ocr", tmp_path / "data", tmp_path / "eval", batch_size=32,
                      max_new_tokens=48, progress=False)
    base = report["systems"]["base"]
    assert base["n"] >= 50
    assert base["cer"] < 0.5, base["cer"]
