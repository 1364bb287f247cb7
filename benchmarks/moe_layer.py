"""One DeepSeek-OCR (v1) MoE layer at real dimensions on the CPU, forward + backward: the
per-expert loop ocrtune ran before vs the grouped experts it runs now, side by side.

    nice python benchmarks/moe_layer.py [--tokens 1024] [--repeats 3] [--json moe_layer.json]

The layer is v1's: hidden 1280, 64 routed experts of width 896 (top-6), 2 shared experts,
fp32, seeded random weights and router. The loop is the removed implementation (one
gate/up/down Linear per expert, run for each expert some token chose: a host read and up to
3 matmuls per expert); its Linears are views of the grouped layer's stacked weights, so both
compute on the same numbers. Each repeat times both, alternating which goes first, on the
same input and output gradient; the table gives the median seconds per phase and the ratio,
after checking that outputs and input gradients agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextMLP

from finetune.models.deepseek_ocr.modeling import RoutedExpertsMoe, grouped_mm_kernel


class PerExpertLoopMoe(nn.Module):
    """The MoE forward ocrtune had before grouped experts, on `grouped`'s router, shared experts
    and (as per-expert Linear views) routed weights."""

    def __init__(self, grouped: RoutedExpertsMoe, config: DeepseekOcr2TextConfig):
        super().__init__()
        self.gate = grouped.gate
        self.shared_experts = grouped.shared_experts
        stacked = grouped.experts
        self.experts = nn.ModuleList()
        for e in range(stacked.gate_proj.shape[0]):
            mlp = DeepseekOcr2TextMLP(config, intermediate_size=config.moe_intermediate_size)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(mlp, name).weight = nn.Parameter(getattr(stacked, name).data[e])
            self.experts.append(mlp)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        _, weights, chosen = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y)
        return out.reshape(shape) + self.shared_experts(hidden_states)


def build(hidden: int, experts: int, top_k: int, inter: int, shared: int, seed: int):
    config = DeepseekOcr2TextConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                                    num_experts_per_tok=top_k, n_shared_experts=shared, num_attention_heads=1,
                                    n_group=1, topk_group=1)
    torch.manual_seed(seed)
    grouped = RoutedExpertsMoe(config)
    with torch.no_grad():
        for p in grouped.parameters():
            p.normal_(0.0, 0.02)
    return grouped, PerExpertLoopMoe(grouped, config)


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out = layer(x)
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out.detach(), x.grad


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one untimed warm-up each")
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--moe-intermediate", type=int, default=896)
    parser.add_argument("--shared-experts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    grouped, loop = build(args.hidden, args.experts, args.top_k, args.moe_intermediate, args.shared_experts, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, args.hidden, generator=gen)
    grad = torch.randn(args.tokens, args.hidden, generator=gen)
    layers = {"per-expert loop": loop, "grouped": grouped}
    times = {name: {"forward": [], "backward": []} for name in layers}
    results = {}
    for name, layer in layers.items():  # warm-up, and the numbers compared below
        results[name] = _step(layer, x, grad)[2:]
    for r in range(args.repeats):
        for name in (list(layers) if r % 2 == 0 else list(layers)[::-1]):
            fwd, bwd, _, _ = _step(layers[name], x, grad)
            times[name]["forward"].append(fwd)
            times[name]["backward"].append(bwd)

    (out_loop, gx_loop), (out_grouped, gx_grouped) = results["per-expert loop"], results["grouped"]
    rows = {name: {phase: statistics.median(v) for phase, v in t.items()} for name, t in times.items()}
    for row in rows.values():
        row["total"] = row["forward"] + row["backward"]
    result = {
        "tokens": args.tokens, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
        "moe_intermediate": args.moe_intermediate, "shared_experts": args.shared_experts, "dtype": "float32",
        "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "grouped_path": "grouped_mm" if grouped_mm_kernel(grouped.experts.gate_proj) is not None else "padded bmm",
        "seconds": rows,
        "speedup": {phase: rows["per-expert loop"][phase] / rows["grouped"][phase] for phase in rows["grouped"]},
        "max_abs_diff": {"output": (out_loop - out_grouped).abs().max().item(),
                         "input_grad": (gx_loop - gx_grouped).abs().max().item()},
    }
    print(f"MoE layer, {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts top-{args.top_k} "
          f"(width {args.moe_intermediate}), {args.shared_experts} shared, fp32, {result['threads']} threads, "
          f"median of {args.repeats}")
    print(f"{'implementation':<28}{'forward s':>11}{'backward s':>12}{'total s':>10}")
    for name, row in rows.items():
        label = f"grouped ({result['grouped_path']})" if name == "grouped" else name
        print(f"{label:<28}{row['forward']:>11.3f}{row['backward']:>12.3f}{row['total']:>10.3f}")
    s = result["speedup"]
    print(f"loop / grouped: forward {s['forward']:.2f}x, backward {s['backward']:.2f}x, total {s['total']:.2f}x")
    print(f"max |loop - grouped|: output {result['max_abs_diff']['output']:.2e}, "
          f"input grad {result['max_abs_diff']['input_grad']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
