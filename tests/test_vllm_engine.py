"""`--engine vllm` offers only what vLLM reproduces, and says why otherwise. (The engine's
token-for-token agreement with ocrtune is checked by benchmarks/vllm_parity.py in vLLM's own
virtualenv; see BENCHMARKS.md.)"""

import importlib.util

import pytest

from finetune.decoding import RepetitionGuard
from finetune.errors import OcrtuneError
from finetune.models import load_model
from finetune.models.deepseek_ocr import DeepseekOcr
from finetune.models.deepseek_ocr2 import DeepseekOcr2
from finetune.vllm_engine import VllmEngine, check_supported


def test_only_v1_gundam_with_vllms_sizes_is_offered():
    _, _, tiny = load_model("builtin:tiny-random-deepseek-ocr")
    official = type(tiny)(tiny.tokenizer)  # the official view sizes (the tiny model's are smaller)
    v1 = DeepseekOcr()
    check_supported("deepseek_ocr", v1.vision_settings(official, "gundam").as_dict())
    for mode in ("tiny", "small", "base", "large"):
        with pytest.raises(OcrtuneError, match=f"mode '{mode}'.*only reproduces gundam mode"):
            check_supported("deepseek_ocr", v1.vision_settings(official, mode).as_dict())
    with pytest.raises(OcrtuneError, match="only reproduces gundam"):  # gundam with other tile limits
        check_supported("deepseek_ocr", v1.vision_settings(official, "gundam", max_tiles=9).as_dict())
    with pytest.raises(OcrtuneError, match="only reproduces gundam"):  # the tiny model's own small views
        check_supported("deepseek_ocr", v1.vision_settings(tiny, "gundam").as_dict())



def test_ocr2_is_offered_in_gundam_mode_only():
    """vLLM's OCR-2 processor tiles every page over 768 pixels into 2-6 tiles: gundam mode."""
    ocr2 = DeepseekOcr2()
    _, _, processor = load_model("builtin:tiny-random-deepseek-ocr-2")
    gundam = ocr2.vision_settings(processor, "gundam", min_tiles=2, max_tiles=6).as_dict()
    check_supported("deepseek_ocr2", gundam)
    with pytest.raises(OcrtuneError, match="mode 'base'.*DeepSeek-OCR-2 processor only reproduces gundam mode"):
        check_supported("deepseek_ocr2", ocr2.vision_settings(processor, "base").as_dict())
    with pytest.raises(OcrtuneError, match="only reproduces gundam"):
        check_supported("deepseek_ocr2", dict(gundam, max_tiles=9))
    with pytest.raises(OcrtuneError, match="the deepseek_ocr3 family has not been checked against vLLM"):
        check_supported("deepseek_ocr3", gundam)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error(tmp_path):
    _, _, tiny = load_model("builtin:tiny-random-deepseek-ocr")
    gundam = DeepseekOcr().vision_settings(type(tiny)(tiny.tokenizer), "gundam").as_dict()
    with pytest.raises(OcrtuneError, match="--engine vllm: vLLM is not importable here"):
        VllmEngine(tmp_path, None, RepetitionGuard(), DeepseekOcr(), gundam, max_new_tokens=16)
    with pytest.raises(OcrtuneError, match="only reproduces gundam"):  # checked before vLLM is needed
        VllmEngine(tmp_path, None, RepetitionGuard(), DeepseekOcr(), dict(gundam, max_tiles=9), max_new_tokens=16)
