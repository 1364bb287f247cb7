"""The repetition guard: exactly which tokens it bans, and that generation obeys it."""

import torch

from finetune.decoding import NoRepeatNGramWindow, RepetitionGuard, banned_tokens


def test_banned_tokens_written_out():
    # ... 1 2 3 ... 1 2 -> "3" would repeat the 3-gram (1, 2, 3)
    assert banned_tokens([1, 2, 3, 9, 1, 2], ngram_size=3, window=90) == {3}
    assert banned_tokens([1, 2, 3, 9, 1, 2, 4, 1, 2], ngram_size=3, window=90) == {3, 4}
    assert banned_tokens([1, 2, 3, 9, 1, 2], ngram_size=3, window=4) == set()  # first (1, 2, 3) left the window
    assert banned_tokens([5, 5, 5], ngram_size=2, window=90) == {5}
    assert banned_tokens([1, 2], ngram_size=3, window=90) == set()


def test_processor_bans_only_generated_tokens_and_spares_the_whitelist():
    guard = RepetitionGuard(ngram_size=2, window=90, whitelist=(7,))
    proc = NoRepeatNGramWindow(guard, prompt_length=3)
    # the prompt 4 4 4 is not generated text: no ban from it
    ids = torch.tensor([[4, 4, 4, 8], [4, 4, 4, 7], [4, 4, 4, 8]])
    ids = torch.cat([ids, torch.tensor([[9], [7], [8]])], dim=1)  # row 0: 8 9, row 1: 7 7, row 2: 8 8
    scores = proc(ids, torch.zeros(3, 12))
    assert torch.isinf(scores[0]).sum() == 0  # 8 9: no bigram with prefix 9 before
    assert torch.isinf(scores[1]).sum() == 0  # 7 7 would repeat, but 7 is whitelisted
    assert torch.isinf(scores[2]).nonzero().flatten().tolist() == [8]  # 8 8 -> 8 banned
    assert RepetitionGuard(0, 90).describe() is None
    assert RepetitionGuard(30, 90, (5, 6)).describe() == {"ngram_size": 30, "window": 90, "whitelist": [5, 6]}


def test_generation_with_the_guard_never_repeats_an_ngram():
    from finetune.generate import generate_pages
    from finetune.models import load_model
    from finetune.sequence import builder_for
    from tests.helpers import TINY, render_line

    resolved, model, processor = load_model(TINY)
    builder = builder_for(resolved.family, processor, model.config, "<image>\nFree OCR.", resolved.family.vision_settings(processor))
    pages = [(str(i), render_line(f"line {i}")) for i in range(4)]
    plain = generate_pages(model.eval(), builder, pages, 4, 24)
    guarded = generate_pages(model, builder, pages, 4, 24, guard=RepetitionGuard(ngram_size=3, window=90))

    def has_repeat(ids, n=3):
        grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        return len(grams) != len(set(grams))

    assert any(has_repeat(g.token_ids) for g in plain)  # the random tiny model loops
    assert not any(has_repeat(g.token_ids) for g in guarded)
    assert all(len(g.token_ids) == 24 for g in guarded)  # still decodes to the cap, just without loops
