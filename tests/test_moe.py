"""v1's routed experts, stacked and grouped: equal to the per-expert loop they replaced (outputs
and gradients, idle experts included), a matmul count per MoE forward that does not grow with
the number of experts, one LoRA per expert through PEFT's target_parameters, and the official
per-expert layout on disk."""

import collections
import filecmp
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig

from finetune.lora import lora_config, parameter_ledger, resolve_targets
from finetune.models import BUILTIN_DIR, load_model
from finetune.models.deepseek_ocr import DeepseekOcr
from finetune.models.deepseek_ocr.checkpoint import OfficialLayoutError
from finetune.models.deepseek_ocr.modeling import RoutedExpertsMoe, grouped_experts, padded_experts
from tests.helpers import REPO

TINY_V1 = "builtin:tiny-random-deepseek-ocr"  # hidden 32, one MoE layer: 4 experts of width 16, top-2
PROJS = ("gate_proj", "up_proj", "down_proj")


def make_moe(experts: int, top_k: int, hidden: int = 32, inter: int = 16, seed: int = 0) -> RoutedExpertsMoe:
    config = DeepseekOcr2TextConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                                    num_experts_per_tok=top_k, n_shared_experts=2, num_attention_heads=1,
                                    n_group=1, topk_group=1)
    torch.manual_seed(seed)
    moe = RoutedExpertsMoe(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


def loop_experts(experts, hidden, chosen, weights, gate=None, up=None, down=None):
    """The oracle: the per-expert loop RoutedExpertsMoe ran before, each expert's gate/up/down
    Linear being its slice of the stacked weights (or of the `gate`/`up`/`down` given)."""
    gate, up, down = (w if w is not None else getattr(experts, n) for w, n in zip((gate, up, down), PROJS))
    out = torch.zeros_like(hidden)
    for e in torch.unique(chosen).tolist():
        token, slot = torch.where(chosen == e)
        x = hidden[token]
        y = F.linear(experts.act_fn(F.linear(x, gate[e])) * F.linear(x, up[e]), down[e])
        out.index_add_(0, token, y * weights[token, slot, None].to(hidden.dtype))
    return out


def loop_moe(moe, hidden_states, experts=None, **stacked):
    """The oracle for a whole MoE layer; `experts`: the RoutedExperts (when PEFT wraps moe's)."""
    shape = hidden_states.shape
    _, weights, chosen = moe.gate(hidden_states)
    flat = hidden_states.reshape(-1, shape[-1])
    routed = loop_experts(experts or moe.experts, flat, chosen, weights, **stacked)
    return routed.reshape(shape) + moe.shared_experts(hidden_states)


def _grads(fn, tensors, out_grad):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(out_grad)
    return out.detach(), [t.grad.clone() for t in tensors]


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --- outputs and gradients equal the per-expert loop -------------------------------------------

@pytest.mark.parametrize("experts,top_k", [(4, 2), (16, 6), (64, 6)])
def test_moe_outputs_and_gradients_equal_the_per_expert_loop(experts, top_k):
    moe = make_moe(experts, top_k)
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(2))
    tensors = [x] + list(moe.parameters())  # router, stacked experts and shared experts
    out, grads = _grads(lambda: moe(x), tensors, g)
    ref, ref_grads = _grads(lambda: loop_moe(moe, x), tensors, g)
    assert _close(out, ref)
    assert all(_close(a, b) for a, b in zip(grads, ref_grads))
    if experts == 64:  # 30 tokens x 6 slots leave some of 64 experts idle
        _, _, chosen = moe.gate(x)
        assert len(torch.unique(chosen)) < 64


