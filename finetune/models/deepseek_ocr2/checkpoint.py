"""DeepSeek-OCR-2's published checkpoint layout <-> transformers' DeepseekOcr2 classes.

deepseek-ai/DeepSeek-OCR-2 publishes config.json with model_type "deepseek_vl_v2" and
architectures ["DeepseekOCR2ForCausalLM"] (language_config / vision_config /
projector_config, the language fields repeated at the top level for the remote code), and
safetensors under the remote-code names: model.sam_model.blocks.N..., the Qwen2 encoder as
model.qwen2_model.model.model.layers.N..., model.projector.layers, model.view_seperator (sic),
model.layers.N... with one module per routed expert. That is the layout vLLM's
DeepseekOCR2ForCausalLM and the published remote code load.

transformers reads those names itself (its conversion mapping renames them and fuses the
routed experts) but not that config.json; and what its save_pretrained writes depends on how
the model was loaded (loaded from transformers' own names, the experts stay fused). So the
full checkpoints ocrtune writes for OCR-2 (`export --merge`, `lora.preset: full`) are written
here, name by name: the published config.json (plus the sizes the remote code and vLLM
hard-code, so tiny models round-trip) and the published key set. `config_from_published`
reads such a config.json back, for ocrtune's own exports and for a download of the
published repository alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from finetune.models.deepseek_v2 import check_published, language_config, text_config
from finetune.models.family import ModelNameError, copy_side_files

PUBLISHED_MODEL_TYPE = "deepseek_vl_v2"
PUBLISHED_ARCHITECTURE = "DeepseekOCR2ForCausalLM"
SAM_KEY, ENCODER_KEY = "sam_vit_b", "qwen2-0-5b"

# The published Qwen2 encoder's sizes, which its config.json does not state (the remote code
# and vLLM build it at this size whatever the file says): used when a key is absent.
_ENCODER_DEFAULTS = {"layers": 24, "heads": 14, "kv_heads": 2, "ffn_width": 4864, "rope_theta": 1_000_000.0,
                     "rms_norm_eps": 1e-6}

# (transformers' prefix, published prefix), N a layer number: the reverse of transformers'
# conversion mapping for deepseek_ocr2. The first match wins.
_PAIRS = [
    (r"model\.vision_tower\.sam_encoder\.layers\.(\d+)\.layer_norm1\.", r"model.sam_model.blocks.\1.norm1."),
    (r"model\.vision_tower\.sam_encoder\.layers\.(\d+)\.layer_norm2\.", r"model.sam_model.blocks.\1.norm2."),
    (r"model\.vision_tower\.sam_encoder\.layers\.(\d+)\.attn\.", r"model.sam_model.blocks.\1.attn."),
    (r"model\.vision_tower\.sam_encoder\.layers\.(\d+)\.mlp\.", r"model.sam_model.blocks.\1.mlp."),
    (r"model\.vision_tower\.sam_encoder\.patch_embed\.projection\.", "model.sam_model.patch_embed.proj."),
    (r"model\.vision_tower\.sam_encoder\.pos_embed", "model.sam_model.pos_embed"),
    (r"model\.vision_tower\.sam_encoder\.neck\.conv1\.", "model.sam_model.neck.0."),
    (r"model\.vision_tower\.sam_encoder\.neck\.layer_norm1\.", "model.sam_model.neck.1."),
    (r"model\.vision_tower\.sam_encoder\.neck\.conv2\.", "model.sam_model.neck.2."),
    (r"model\.vision_tower\.sam_encoder\.neck\.layer_norm2\.", "model.sam_model.neck.3."),
    (r"model\.vision_tower\.sam_encoder\.proj\.conv1\.", "model.sam_model.net_2."),
    (r"model\.vision_tower\.sam_encoder\.proj\.conv2\.", "model.sam_model.net_3."),
    (r"model\.vision_tower\.vision_encoder\.layers\.", "model.qwen2_model.model.model.layers."),
    (r"model\.vision_tower\.vision_encoder\.norm\.", "model.qwen2_model.model.model.norm."),
    (r"model\.vision_tower\.query_768_resolution\.", "model.qwen2_model.query_768."),
    (r"model\.vision_tower\.query_1024_resolution\.", "model.qwen2_model.query_1024."),
    (r"model\.multi_modal_projector\.", "model.projector.layers."),
    (r"model\.view_separator", "model.view_seperator"),
    (r"model\.language_model\.", "model."),
]
_FUSED = re.compile(r"(model\.language_model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")


class PublishedLayoutError(ModelNameError):
    """A published-layout config.json this family cannot run; a ModelNameError, so every
    command reports it as a bad --model, not a traceback."""


def published_key(native: str) -> str:
    for pattern, template in _PAIRS:
        new, n = re.subn("^" + pattern, template, native)
        if n:
            return new
    return native


def to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict -> the published tensors: names renamed, and each fused
    expert parameter split per expert (gate_up_proj [E, 2I, H]: gate rows first, then up;
    down_proj [E, H, I])."""
    out = {}
    for key, value in state.items():
        m = _FUSED.match(key)
        if m is None:
            out[published_key(key)] = value
            continue
        stem = published_key(m.group(1))
        if m.group(2) == "down_proj":
            out.update({f"{stem}{e}.down_proj.weight": value[e] for e in range(value.shape[0])})
        else:
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"], out[f"{stem}{e}.up_proj.weight"] = gate[e], up[e]
    return out


