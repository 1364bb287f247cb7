"""The one sequence builder shared by training, evaluation, prediction and serving.

Layout of every sequence (DeepSeek-OCR's "plain" format, no role strings):

    BOS | prompt text before <image> | <image> x N | prompt text after | target | EOS
    labels: -100 ...............................................   | target | EOS

N is the placeholder count the model family gives for this image. Training right-pads
(labels -100 on padding); generation left-pads so every row ends where decoding starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from finetune.errors import InputError

IGNORE_INDEX = -100


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int] | None  # None for generation
    pixels: dict  # per-image tensors from the family's encode_image
    n_target_tokens: int


class SequenceBuilder:
    def __init__(
        self,
        tokenizer,
        image_token_id: int,
        prompt: str,
        encode_image: Callable,  # image -> (pixels dict, placeholder count)
        collate_pixels: Callable,  # list of pixels dicts -> batch dict
    ):
        if prompt.count("<image>") != 1:
            raise InputError(f"prompt {prompt!r} must contain exactly one <image> placeholder")
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.prompt = prompt
        self.encode_image = encode_image
        self.collate_pixels = collate_pixels
        before, after = prompt.split("<image>")
        self._before = self._encode(before)
        self._after = self._encode(after)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, n_image_tokens: int) -> list[int]:
        """Token ids up to where the answer starts; identical for training and generation."""
        return [self.bos_id, *self._before, *([self.image_token_id] * n_image_tokens), *self._after]

    def target_ids(self, text: str) -> list[int]:
        return [*self._encode(text), self.eos_id]

    def count_target_tokens(self, text: str) -> int:
        return len(self.target_ids(text))

    def build(self, id: str, image, target: str | None = None) -> Example:
        pixels, n_image = self.encode_image(image)
        prompt = self.prompt_ids(n_image)
        if target is None:
            return Example(id, prompt, None, pixels, 0)
        answer = self.target_ids(target)
        return Example(id, prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, pixels, len(answer))

    def collate(self, examples: list[Example], padding_side: str = "right") -> dict:
        """Pad a list of examples into model inputs (+ labels when every example has them)."""
        width = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        with_labels = all(e.labels is not None for e in examples)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, ex in enumerate(examples):
            n = len(ex.input_ids)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(ex.input_ids)
            attention_mask[row, cols] = 1
            if with_labels:
                labels[row, cols] = torch.tensor(ex.labels)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **self.collate_pixels([e.pixels for e in examples])}
        if with_labels:
            batch["labels"] = labels
        batch["ids"] = [e.id for e in examples]
        return batch


def builder_for(family, processor, model_config, prompt: str, vision) -> SequenceBuilder:
    """The builder for a loaded model: one place that wires a family into the sequence layout."""
    # Without a loaded model (an external engine holds the weights) the tokenizer says the id;
    # loading checks that the two agree.
    image_token_id = (family.image_token_id(model_config) if model_config is not None
                      else processor.tokenizer.convert_tokens_to_ids(processor.image_token))
    return SequenceBuilder(
        tokenizer=processor.tokenizer,
        image_token_id=image_token_id,
        prompt=prompt,
        encode_image=lambda image: family.encode_image(processor, image, vision),
        collate_pixels=family.collate_pixels,
    )
