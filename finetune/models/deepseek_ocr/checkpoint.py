"""The official DeepSeek-OCR checkpoint layout <-> ocrtune's native v1 modules.

deepseek-ai/DeepSeek-OCR publishes config.json with model_type "deepseek_vl_v2"
(language_config / vision_config / projector_config) and safetensors under the
remote-code names (model.sam_model.blocks.N..., model.vision_model... with one fused
qkv_proj per CLIP layer, model.layers.N... with one module per routed expert). Loading
renames those keys onto the native modules, splits CLIP's qkv and stacks each MoE layer's
per-expert gate/up/down weights into the native 3-D expert parameters (experts, out, in);
saving does the reverse, so every checkpoint ocrtune writes (the builtin tiny ones,
full-parameter runs) is in the official layout too, and the same loader reads both. Weights
are read with safetensors only: no pickle, no downloaded code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from finetune.models.deepseek_ocr.configuration import DeepseekOcrConfig
from finetune.models.deepseek_v2 import check_published, language_config, text_config
from finetune.models.family import ModelNameError

OFFICIAL_MODEL_TYPE = "deepseek_vl_v2"
CLIP_KEY, SAM_KEY = "clip-l-14-224", "sam_vit_b"

# (official prefix, native prefix) for keys that differ, N standing for a layer number;
# everything else maps to itself. The first match wins, so specific entries come first.
_PAIRS = [
    ("model.sam_model.blocks.N.norm1.", "model.sam_model.layers.N.layer_norm1."),
    ("model.sam_model.blocks.N.norm2.", "model.sam_model.layers.N.layer_norm2."),
    ("model.sam_model.blocks.N.", "model.sam_model.layers.N."),
    ("model.sam_model.patch_embed.proj.", "model.sam_model.patch_embed.projection."),
    ("model.sam_model.neck.0.", "model.sam_model.neck.conv1."),
    ("model.sam_model.neck.1.", "model.sam_model.neck.layer_norm1."),
    ("model.sam_model.neck.2.", "model.sam_model.neck.conv2."),
    ("model.sam_model.neck.3.", "model.sam_model.neck.layer_norm2."),
    ("model.sam_model.net_2.", "model.sam_model.proj.conv1."),
    ("model.sam_model.net_3.", "model.sam_model.proj.conv2."),
    ("model.projector.layers.", "model.projector."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
]


def _table(pairs):
    return [(re.escape(a).replace("N", r"(\d+)"), b.replace("N", r"\1")) for a, b in pairs]


_RENAMES = _table(_PAIRS)
_INVERSE = _table([(b, a) for a, b in _PAIRS])
_QKV = re.compile(r"(model\.vision_model\.transformer\.layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias)$")
_SPLIT = re.compile(r"(model\.vision_model\.transformer\.layers\.\d+\.self_attn\.)q_proj\.(weight|bias)$")
# One routed expert's Linear weight, under either prefix (official model.layers.N. or native
# model.language_model.layers.N.), and the native stacked parameter it goes into.
_EXPERT = re.compile(r"(model\.(?:language_model\.)?layers\.\d+\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"(model\.(?:language_model\.)?layers\.\d+\.mlp\.experts\.)(gate_proj|up_proj|down_proj)$")


class OfficialLayoutError(ModelNameError):
    """A checkpoint that does not match the architecture; the message lists the keys. A
    ModelNameError, so every command reports it as a bad --model, not a traceback."""


def _rename(key: str, table) -> str:
    for pattern, template in table:
        new, n = re.subn("^" + pattern, template, key)
        if n:
            return new
    return key


def stack_experts(tensors: dict[str, torch.Tensor]) -> None:
    """In place: each MoE layer's per-expert `experts.E.{gate,up,down}_proj.weight` become one
    `experts.{gate,up,down}_proj` [experts, out, in], names otherwise kept (official or native).

    A projection whose experts are not numbered 0..n-1 or differ in shape is left per expert,
    for `check_keys` to name what is missing or wrong. Each group's per-expert tensors leave
    the dict as it is stacked, so a caller that holds no other reference to them (read_official)
    never holds the experts twice."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for key in tensors:
        m = _EXPERT.match(key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = key
    for (prefix, proj), keys in groups.items():
        if sorted(keys) != list(range(len(keys))) or len({tuple(tensors[k].shape) for k in keys.values()}) != 1:
            continue
        tensors[prefix + proj] = torch.stack([tensors.pop(keys[e]) for e in range(len(keys))])


def split_experts(key: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """A stacked expert parameter -> its per-expert Linear weights under the same prefix (views
    of `value`), or None for any other key."""
    m = _STACKED.match(key)
    if m is None or value.dim() != 3:
        return None
    return {f"{m.group(1)}{e}.{m.group(2)}.weight": value[e] for e in range(value.shape[0])}


def from_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> native names; each fused CLIP qkv becomes q, k and v (in that order),
    each MoE layer's per-expert Linears one stacked parameter per projection."""
    tensors = dict(tensors)  # stack_experts works in place; the caller's dict stays as it was
    stack_experts(tensors)
    out = {}
    for key, value in tensors.items():
        m = _QKV.match(key)
        if m:
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{m.group(1)}{part}_proj.{m.group(2)}"] = chunk
            continue
        out[_rename(key, _RENAMES)] = value
    return out


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if re.search(r"self_attn\.(k|v)_proj\.", key) and key.startswith("model.vision_model."):
            continue  # written with q below
        m = _SPLIT.match(key)
        if m:
            prefix, leaf = m.group(1), m.group(2)
            out[f"{prefix}qkv_proj.{leaf}"] = torch.cat([state[f"{prefix}{p}_proj.{leaf}"] for p in "qkv"])
            continue
        experts = split_experts(key, value)
        if experts is not None:
            out.update({_rename(k, _INVERSE): v for k, v in experts.items()})
            continue
        out[_rename(key, _INVERSE)] = value
    return out


def official_module_name(native: str) -> tuple[str, bool]:
    """The published name of a native module, and whether it is the same module there (CLIP's
    q/k/v are one fused qkv_proj upstream). The routed experts' module keeps its name: upstream
    it holds the same weights, as one Linear per expert."""
    m = re.fullmatch(r"(model\.vision_model\.transformer\.layers\.\d+\.self_attn\.)(q|k|v)_proj", native)
    if m:
        return f"{m.group(1)}qkv_proj", False
    return _rename(native + ".", _INVERSE)[:-1], True


def to_official_key(native: str) -> str:
    """One key renamed by prefix. A stacked expert parameter (or a LoRA tensor under it) keeps
    its stacked leaf, model.layers.N.mlp.experts.gate_proj: upstream it is one key per expert,
    which `split_experts` (weights) and the adapter writer (LoRA tensors) produce."""
    return _rename(native, _INVERSE)


def from_official_key(official: str) -> str:
    """Official -> native for a key under one module (names already native pass unchanged: no
    official prefix is a prefix of a native name)."""
    return _rename(official, _RENAMES)


# --- config.json -------------------------------------------------------------------------

def is_v1_config(raw: dict) -> bool:
    """An official-layout config.json of DeepSeek-OCR v1 (CLIP-L in its vision widths)."""
    return raw.get("model_type") == OFFICIAL_MODEL_TYPE and CLIP_KEY in (raw.get("vision_config") or {}).get("width", {})


def config_from_official(raw: dict, where: str, image_token_id: int):
    """The official config.json (as a dict) -> DeepseekOcrConfig; refuses variants it can't run."""
    def need(d: dict, key: str, path: str):
        if key not in d:
            raise OfficialLayoutError(f"{where}: {path}{key} is missing")
        return d[key]

    lang = raw.get("language_config") or raw
    vision = need(raw, "vision_config", "")
    widths = need(vision, "width", "vision_config.")
    clip, sam = need(widths, CLIP_KEY, "vision_config.width."), need(widths, SAM_KEY, "vision_config.width.")
    proj = raw.get("projector_config", {})
    if proj.get("projector_type", "linear") != "linear":
        raise OfficialLayoutError(f"{where}: projector_config.projector_type {proj['projector_type']!r}: only 'linear' "
                              "(DeepSeek-OCR's) is supported")
    check_published(raw, lang, where, OfficialLayoutError, "DeepSeek-OCR")
    text = text_config(lang, int(need(lang, "num_hidden_layers", "language_config.")))
    clip_width, sam_width = int(need(clip, "width", "clip ")), int(need(sam, "width", "sam "))
    downsample = list(sam.get("downsample_channels", [512, 1024]))
    if downsample[-1] != clip_width:
        raise OfficialLayoutError(f"{where}: SAM's last downsample channels ({downsample[-1]}) must equal CLIP's width "
                              f"({clip_width}): SAM features are CLIP's patch embeddings")
    return DeepseekOcrConfig(
        text_config=text,
        sam_config={
            "hidden_size": sam_width, "num_hidden_layers": int(sam["layers"]), "num_attention_heads": int(sam["heads"]),
            "global_attn_indexes": list(sam.get("global_attn_indexes", [2, 5, 8, 11])),
            "downsample_channels": downsample, "image_size": int(vision.get("image_size", 1024)),
            "patch_size": int(sam.get("patch_size", 16)), "window_size": int(sam.get("window_size", 14)),
            "mlp_dim": int(sam.get("mlp_dim", 4 * sam_width)), "output_channels": int(sam.get("output_channels", 256)),
        },
        clip_config={
            "hidden_size": clip_width, "num_hidden_layers": int(clip["layers"]), "num_attention_heads": int(clip["heads"]),
            "intermediate_size": int(clip.get("ffn_width", 4 * clip_width)), "image_size": int(clip.get("image_size", 224)),
            "patch_size": int(clip.get("patch_size", 14)), "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
        projector_input=int(proj.get("input_dim", 2 * clip_width)),
        image_token_id=image_token_id,
    )


def official_config(config) -> dict:
    """DeepseekOcrConfig -> the official config.json layout (plus the few sizes the official
    code hard-codes, so tiny models round-trip)."""
    t, s, c = config.text_config, config.sam_config, config.clip_config
    lang = language_config(t, OfficialLayoutError)  # the DeepSeek-V2 decoder, spelled as published
    return {
        "architectures": ["DeepseekOCRForCausalLM"],
        "model_type": OFFICIAL_MODEL_TYPE,
        # The published view layout: tiles tagged in 2-D, the global view first. The official
        # code and vLLM refuse any other, so they are written, not assumed.
        "candidate_resolutions": [[1024, 1024]],
        "global_view_pos": "head",
        "tile_tag": "2D",
        "language_config": lang,
        "projector_config": {"input_dim": config.projector_input, "n_embed": t.hidden_size, "projector_type": "linear"},
        "vision_config": {
            "image_size": s.image_size,
            "width": {
                CLIP_KEY: {"width": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                           "image_size": c.image_size, "patch_size": c.patch_size, "ffn_width": c.intermediate_size},
                SAM_KEY: {"width": s.hidden_size, "layers": s.num_hidden_layers, "heads": s.num_attention_heads,
                          "global_attn_indexes": list(s.global_attn_indexes),
                          "downsample_channels": list(s.downsample_channels), "patch_size": s.patch_size,
                          "window_size": s.window_size, "mlp_dim": s.mlp_dim, "output_channels": s.output_channels},
            },
        },
        **lang,  # the official remote code builds its config from the top-level fields
    }


# --- weights -----------------------------------------------------------------------------

def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise OfficialLayoutError(f"{folder}: no *.safetensors weights (ocrtune never unpickles .bin/.pt files)")
    return files


def read_official(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under their official names, except that each MoE layer's
    per-expert weights come stacked (`stack_experts`): stacked here, as they are read, the
    per-expert copies are freed group by group instead of living beside the stacks."""
    from safetensors import safe_open

    tensors = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    stack_experts(tensors)
    return tensors


def check_keys(expected: dict[str, tuple], got: dict[str, torch.Tensor], where: str) -> None:
    """Refuse, listing them, any missing, unexpected or wrongly shaped tensor."""
    # Compared per routed expert, as the checkpoint stores them: a missing expert is named as
    # the key to look for, not as a stack of the wrong size.
    expected = _per_expert_shapes(expected)
    got = _per_expert_shapes({k: tuple(v.shape) for k, v in got.items()})
    # Named as in the checkpoint, so they can be looked up there.
    missing = sorted({_official_name(k) for k in set(expected) - set(got)})
    unexpected = sorted({_official_name(k) for k in set(got) - set(expected)})
    shapes = sorted(f"{_official_name(k)}: checkpoint {got[k]}, model {tuple(expected[k])}"
                    for k in set(expected) & set(got) if tuple(got[k]) != tuple(expected[k]))
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                shown = ", ".join(items[:20])
                parts.append(f"{len(items)} {label} ({shown}{', ...' if len(items) > 20 else ''})")
        raise OfficialLayoutError(f"{where}: checkpoint does not match the DeepSeek-OCR architecture: " + "; ".join(parts))


def _per_expert_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
    out = {}
    for key, shape in shapes.items():
        m = _STACKED.match(key)
        if m and len(shape) == 3:
            out.update({f"{m.group(1)}{e}.{m.group(2)}.weight": tuple(shape[1:]) for e in range(shape[0])})
        else:
            out[key] = tuple(shape)
    return out


def _official_name(native: str) -> str:
    if _SPLIT.match(native) or re.search(r"vision_model\..*self_attn\.(k|v)_proj\.", native):
        return re.sub(r"(q|k|v)_proj\.", "qkv_proj.", native)
    return _rename(native, _INVERSE)


def save_official(model, folder: Path, state_dict=None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_official(state).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(official_config(model.config), indent=2) + "\n")