# --- config.json -------------------------------------------------------------------------

def is_published_config(raw: dict) -> bool:
    return raw.get("model_type") == PUBLISHED_MODEL_TYPE and PUBLISHED_ARCHITECTURE in (raw.get("architectures") or ())


def published_config(config) -> dict:
    """DeepseekOcr2Config -> the published config.json, with the encoder and SAM sizes the
    published file leaves to the code written out too."""
    t, s, e = config.text_config, config.vision_config.sam_config, config.vision_config.encoder_config
    if t.head_dim != t.hidden_size // t.num_attention_heads:
        raise PublishedLayoutError(f"text_config.head_dim {t.head_dim} is not hidden_size / num_attention_heads: "
                                   "the published decoder derives it")
    lang = language_config(t, PublishedLayoutError)  # the DeepSeek-V2 decoder, spelled as published
    lang["tie_word_embeddings"] = bool(config.tie_word_embeddings)
    encoder_rope = (e.rope_parameters or {}).get("rope_theta", _ENCODER_DEFAULTS["rope_theta"])
    return {
        "architectures": [PUBLISHED_ARCHITECTURE],
        "model_type": PUBLISHED_MODEL_TYPE,
        # The published view layout (global view first, 2-D tile tags): vLLM refuses any other.
        "candidate_resolutions": [[s.image_size, s.image_size]],
        "global_view_pos": "head",
        "tile_tag": "2D",
        "language_config": {"architectures": ["DeepseekV2ForCausalLM"], **lang},
        "projector_config": {"input_dim": e.hidden_size, "model_type": "mlp_projector", "n_embed": t.hidden_size,
                             "projector_type": "linear"},
        "vision_config": {
            "image_size": s.image_size, "model_name": "deepencoderv2", "model_type": "vision",
            "width": {
                ENCODER_KEY: {"dim": e.hidden_size, "layers": e.num_hidden_layers, "heads": e.num_attention_heads,
                              "kv_heads": e.num_key_value_heads, "ffn_width": e.intermediate_size,
                              "rope_theta": float(encoder_rope), "rms_norm_eps": e.rms_norm_eps,
                              "max_position_embeddings": e.max_position_embeddings},
                SAM_KEY: {"width": s.hidden_size, "layers": s.num_hidden_layers, "heads": s.num_attention_heads,
                          "global_attn_indexes": list(s.global_attn_indexes),
                          "downsample_channels": list(s.downsample_channels), "patch_size": s.patch_size,
                          "window_size": s.window_size, "mlp_dim": s.mlp_dim, "output_channels": s.output_channels},
            },
        },
        "image_token_id": config.image_token_id,
        **lang,  # the published remote code builds its config from the top-level fields
    }


