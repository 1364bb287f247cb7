"""DeepSeek-OCR (v1) as native modules on transformers' building blocks: no remote code.

    model.sam_model        SAM ViT-B with its neck and two stride-2 convs (transformers'
                           DeepseekOcr2SamVisionEncoder; OCR-2 has the same SAM)
    model.vision_model     CLIP-L fed with the SAM features in place of its patch embedding
                           (transformers' CLIPEncoderLayer blocks; embeddings written here)
    model.projector        Linear(CLIP width + SAM width = 2048 -> 1280)
    model.image_newline    one learned vector closing every row of a view's token grid
    model.view_seperator   one learned vector after the views (the checkpoint's spelling)
    model.language_model   DeepSeek-V2 MoE decoder: transformers' DeepseekOcr2TextModel, whose
                           sparse layers get RoutedExpertsMoe: the routed experts stacked into
                           three 3-D parameters (gate and up kept apart, so a LoRA on each is
                           one LoRA per published per-expert Linear) and run as grouped
                           matmuls; the checkpoint keeps one Linear triple per expert
    lm_head

Placeholder layout per image (what `image_features` returns, row by row): local tiles
as one grid of (tiles_h * g) rows of (tiles_w * g) tokens + a newline, then the global
view as g rows of g tokens + a newline, then the separator.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2SamVisionAttention,
    DeepseekOcr2SamVisionEncoder,
    DeepseekOcr2TextMLP,
    DeepseekOcr2TextModel,
    DeepseekOcr2TextRotaryEmbedding,
    DeepseekOcr2TextTopkRouter,
)

from finetune.models.deepseek_ocr.checkpoint import save_official
from finetune.models.deepseek_ocr.configuration import DeepseekOcrConfig


class ClipEmbeddings(nn.Module):
    """CLS + SAM features as patch embeddings + position table resized to the grid."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(width))
        # Unused (SAM supplies the patches) but published in the checkpoint: kept so every
        # key loads and the vision parameter count matches the official model.
        self.patch_embedding = nn.Conv2d(3, width, config.patch_size, config.patch_size, bias=False)
        self.grid = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.grid * self.grid + 1, width)

    def positions(self, grid: int) -> torch.Tensor:
        table = self.position_embedding.weight
        if grid == self.grid:
            return table
        cls, rest = table[:1], table[1:]
        rest = rest.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).float()
        rest = F.interpolate(rest, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        rest = rest.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)
        return torch.cat([cls, rest])

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = sam_features.shape
        if h != w:
            raise ValueError(f"vision: square views expected, got a {h}x{w} feature grid")
        patches = sam_features.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions(h).to(patches.dtype)


class ClipTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, None)
        return hidden


class ClipOverSam(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # checkpoint spelling
        self.transformer = ClipTransformer(config)

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.pre_layrnorm(self.embeddings(sam_features)))


def grouped_mm_kernel(weight: torch.Tensor):
    """torch's grouped matmul for `weight`'s experts when it runs as one device kernel, else None.

    That is CUDA in bf16 with both widths a multiple of 8 (the kernel's 16-byte alignment):
    the grouped GEMM reads the group offsets on the device, so no host sync. (On a GPU that
    torch has no such kernel for, it falls back to its own per-group loop: still correct.) In
    other dtypes torch's grouped_mm is that loop, with the offsets copied to the host, and on
    the CPU a kernel slower than padded bmm, so `padded_experts` runs instead."""
    if not (weight.is_cuda and weight.dtype == torch.bfloat16 and weight.shape[-1] % 8 == 0
            and weight.shape[-2] % 8 == 0):
        return None
    if hasattr(F, "grouped_mm"):  # torch >= 2.10
        return F.grouped_mm
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(weight.device)[0] == 9:
        return torch._grouped_mm  # torch 2.8/2.9: Hopper only
    return None


