"""The one sequence builder: exact label masking, and identical prompts for train and eval."""

import torch

from finetune.sequence import IGNORE_INDEX, builder_for
from tests.helpers import render_line

PROMPT = "<image>\nFree OCR."


def make_builder(tiny, prompt=PROMPT):
    resolved, model, processor = tiny
    return builder_for(resolved.family, processor, model.config, prompt, resolved.family.vision_settings(processor))


def test_known_sample_has_exact_masked_and_unmasked_positions(tiny):
    builder = make_builder(tiny)
    ex = builder.build("s1", render_line("**Date:** 12/03/1998"), "**Date:** 12/03/1998")
    # BOS + 144 global-view queries + 1 view separator + "\nFree OCR." (4 tokens) are masked;
    # the 8 target tokens + EOS are learned.
    masked = sum(1 for x in ex.labels if x == IGNORE_INDEX)
    unmasked = sum(1 for x in ex.labels if x != IGNORE_INDEX)
    assert masked == 1 + 145 + 4 == 150
    assert unmasked == 8 + 1 == 9
    assert len(ex.input_ids) == 159
    assert ex.input_ids[0] == builder.bos_id
    assert ex.input_ids[1:146] == [builder.image_token_id] * 145
    assert ex.labels[-1] == builder.eos_id == ex.input_ids[-1]
    assert ex.labels[150:] == ex.input_ids[150:]


def test_eval_prompt_ids_equal_training_prompt_ids(tiny, tiny_dataset):
    from datasets import load_from_disk

    from finetune.train import _PageDataset

    rows = load_from_disk(str(tiny_dataset))["test"]
    builder = make_builder(tiny)
    train_ex = _PageDataset(rows, [0], builder)[0]  # what training feeds the model
    eval_ex = builder.build(rows[0]["id"], rows[0]["image"])  # what generation feeds the model
    assert eval_ex.labels is None
    assert train_ex.input_ids[: len(eval_ex.input_ids)] == eval_ex.input_ids
    first_label = next(i for i, x in enumerate(train_ex.labels) if x != IGNORE_INDEX)
    assert first_label == len(eval_ex.input_ids)
    assert torch.equal(train_ex.pixels["pixel_values"], eval_ex.pixels["pixel_values"])


def test_collate_pads_right_for_training_and_left_for_generation(tiny):
    builder = make_builder(tiny)
    a = builder.build("a", render_line("a"), "a")
    b = builder.build("b", render_line("bbbb bbbb"), "bbbb bbbb")
    right = builder.collate([a, b], padding_side="right")
    assert right["input_ids"].shape[1] == max(len(a.input_ids), len(b.input_ids))
    assert right["attention_mask"][0].tolist() == [1] * len(a.input_ids) + [0] * (right["input_ids"].shape[1] - len(a.input_ids))
    assert (right["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()
    ga, gb = builder.build("a", render_line("a")), builder.build("b", render_line("b"))
    left = builder.collate([ga, gb], padding_side="left")
    assert "labels" not in left
    assert left["input_ids"][:, -1].tolist() == [ga.input_ids[-1], gb.input_ids[-1]]
    assert right["pixel_values"].shape == (2, 3, 192, 192)


def test_prompt_must_have_one_image_placeholder(tiny):
    import pytest

    with pytest.raises(ValueError, match="exactly one <image>"):
        make_builder(tiny, "Free OCR.")


def test_grounding_prompt_keeps_its_special_token(tiny):
    builder = make_builder(tiny, "<image>\n<|grounding|>Convert the document to markdown.")
    grounding = builder.tokenizer.convert_tokens_to_ids("<|grounding|>")
    ids = builder.prompt_ids(145)
    assert ids[:146] == [builder.bos_id] + [builder.image_token_id] * 145
    assert ids.count(grounding) == 1 and ids[147] == grounding  # "\n" then the special token