def config_from_published(raw: dict, where: str, image_token_id: int | None = None):
    """The published config.json (as a dict) -> DeepseekOcr2Config; refuses what it can't run.
    `image_token_id`: the tokenizer's id of <image>, where config.json has none (DeepSeek's)."""
    from transformers import DeepseekOcr2Config

    def need(d: dict, key: str, path: str):
        if not isinstance(d, dict) or key not in d:
            raise PublishedLayoutError(f"{where}: {path}{key} is missing")
        return d[key]

    lang = raw.get("language_config") or raw
    widths = need(need(raw, "vision_config", ""), "width", "vision_config.")
    sam, enc = need(widths, SAM_KEY, "vision_config.width."), need(widths, ENCODER_KEY, "vision_config.width.")
    proj = raw.get("projector_config") or {}
    if proj.get("projector_type", "linear") != "linear":
        raise PublishedLayoutError(f"{where}: projector_config.projector_type {proj['projector_type']!r}: only "
                                   "'linear' (DeepSeek-OCR-2's) is supported")
    check_published(raw, lang, where, PublishedLayoutError, "DeepSeek-OCR-2")
    text = text_config(lang, int(need(lang, "num_hidden_layers", "language_config.")))
    dim = int(need(enc, "dim", f"vision_config.width.{ENCODER_KEY}."))
    enc = {**_ENCODER_DEFAULTS, **enc}
    sam_width = int(need(sam, "width", f"vision_config.width.{SAM_KEY}."))
    # SAM's last convolution (net_3) outputs the encoder's width: the published file's
    # downsample_channels says 1024 there, the weights say 896 (transformers' converter reads
    # it the same way).
    downsample = [*list(sam.get("downsample_channels", [512, dim]))[:-1], dim]
    extra = {"max_position_embeddings": int(enc["max_position_embeddings"])} if "max_position_embeddings" in enc else {}
    vision = {
        "sam_config": {
            "hidden_size": sam_width, "num_hidden_layers": int(sam["layers"]), "num_attention_heads": int(sam["heads"]),
            "global_attn_indexes": list(sam.get("global_attn_indexes", [2, 5, 8, 11])), "downsample_channels": downsample,
            "image_size": int(raw["vision_config"].get("image_size", 1024)), "patch_size": int(sam.get("patch_size", 16)),
            "window_size": int(sam.get("window_size", 14)), "mlp_dim": int(sam.get("mlp_dim", 4 * sam_width)),
            "output_channels": int(sam.get("output_channels", 256)),
        },
        "encoder_config": {
            "hidden_size": dim, "num_hidden_layers": int(enc["layers"]), "num_attention_heads": int(enc["heads"]),
            "num_key_value_heads": int(enc["kv_heads"]), "intermediate_size": int(enc["ffn_width"]),
            "rms_norm_eps": float(enc["rms_norm_eps"]), "vocab_size": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(enc["rope_theta"])}, **extra,
        },
    }
    token = raw.get("image_token_id", image_token_id)
    return DeepseekOcr2Config(text_config=text, vision_config=vision,
                              tie_word_embeddings=bool(lang.get("tie_word_embeddings", False)),
                              **({"image_token_id": int(token)} if token is not None else {}))


def save_published(model, folder: Path, state_dict=None) -> None:
    """The whole model in the published layout: model.safetensors, config.json and the
    generation config. `state_dict`: as gathered under FSDP/DeepSpeed (else the model's)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_published(state).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = published_config(model.config)
    config["torch_dtype"] = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))


def write_published_copy(source: Path, dest: Path) -> None:
    """A checkpoint folder in transformers' layout (deepseek-community/DeepSeek-OCR-2's) ->
    the same weights in the published layout, in `dest`: shard by shard (a shard holds whole
    fused expert tensors, so each converts alone), never the whole model in memory. The other
    files (tokenizer, processor, generation config) are copied byte for byte."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import DeepseekOcr2Config

    source, dest = Path(source), Path(dest)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise ModelNameError(f"{source}: no *.safetensors weights to convert to the published layout")
    config = DeepseekOcr2Config.from_pretrained(str(source))
    dest.mkdir(parents=True, exist_ok=True)
    weight_map, dtype = {}, None
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            tensors = to_published({k: f.get_tensor(k) for k in f.keys()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
        dtype = dtype or str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        del tensors
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    published = published_config(config)
    published["torch_dtype"] = dtype
    (dest / "config.json").write_text(json.dumps(published, indent=2) + "\n")
    copy_side_files(source, dest)