def grouped_experts(rows, expert_ids, counts, gate, up, down, act, kernel=None) -> torch.Tensor:
    """Every expert's MLP on its rows, three grouped matmuls in all.

    rows [S, hidden] sorted by expert (`expert_ids`, ascending), `counts` [experts] rows per
    expert; weights (experts, out, in). Returns [S, hidden] in the rows' order. The offsets
    alone place the rows, so `expert_ids` is unused here (both kernels take the same
    arguments). `kernel`: torch's grouped_mm (default: the one `grouped_mm_kernel` picks, else
    torch._grouped_mm, which is how the tests run this path on the CPU)."""
    mm = kernel or grouped_mm_kernel(gate) or torch._grouped_mm
    offs = counts.cumsum(0).to(torch.int32)  # group ends, computed and read on the device
    x = rows.to(gate.dtype)  # grouped_mm does not autocast
    h = act(mm(x, gate.transpose(-2, -1), offs=offs)) * mm(x, up.transpose(-2, -1), offs=offs)
    return mm(h, down.transpose(-2, -1), offs=offs)


def padded_experts(rows, expert_ids, counts, gate, up, down, act) -> torch.Tensor:
    """As `grouped_experts`, as three batched matmuls over a [experts, capacity, hidden] tensor
    that holds each expert's rows, zero-padded to the busiest expert's count.

    The capacity is read on the host: free on the CPU, where this runs. Padding rows are zero,
    stay zero through the MLP (act(0) * 0) and are never read back. Experts that got no row are
    left out, so a decoding step reads the weights of the few experts it uses, not all."""
    if rows.shape[0] == 0:
        return rows.new_zeros(0, down.shape[1])
    used = counts > 0
    if not bool(used.all()):
        keep = used.nonzero().squeeze(1)
        gate, up, down, counts = gate[keep], up[keep], down[keep], counts[keep]
        expert_ids = (used.cumsum(0) - 1)[expert_ids]  # renumbered among the kept experts
    n, cap = counts.shape[0], int(counts.max())
    start = counts.cumsum(0) - counts
    slot = expert_ids * cap + torch.arange(rows.shape[0], device=rows.device) - start[expert_ids]
    rows = rows.to(gate.dtype)  # as grouped_experts (under autocast bmm would cast anyway)
    x = rows.new_zeros(n * cap, rows.shape[1]).index_copy(0, slot, rows).view(n, cap, -1)
    h = act(torch.bmm(x, gate.transpose(1, 2))) * torch.bmm(x, up.transpose(1, 2))
    return torch.bmm(h, down.transpose(1, 2)).flatten(0, 1)[slot]