def _fixed_routing(tokens: int):
    """Expert 0 on every token, 2/3/5/6 in turns, 1, 4 and 7 on none (8 experts, top-3)."""
    chosen = torch.tensor([[0, (2, 3, 5, 6)[t % 4], (5, 6, 2, 3)[t % 4]] for t in range(tokens)])
    weights = torch.rand(tokens, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    return chosen, weights


def test_idle_experts_get_zero_gradient_and_busy_ones_the_loops():
    experts = make_moe(8, 3).experts
    chosen, weights = _fixed_routing(12)
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    g = torch.randn(12, 32, generator=torch.Generator().manual_seed(5))
    tensors = [x, weights, experts.gate_proj, experts.up_proj, experts.down_proj]
    out, grads = _grads(lambda: experts(x, chosen, weights), tensors, g)
    ref, ref_grads = _grads(lambda: loop_experts(experts, x, chosen, weights), tensors, g)
    assert _close(out, ref)
    assert all(_close(a, b) for a, b in zip(grads, ref_grads))
    for grad in grads[2:]:
        assert torch.count_nonzero(grad[[1, 4, 7]]) == 0
        assert all(torch.count_nonzero(grad[e]) > 0 for e in (0, 2, 3, 5, 6))


def _per_expert_rows(rows, counts, gate, up, down, act):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        x = rows[start:start + n]
        out.append(F.linear(act(F.linear(x, gate[e])) * F.linear(x, up[e]), down[e]))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("path", ["padded", "grouped"])
def test_both_kernels_equal_the_per_expert_loop_on_sorted_rows(path):
    """The grouped_mm path (CUDA's) checked on the CPU too, where torch has a grouped_mm
    kernel, with idle experts and one expert holding half the rows."""
    if path == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    experts = make_moe(8, 3).experts
    counts = torch.tensor([12, 0, 3, 2, 0, 5, 2, 0])
    ids = torch.repeat_interleave(torch.arange(8), counts)
    rows = torch.randn(24, 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
    g = torch.randn(24, 32, generator=torch.Generator().manual_seed(7))
    weights = (experts.gate_proj, experts.up_proj, experts.down_proj)
    run = padded_experts if path == "padded" else grouped_experts
    tensors = [rows, *weights]
    out, grads = _grads(lambda: run(rows, ids, counts, *weights, experts.act_fn), tensors, g)
    ref, ref_grads = _grads(lambda: _per_expert_rows(rows, counts, *weights, experts.act_fn), tensors, g)
    assert _close(out, ref)
    assert all(_close(a, b) for a, b in zip(grads, ref_grads))


# --- matmul calls per MoE forward do not grow with the number of experts --------------------------

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "_grouped_mm", "linear"}


class MatmulCalls(TorchDispatchMode):
    """Counts the aten matrix-multiply calls made while active (forward and autograd's backward)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _count(fn):
    with MatmulCalls() as counter:
        fn()
    return dict(counter.calls)


def _calls_for(experts: int) -> dict:
    moe = make_moe(experts, 2)
    x = torch.randn(1, 256, 32, generator=torch.Generator().manual_seed(8), requires_grad=True)
    forward = _count(lambda: moe(x))
    out = moe(x)
    backward = _count(lambda: out.sum().backward())
    loop = sum(_count(lambda: loop_moe(moe, x)).values())
    _, _, chosen = moe.gate(x)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    e = moe.experts
    args = (x.reshape(-1, 32)[order // 2], flat[order], counts, e.gate_proj, e.up_proj, e.down_proj, e.act_fn)
    grouped = _count(lambda: grouped_experts(*args)) if hasattr(torch, "_grouped_mm") else None
    return {"forward": forward, "backward": backward, "grouped": grouped, "loop": loop,
            "used": len(torch.unique(chosen))}


def test_matmul_calls_per_moe_forward_are_constant_in_the_number_of_experts():
    calls = {experts: _calls_for(experts) for experts in (4, 16, 64)}
    # The router and the three shared-expert projections: 4 mm; the routed experts: 3 bmm on
    # the CPU, 3 grouped_mm on the grouped path, whatever the number of experts.
    assert all(c["forward"] == {"mm": 4, "bmm": 3} for c in calls.values())
    # Backward: two per forward matmul (input and weight gradients).
    assert all(c["backward"] == {"mm": 8, "bmm": 6} for c in calls.values())
    if hasattr(torch, "_grouped_mm"):
        assert all(c["grouped"] == {"_grouped_mm": 3} for c in calls.values())
    # What it replaced: 3 per expert that some token chose.
    assert all(c["loop"] == 4 + 3 * c["used"] for c in calls.values())
    assert calls[64]["used"] > 40


# --- LoRA on the stacked parameters is one LoRA per expert -----------------------------------------

def _peft_all(r=8, alpha=16):
    from peft import get_peft_model

    _, model, _ = load_model(TINY_V1)
    model.requires_grad_(False)
    targets = resolve_targets(model, "all", DeepseekOcr.LAYOUT)
    return targets, get_peft_model(model, lora_config(targets, r=r, alpha=alpha, dropout=0.0))


def test_lora_on_stacked_experts_counts_as_one_lora_per_expert():
    targets, peft_model = _peft_all(r=8)
    assert targets.target_parameters == [f"model.language_model.layers.1.mlp.experts.{p}" for p in PROJS]
    ledger = parameter_ledger(peft_model, DeepseekOcr.LAYOUT)
    trainable = {g: row["trainable"] for g, row in ledger.items() if g != "total" and row["trainable"]}
    # r * (in + out) per expert per projection: 4 experts x 3 x 8 x (32 + 16) = 4,608, as four
    # gate/up/down Linear triples would have; q,k,v,o 2 x 4 x 8 x 64; dense 3 x 8 x (32 + 64);
    # shared 3 x 8 x (32 + 16).
    assert trainable == {"attention": 4096, "dense_mlp": 2304, "shared_experts": 1152, "routed_experts": 4608}
    experts = peft_model.base_model.model.model.language_model.layers[1].mlp.experts
    wrappers, module = {}, experts
    while hasattr(module, "parameter_name"):  # PEFT nests one wrapper per targeted parameter
        wrappers[module.parameter_name] = module
        module = module.base_layer
    assert set(wrappers) == set(PROJS)
    for name, (out_f, in_f) in {"gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}.items():
        assert tuple(wrappers[name].lora_A["default"].weight.shape) == (8 * 4, in_f)
        assert tuple(wrappers[name].lora_B["default"].weight.shape) == (out_f, 8 * 4)


def test_lora_on_stacked_experts_computes_and_trains_the_per_expert_loras():
    """Expert e's LoRA is rows e*r..(e+1)*r of lora_A and columns e, e+E, ... of lora_B (PEFT's
    layout): the adapted MoE equals the loop over W_e + alpha/r * B_e A_e, and every factor
    gets a gradient."""
    r, alpha, n = 4, 8, 4
    _, peft_model = _peft_all(r=r, alpha=alpha)
    mlp = peft_model.base_model.model.model.language_model.layers[1].mlp
    wrappers, module = {}, mlp.experts
    while hasattr(module, "parameter_name"):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    stacked = module  # the RoutedExperts under the wrappers
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for w in wrappers.values():
            w.lora_A["default"].weight.normal_(0.0, 0.3, generator=gen)
            w.lora_B["default"].weight.normal_(0.0, 0.3, generator=gen)
    adapted = {}
    for name, w in wrappers.items():
        a, b = w.lora_A["default"].weight, w.lora_B["default"].weight
        deltas = [b[:, e::n] @ a[e * r:(e + 1) * r] for e in range(n)]
        adapted[name] = getattr(stacked, name) + alpha / r * torch.stack(deltas)
    x = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        ref = loop_moe(mlp, x, stacked, gate=adapted["gate_proj"], up=adapted["up_proj"], down=adapted["down_proj"])
    out = mlp(x)
    assert _close(out, ref)
    out.square().sum().backward()
    for w in wrappers.values():
        for factor in (w.lora_A["default"].weight, w.lora_B["default"].weight):
            assert factor.grad is not None and torch.count_nonzero(factor.grad) > 0
    assert all(getattr(stacked, p).grad is None for p in PROJS)  # the base stays frozen


def test_a_new_model_initialises_its_stacked_experts_like_the_other_decoder_weights():
    """transformers' decoder init does not know RoutedExperts: the module draws its own."""
    from finetune.models.deepseek_ocr.modeling import DeepseekOcrForConditionalGeneration
    from finetune.models.tiny import build_tokenizer, v1_tiny_config

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = DeepseekOcrForConditionalGeneration(v1_tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>")))
    std = model.config.text_config.initializer_range
    for p in PROJS:
        weight = getattr(model.model.language_model.layers[1].mlp.experts, p)
        assert torch.isfinite(weight).all() and abs(weight.std().item() - std) < 0.1 * std
        assert abs(weight.mean().item()) < 0.1 * std


# --- the official per-expert layout on disk --------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-random-deepseek-ocr", "tiny-deepseek-ocr"])
def test_builtin_v1_weights_load_stacked_and_save_byte_identical(tmp_path, name):
    _, model, _ = load_model(f"builtin:{name}")
    shipped = load_file(str(BUILTIN_DIR / name / "model.safetensors"))
    experts = model.model.language_model.layers[1].mlp.experts
    for p in PROJS:
        stacked = getattr(experts, p)
        assert stacked.dim() == 3
        for e in range(stacked.shape[0]):
            assert torch.equal(stacked[e], shipped[f"model.layers.1.mlp.experts.{e}.{p}.weight"])
    model.save_pretrained(tmp_path)
    assert filecmp.cmp(BUILTIN_DIR / name / "model.safetensors", tmp_path / "model.safetensors", shallow=False)


def test_saved_checkpoint_keeps_per_expert_keys_and_round_trips(tmp_path):
    _, model, proc = load_model(TINY_V1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    experts = model.model.language_model.layers[1].mlp.experts
    expert_keys = sorted(k for k in on_disk if ".mlp.experts." in k)
    assert expert_keys == sorted(f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(4) for p in PROJS)
    for e in range(4):
        for p in PROJS:
            assert torch.equal(on_disk[f"model.layers.1.mlp.experts.{e}.{p}.weight"], getattr(experts, p)[e])
    _, again, _ = load_model(str(tmp_path))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_misshapen_expert_is_named_by_its_checkpoint_key(tmp_path):
    _, model, proc = load_model(TINY_V1)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = torch.zeros(16, 31)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(OfficialLayoutError) as err:
        load_model(str(tmp_path))
    assert "1 wrong shape (model.layers.1.mlp.experts.2.up_proj.weight: checkpoint (16, 31), model (16, 32))" in str(err.value)
    assert "missing" not in str(err.value) and "unexpected" not in str(err.value)


# --- the benchmark ---------------------------------------------------------------------------------

def test_moe_layer_benchmark_runs_and_both_implementations_agree(tmp_path):
    spec = importlib.util.spec_from_file_location("moe_layer", REPO / "benchmarks" / "moe_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tokens", "48", "--hidden", "32", "--experts", "8", "--top-k", "3",
                          "--moe-intermediate", "16", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert result["grouped_path"] == "padded bmm"
    assert result["max_abs_diff"]["output"] < 1e-5 and result["max_abs_diff"]["input_grad"] < 1e-5
    assert set(result["seconds"]) == {"per-expert loop", "grouped"}
    assert json.loads((tmp_path / "r.json").read_text()) == result
