"""Decoding with the adapter merged and the LoRA wrappers swapped out (finetune.generate.folded_lora)
gives the greedy token ids of decoding through the wrappers, for both families and every kind
of adapter ocrtune trains; afterwards the model is the one it was, weight for weight."""

import contextlib
import json

import pytest
import torch

from tests.helpers import line_text, render_line

pytestmark = pytest.mark.integration  # generation runs

FAMILIES = ["builtin:tiny-random-deepseek-ocr-2", "builtin:tiny-random-deepseek-ocr"]
ADAPTERS = {  # name: (preset, lora_config extras, vision_lora, train_projector)
    "routed experts (preset all)": ("all", {}, False, False),
    "DoRA": ("attention+mlp", {"use_dora": True}, False, False),
    "projector trained in full": ("attention", {}, False, True),
    "vision LoRA": ("attention", {}, True, False),
}


def _adapted(name: str, adapter: str, dtype=torch.float32, seed: int = 0):
    """(family, PEFT model, sequence builder): the tiny model with an adapter whose every
    trainable tensor is random, so the adapted model reads differently from the base."""
    from finetune.compat import get_peft_model
    from finetune.lora import lora_config, resolve_targets
    from finetune.models import load_model
    from finetune.sequence import builder_for

    preset, extra, vision_lora, projector = ADAPTERS[adapter]
    resolved, model, processor = load_model(name, dtype=dtype)
    family = resolved.family
    model.requires_grad_(False)
    targets = resolve_targets(model, preset, family.LAYOUT, vision_lora)
    model = get_peft_model(model, lora_config(targets, 4, 8, 0.0, modules_to_save=list(family.LAYOUT.projector_modules)
                                              if projector else None, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in n or "modules_to_save" in n):  # PEFT starts B at 0, the copy equal
                p.add_((torch.randn(p.shape, generator=gen) * 0.3).to(p.dtype))
    model.eval()
    builder = builder_for(family, processor, model.config, "<image>\nFree OCR.", family.vision_settings(processor))
    return family, model, builder


def _ids(model, builder, n_pages: int = 4, new_tokens: int = 12) -> list[tuple[int, ...]]:
    from finetune.generate import generate_pages

    pages = [(str(i), render_line(line_text(i))) for i in range(n_pages)]
    return [g.token_ids for g in generate_pages(model, builder, pages, n_pages, new_tokens)]


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _same(before, after) -> bool:
    return before[0] == after[0] and before[1].keys() == after[1].keys() and all(
        torch.equal(before[1][k], after[1][k]) for k in before[1])


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("name", FAMILIES)
def test_folded_decoding_equals_decoding_through_the_wrappers(name, adapter):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from finetune.generate import folded_lora

    _, model, builder = _adapted(name, adapter)
    before = _snapshot(model)
    wrapped = _ids(model, builder)
    with model.disable_adapter():
        base = _ids(model, builder)
    assert wrapped != base  # the adapter changes what is read, so equality below means something
    with folded_lora(model, adapted=True) as folded:
        # Inside, no PEFT layer is left in the tree (the wrappers are out, not merely merged).
        assert not any(isinstance(m, BaseTunerLayer) for m in folded.modules())
        assert _ids(folded, builder) == wrapped
    with folded_lora(model, adapted=False):
        assert _ids(model, builder) == base  # eval's base system, as disable_adapter() gives it
    assert _same(before, _snapshot(model))
    assert not any(m.merged for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_bf16_weights_come_back_bit_for_bit_where_plain_unmerge_drifts():
    """Training continues from the exact weights it had before validation decoded."""
    from finetune.generate import folded_lora

    _, model, builder = _adapted(FAMILIES[0], "routed experts (preset all)", dtype=torch.bfloat16)
    before = _snapshot(model)
    with folded_lora(model, adapted=True, exact_restore=True):
        _ids(model, builder, n_pages=2, new_tokens=4)
    assert _same(before, _snapshot(model))
    # Why the copy is kept: PEFT's merge then unmerge rounds twice in bf16.
    model.merge_adapter()
    model.unmerge_adapter()
    assert not _same(before, _snapshot(model))


def test_an_exception_inside_still_restores_the_model():
    from finetune.generate import folded_lora

    _, model, _ = _adapted(FAMILIES[0], "DoRA")
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="stop"), folded_lora(model, adapted=True):
        raise RuntimeError("stop")
    assert _same(before, _snapshot(model))


def _wrapped_reference(model, adapted: bool = True, exact_restore: bool = True):
    """What eval, predict and validation decoded with before folding: the PEFT wrappers."""
    return model.disable_adapter() if not adapted and hasattr(model, "disable_adapter") else contextlib.nullcontext()


def test_validation_reads_as_through_the_wrappers_and_leaves_the_weights(monkeypatch):
    from accelerate import Accelerator
    from datasets import Dataset

    import finetune.generate
    from finetune.decoding import RepetitionGuard
    from finetune.loss import token_loss_sum
    from finetune.validation import validate

    _, model, builder = _adapted(FAMILIES[1], "routed experts (preset all)")
    texts = [line_text(i) for i in range(5)]
    rows = Dataset.from_dict({"id": [str(i) for i in range(5)], "image": [render_line(t) for t in texts],
                              "markdown": texts})
    accelerator = Accelerator(cpu=True)
    loss_fn = lambda m, batch: token_loss_sum(m, batch)  # noqa: E731
    model.train()
    before = _snapshot(model)
    folded = validate(model, model, builder, rows, 3, 10, RepetitionGuard(), accelerator, loss_fn)
    assert model.training  # put back in training mode, as it was
    assert _same(before, _snapshot(model))
    monkeypatch.setattr(finetune.generate, "folded_lora", _wrapped_reference)
    wrapped = validate(model, model, builder, rows, 3, 10, RepetitionGuard(), accelerator, loss_fn)
    assert (folded.loss, folded.cer, folded.samples) == (wrapped.loss, wrapped.cer, wrapped.samples)


def _saved_adapter(name: str, adapter: str, out):
    from finetune.lora import save_adapter

    family, model, _ = _adapted(name, adapter)
    save_adapter(model, out, family)
    return out


def test_eval_predictions_equal_the_wrapped_path(tmp_path, tiny_dataset, monkeypatch):
    import finetune.generate
    from finetune.evaluate import evaluate

    adapter = _saved_adapter(FAMILIES[0], "routed experts (preset all)", tmp_path / "adapter")
    kwargs = dict(model_name=FAMILIES[0], data=tiny_dataset, adapter=adapter, limit=6, batch_size=3,
                  max_new_tokens=10, bootstrap_resamples=10, progress=False, dtype="float32")
    evaluate(output=tmp_path / "folded", **kwargs)
    monkeypatch.setattr(finetune.generate, "folded_lora", _wrapped_reference)
    evaluate(output=tmp_path / "wrapped", **kwargs)

    def read(out):
        rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        return [(r["id"], r["predictions"]["base"], r["predictions"]["adapted"]) for r in rows]

    folded, wrapped = read(tmp_path / "folded"), read(tmp_path / "wrapped")
    assert folded == wrapped
    assert any(base != adapted for _, base, adapted in folded)


def test_predict_output_equals_the_wrapped_path(tmp_path, monkeypatch):
    import finetune.generate
    from finetune.predict import predict

    adapter = _saved_adapter(FAMILIES[1], "projector trained in full", tmp_path / "adapter")
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        render_line(line_text(i)).save(scans / f"{i}.png")
    kwargs = dict(model_name=FAMILIES[1], inputs=[scans], adapter=adapter, batch_size=2, max_new_tokens=10,
                  dtype="float32", progress=False)
    predict(output=tmp_path / "folded", **kwargs)
    monkeypatch.setattr(finetune.generate, "folded_lora", _wrapped_reference)
    predict(output=tmp_path / "wrapped", **kwargs)
    for i in range(3):
        assert (tmp_path / "folded" / f"{i}.md").read_text() == (tmp_path / "wrapped" / f"{i}.md").read_text()


def test_training_with_validation_takes_the_steps_it_takes_without(tiny_dataset, tmp_path):
    """Validation decodes with the adapter merged, every few steps: the losses of the steps after
    it are bit for bit those of a run that never validated."""
    from finetune.config import load_config
    from finetune.train import train
    from tests.helpers import REPO

    def losses(out, *extra):
        cfg = load_config(REPO / "configs/runs/tiny_smoke.yaml",
                          [f"data.path={tiny_dataset}", f"output_dir={out}", "train.max_steps=6", "lora.preset=all",
                           *extra])
        train(cfg, progress=False)
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    plain = losses(tmp_path / "plain")
    validated = losses(tmp_path / "validated", "validation.every_steps=2", "validation.max_samples=3",
                       "validation.max_new_tokens=6", "validation.split=validation")
    assert validated == plain