class RoutedExperts(nn.Module):
    """One MoE layer's routed experts as three stacked parameters laid out (experts, out, in),
    as transformers stores OCR-2's, but with gate and up apart: PEFT's target_parameters then
    puts one LoRA on each expert's gate, up and down, exactly the per-expert LoRA of the
    published per-expert Linears (checkpoint.py stacks them at load and splits them at save).

    PEFT wraps this module and swaps in W + BA while it runs, so the weights are read here,
    inside forward, and nowhere else."""

    def __init__(self, config: DeepseekOcr2TextConfig):
        super().__init__()
        n, inter, hidden = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        # Initialised here (a no-op on the meta device): the weight init that reaches modules
        # inside the decoder is transformers' DeepseekOcr2TextModel's, which does not know this
        # class, as it knew the per-expert Linears.
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(weight, 0.0, config.initializer_range)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [tokens, hidden]; chosen and weights [tokens, top_k] (the router's) ->
        [tokens, hidden]: per token, the sum of weight x expert(hidden) over its chosen experts."""
        tokens, top_k = chosen.shape
        flat = chosen.reshape(-1)
        # Sorted by expert, each expert's rows in token order; counted with a scatter, which
        # (unlike bincount on CUDA) needs no host read.
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.gate_proj.shape[0], dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        kernel = grouped_mm_kernel(self.gate_proj)
        args = (hidden[order // top_k], flat[order], counts, self.gate_proj, self.up_proj, self.down_proj, self.act_fn)
        y = grouped_experts(*args, kernel=kernel) if kernel is not None else padded_experts(*args)
        # As before: the routing weight (fp32 from the router) is cast to the hidden dtype and
        # scales the expert's output.
        y = y.to(hidden.dtype) * weights.reshape(-1)[order, None].to(hidden.dtype)
        # Back to (token, slot) order: a scatter of distinct rows forward, a gather backward.
        out = torch.zeros_like(y).index_copy(0, order, y)
        return out.view(tokens, top_k, -1).sum(1)


class RoutedExpertsMoe(nn.Module):
    """DeepSeek-V2 MoE: top-k router, routed experts (grouped), shared experts."""

    def __init__(self, config: DeepseekOcr2TextConfig):
        super().__init__()
        self.gate = DeepseekOcr2TextTopkRouter(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = DeepseekOcr2TextMLP(
            config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        _, weights, chosen = self.gate(hidden_states)
        routed = self.experts(hidden_states.reshape(-1, shape[-1]), chosen, weights)
        return routed.reshape(shape) + self.shared_experts(hidden_states)


class DeepseekOcrModel(nn.Module):
    def __init__(self, config: DeepseekOcrConfig):
        super().__init__()
        text = config.text_config
        # CLIP's layers pick their attention kernel from their own config.
        config.clip_config._attn_implementation = config._attn_implementation or "sdpa"
        self.sam_model = DeepseekOcr2SamVisionEncoder(config.sam_config)
        self.vision_model = ClipOverSam(config.clip_config)
        self.projector = nn.Linear(config.projector_input, text.hidden_size)
        self.image_newline = nn.Parameter(torch.zeros(text.hidden_size))
        self.view_seperator = nn.Parameter(torch.zeros(text.hidden_size))
        self.language_model = DeepseekOcr2TextModel(text)
        for i, layer in enumerate(self.language_model.layers):
            if text.mlp_layer_types[i] == "sparse":
                layer.mlp = RoutedExpertsMoe(text)

    def encode_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] views -> [N, g, g, hidden] projected tokens."""
        sam = self.sam_model(pixels).last_hidden_state  # [N, C, g, g]
        clip = self.vision_model(sam)[:, 1:]  # CLS dropped
        feats = torch.cat([clip, sam.flatten(2).transpose(1, 2)], dim=-1)
        g = sam.shape[-1]
        return self.projector(feats).reshape(pixels.shape[0], g, g, -1)

    def image_features(self, pixel_values, pixel_values_local=None, images_spatial_crop=None) -> list[torch.Tensor]:
        """One [placeholders, hidden] tensor per image, in the placeholder order."""
        views = self.encode_views(pixel_values)
        tiles = self.encode_views(pixel_values_local) if pixel_values_local is not None else None
        newline, sep = self.image_newline, self.view_seperator[None]
        out, used = [], 0
        for i in range(views.shape[0]):
            parts = []
            tw, th = (int(x) for x in images_spatial_crop[i]) if images_spatial_crop is not None else (1, 1)
            if tw * th > 1:
                t = tiles[used: used + tw * th]
                used += tw * th
                g = t.shape[1]
                grid = t.reshape(th, tw, g, g, -1).permute(0, 2, 1, 3, 4).reshape(th * g, tw * g, -1)
                parts.append(torch.cat([grid, newline.to(grid.dtype).expand(th * g, 1, -1)], 1).flatten(0, 1))
            v = views[i]
            parts.append(torch.cat([v, newline.to(v.dtype).expand(v.shape[0], 1, -1)], 1).flatten(0, 1))
            parts.append(sep.to(v.dtype))
            out.append(torch.cat(parts))
        return out


class DeepseekOcrForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = DeepseekOcrConfig
    config: DeepseekOcrConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # SAM's relative-position bias
    _no_split_modules = ["DeepseekOcr2SamVisionLayer", "CLIPEncoderLayer", "DeepseekOcr2TextDecoderLayer"]

    def __init__(self, config: DeepseekOcrConfig):
        super().__init__(config)
        self.model = DeepseekOcrModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, DeepseekOcr2TextTopkRouter):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, DeepseekOcr2SamVisionAttention) and module.use_rel_pos:
            nn.init.zeros_(module.rel_pos_h)
            nn.init.zeros_(module.rel_pos_w)
        elif isinstance(module, DeepseekOcr2SamVisionEncoder) and module.pos_embed is not None:
            nn.init.normal_(module.pos_embed, 0.0, std)
        elif isinstance(module, ClipEmbeddings):
            nn.init.normal_(module.class_embedding, 0.0, std)
        elif isinstance(module, DeepseekOcrModel):
            scale = 1 / math.sqrt(self.config.text_config.hidden_size)
            nn.init.normal_(module.image_newline, 0.0, scale)
            nn.init.normal_(module.view_seperator, 0.0, scale)
        elif hasattr(module, "weight") and module.__class__.__name__.endswith("RMSNorm"):
            nn.init.ones_(module.weight)
        elif module.__class__.__name__.endswith("SamLayerNorm"):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def reset_rotary(self, device=None) -> None:
        """Recompute the rotary table (a non-persistent buffer): needed after building on the
        meta device, where it was never computed."""
        lm = self.model.language_model
        lm.rotary_emb = DeepseekOcr2TextRotaryEmbedding(self.config.text_config).to(device)

    def save_pretrained(self, save_directory, state_dict=None, **kwargs):
        """Written in the official DeepSeek-OCR layout (config.json + safetensors under the
        published names), so the one loader reads ocrtune's checkpoints and DeepSeek's alike."""
        save_official(self, Path(save_directory), state_dict)

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.language_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, pixel_values=None, pixel_values_local=None, images_spatial_crop=None,
                attention_mask=None, position_ids=None, inputs_embeds=None, labels=None, logits_to_keep=0,
                image_features=None, **kwargs):
        # The KV cache and use_cache pass through **kwargs under whatever name this transformers
        # release gives them (`past_key_values` up to 5.23, `cache` from 5.24 on): naming either
        # here would either drop the other or trip a deprecation warning.
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # `image_features`: one [placeholders, hidden] tensor per image, computed earlier by
        # `self.model.image_features` (finetune/feature_cache.py), in place of the pixels.
        if image_features is None and pixel_values is not None:
            image_features = self.model.image_features(pixel_values, pixel_values_local, images_spatial_crop)
        if image_features is not None:
            feats = torch.cat(image_features)
            mask = input_ids == self.config.image_token_id
            if int(mask.sum()) != feats.shape[0]:
                # An invariant of ours, not an input error: a processor/model pair that disagrees
                # is a bug (or a broken checkpoint) and is reported as an internal error.
                raise RuntimeError(f"image placeholders ({int(mask.sum())}) and image features ({feats.shape[0]}) "
                                   "differ: the processor and the model disagree on the layout")
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], feats.to(inputs_embeds.dtype))
        out = self.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        # The decoder's output fields (the cache, hidden states, attentions) carry over under
        # their own names, so the output follows the installed release's naming too.
        rest = {k: v for k, v in out.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        # As transformers' own vision-language models do (5.24): the image inputs reach the model
        # on the first iteration (prefill) only, or on every step when no cache is kept, decided
        # by the `is_first_iteration` flag that `generate` passes, not by inspecting the cache
        # under a keyword a release may rename. The three are taken out before the generic
        # method runs, so its own list of image inputs to drop (which differs by release and
        # does not know `images_spatial_crop`) decides nothing here.
        images = {key: kwargs.pop(key, None) for key in ("pixel_values", "pixel_values_local", "images_spatial_crop")}
        inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs.update(images)
        return inputs
