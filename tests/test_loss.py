"""The chunked loss is the plain loss: same value, same gradients, any chunk size."""

import pytest
import torch
import torch.nn.functional as F

from finetune.loss import token_loss_sum
from tests.helpers import render_line


def _batch(tiny):
    from finetune.sequence import builder_for

    resolved, model, processor = tiny
    builder = builder_for(resolved.family, processor, model.config, "<image>\nFree OCR.", resolved.family.vision_settings(processor))
    batch = builder.collate([builder.build("a", render_line("total 12"), "total 12"),
                             builder.build("b", render_line("phone 5551234 ext 99"), "phone 5551234 ext 99")])
    batch.pop("ids")
    return model, batch


def test_plain_loss_matches_full_cross_entropy(tiny):
    """Logits only from the first answer position on give the full sequence's summed loss."""
    model, batch = _batch(tiny)
    with torch.no_grad():
        ours = token_loss_sum(model, batch)
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        ref = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                              ignore_index=-100, reduction="sum")
    assert torch.allclose(ours, ref, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_loss_and_gradients_equal_plain(tiny, chunk):
    model, batch = _batch(tiny)
    head = model.get_output_embeddings()
    # Gradients through the decoder's last attention block and the vision projector: both
    # paths (answer tokens and image features) must carry the same gradient either way.
    watched = [model.model.language_model.layers[-1].self_attn.o_proj.weight,
               model.model.multi_modal_projector.weight]
    for p in watched:
        p.requires_grad_(True)
    try:
        grads = []
        losses = []
        for chunk_tokens in (0, chunk):
            model.zero_grad(set_to_none=True)
            loss = token_loss_sum(model, batch, lm_head=head, chunk_tokens=chunk_tokens)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in watched])
    finally:
        for p in watched:
            p.requires_grad_(False)
            p.grad = None
    n_labels = int((batch["labels"] != -100).sum())
    assert n_labels > 20  # both samples' answers and EOS, so chunk=3 really splits them
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for plain, chunked in zip(*grads):
        assert plain.abs().sum() > 0
        assert torch.allclose(plain, chunked, rtol=1e-4, atol=1e-5), float((plain - chunked).abs().max())


def test_chunked_loss_needs_the_head(tiny):
    model, batch = _batch(tiny)
    with pytest.raises(ValueError, match="lm_head"):
        token_loss_sum(model, batch, chunk_tokens=8)
