"""QLoRA: the decoder's frozen Linear weights stored in 4-bit NF4 (bitsandbytes), LoRA on top.

    model:
      quantization: nf4

Every nn.Linear inside the decoder layers (attention, dense MLP, shared experts) becomes a
bitsandbytes Linear4bit holding its weight in NF4 with one scale per 64 weights; matmuls run
in the model's dtype on the dequantized weight. Nothing else changes: the vision tower, the
projector, embeddings, the MoE router (not a Linear), the routed experts (stacked 3-D
parameters in both families, not Linears) and the LM head stay as loaded. LoRA's A and B stay
in the model's dtype under the same module names, so the adapter file is the same format as
without quantization and loads on the unquantized base (eval, export, vLLM).

bitsandbytes quantizes and multiplies on CUDA GPUs and, from release 0.50, on CPU too (this is
what the CPU tests run); older releases are refused on CPU with the versions named.
"""

from __future__ import annotations

import importlib.util

import torch

from finetune.errors import OcrtuneError

BNB_INSTALL = "pip install bitsandbytes"
BNB_MIN_CPU = "0.50.0"  # the first release whose CPU backend did NF4 matmul + backward here (0.50.2 tested)


class QuantizationError(OcrtuneError, RuntimeError):
    pass


def check_available(on_gpu: bool) -> None:
    """Refuse model.quantization=nf4 where bitsandbytes cannot run it, before any weight loads."""
    from importlib.metadata import version

    from packaging.version import Version

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(f"model.quantization nf4 needs the bitsandbytes package: {BNB_INSTALL}")
    installed = version("bitsandbytes")
    if not on_gpu and Version(installed) < Version(BNB_MIN_CPU):
        raise QuantizationError(f"model.quantization nf4 on CPU needs bitsandbytes >= {BNB_MIN_CPU} (its CPU "
                                f"backend; installed: {installed}): pip install 'bitsandbytes>={BNB_MIN_CPU}', or "
                                "train on a GPU")


def quantize_decoder(model: torch.nn.Module, decoder_layers: str, compute_dtype: torch.dtype) -> int:
    """Replace the Linears under `decoder_layers` (e.g. "model.language_model.layers") with NF4
    Linear4bit modules, in place, frozen; returns how many were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for name, parent in list(model.named_modules()):
        if not name.startswith(decoder_layers + "."):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            # Quantization happens when a Params4bit moves to a device, its own or another.
            q.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q.to(device))
            replaced += 1
    return replaced
