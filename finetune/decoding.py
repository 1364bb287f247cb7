"""The repetition guard used by every decoding path (eval, predict, serve).

DeepSeek-OCR's official decoding bans, at each step, any token that would repeat an n-gram
already generated within the last `window` tokens (n = 30, window = 90; table cell tags
exempt, since tables legitimately repeat `<td>` runs). Runaway repetition is the dominant
failure of OCR decoders; the guard is on by default and written into every report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TABLE_TAGS = ("<td>", "</td>")
# The official settings; every decoding path (and every CLI flag) defaults to these.
NO_REPEAT_NGRAM = 30
NO_REPEAT_WINDOW = 90


@dataclass(frozen=True)
class RepetitionGuard:
    ngram_size: int = NO_REPEAT_NGRAM  # an n-gram may not occur twice ...
    window: int = NO_REPEAT_WINDOW  # ... within this many generated tokens (0 or ngram_size 0 = off)
    whitelist: tuple[int, ...] = ()  # token ids never banned (table cell tags)

    @property
    def active(self) -> bool:
        return self.ngram_size > 0 and self.window >= self.ngram_size

    def describe(self) -> dict | None:
        return asdict(self) | {"whitelist": list(self.whitelist)} if self.active else None


def table_tag_ids(tokenizer) -> tuple[int, ...]:
    """Ids of `<td>`/`</td>` when the tokenizer has them as single tokens."""
    vocab = tokenizer.get_vocab()
    return tuple(vocab[t] for t in TABLE_TAGS if t in vocab)


def banned_tokens(generated: list[int], ngram_size: int, window: int) -> set[int]:
    """Tokens that would complete an n-gram already present in the last `window` tokens."""
    seq = generated[-window:]
    n = ngram_size
    if len(seq) < n:
        return set()
    prefix = seq[len(seq) - n + 1:]
    banned = set()
    for i in range(len(seq) - n + 1):
        if seq[i:i + n - 1] == prefix:
            banned.add(seq[i + n - 1])
    return banned


class NoRepeatNGramWindow:
    """A transformers logits processor applying `RepetitionGuard` to generated tokens only
    (the prompt, with its image placeholders, is `prompt_length` tokens long)."""

    def __init__(self, guard: RepetitionGuard, prompt_length: int):
        self.guard = guard
        self.prompt_length = prompt_length
        self.whitelist = set(guard.whitelist)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_length:].tolist()
            ban = banned_tokens(generated, self.guard.ngram_size, self.guard.window) - self.whitelist
            if ban:
                scores[row, list(ban)] = -float("inf")
        return scores
