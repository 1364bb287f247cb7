"""ocrtune's own calls raise no deprecation warnings on the installed transformers/peft.

A FutureWarning or DeprecationWarning counts as ours when the innermost frame outside the
Python and site-packages trees, at the moment it is issued, lies in finetune/ or data_prep/:
we made the call (directly, or into a library that then used a renamed API on our model).
Run on both dependency sets CI installs (lowest allowed and newest), so a rename in a new
release shows up here before a user sees it printed."""

from __future__ import annotations

import sysconfig
import traceback
import warnings
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from finetune.config import load_config
from tests.helpers import REPO

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


OURS = (str(REPO / "finetune"), str(REPO / "data_prep"))
LIBRARY = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _caller_of(stack: list[traceback.FrameSummary]) -> str | None:
    """The innermost frame that is neither the standard library nor an installed package."""
    for frame in reversed(stack[:-1]):  # [-1] is the hook itself
        path = str(Path(frame.filename).resolve())
        if path.startswith(LIBRARY) or frame.filename.startswith("<"):
            continue
        return f"{path}:{frame.lineno}"
    return None


@pytest.fixture
def ours_raise():
    """Collect every deprecation warning whose innermost non-library frame is ours."""
    caught: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def hook(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (FutureWarning, DeprecationWarning)):
                where = _caller_of(traceback.extract_stack())
                if where is not None and where.startswith(OURS):
                    caught.append(f"{category.__name__} at {where}: {message}")
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = hook
        yield caught
    assert not caught, "\n".join(caught)


def _pages():
    pages = []
    for i, (w, h) in enumerate([(320, 80), (900, 220), (220, 640)]):  # wide, very wide (tiled), tall
        image = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(image).text((10, 10), f"line {i} 0123", fill="black")
        pages.append((str(i), image))
    return pages


@pytest.mark.parametrize("model", ["builtin:tiny-random-deepseek-ocr", "builtin:tiny-random-deepseek-ocr-2"])
def test_generation_raises_no_deprecation_from_our_calls(model, ours_raise):
    from finetune.generate import generate_pages, stream_page
    from finetune.runtime import load_for_inference
    from finetune.sequence import builder_for

    inf = load_for_inference(model, None, None, "float32", 30, 90, device="cpu")
    builder = builder_for(inf.family, inf.processor, inf.model.config, inf.prompt, inf.vision)
    batched = generate_pages(inf.model, builder, _pages(), 3, 8, guard=inf.guard)
    streamed = list(stream_page(inf.model, builder, _pages()[1], 8, guard=inf.guard))[-1]
    assert streamed.token_ids == batched[1].token_ids  # one decoding path, batched or streamed


@pytest.mark.parametrize("model", ["builtin:tiny-random-deepseek-ocr", "builtin:tiny-random-deepseek-ocr-2"])
def test_training_with_checkpointing_raises_no_deprecation_from_our_calls(model, tiny_dataset, tmp_path, ours_raise):
    from finetune.train import train

    cfg = load_config(REPO / "configs/runs/tiny_smoke.yaml",
                      [f"model.name={model}", f"data.path={tiny_dataset}", f"output_dir={tmp_path / 'run'}",
                       "train.max_steps=2", "train.gradient_checkpointing=true"])
    result = train(cfg, progress=False)
    assert result.summary["gradient_checkpointing"] is True
    from finetune.runtime import load_for_inference

    inf = load_for_inference(model, tmp_path / "run" / "adapter", None, "float32", 30, 90, device="cpu")
    assert inf.model.active_adapter == "adapted"
