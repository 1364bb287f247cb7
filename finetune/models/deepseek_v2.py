"""The DeepSeek-V2 decoder as DeepSeek-OCR and DeepSeek-OCR-2 both publish it: config.json's
`language_config` <-> the text config of ocrtune's v1 model and of transformers' OCR-2.

Both published configs spell the decoder the same way (DeepSeek-V2 field names, plain
multi-head attention written as MLA with zero ranks, MoE layers after first_k_dense_replace),
and vLLM reads them with one class. So the fields, the refusals and the vLLM-required
spelling live here once; each family's checkpoint.py adds its vision and projector sections.
"""

from __future__ import annotations

# Copied as they are, both ways (the same names in both layouts).
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
               "num_experts_per_tok", "routed_scaling_factor", "topk_method", "n_group", "topk_group",
               "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def check_published(raw: dict, lang: dict, where: str, error: type[Exception], model: str) -> None:
    """Raise `error`, naming the field, for a published config.json whose decoder or view
    layout the family's code does not run (`lang`: its language_config, or the top level)."""
    for key, ok in (("use_mla", False), ("norm_topk_prob", False)):
        if bool(lang.get(key, False)) != ok:
            raise error(f"{where}: language_config.{key} = {lang[key]!r} is not {model}'s decoder (expected {ok})")
    if lang.get("scoring_func", "softmax") != "softmax":
        raise error(f"{where}: language_config.scoring_func {lang['scoring_func']!r}: only softmax routing is "
                    "supported")
    if int(lang.get("moe_layer_freq", 1)) < 1:
        raise error(f"{where}: language_config.moe_layer_freq {lang['moe_layer_freq']!r}: must be 1 or more")
    tag, pos = raw.get("tile_tag", "2D"), raw.get("global_view_pos", "head")
    if (tag, pos) != ("2D", "head"):
        raise error(f"{where}: tile_tag {tag!r} / global_view_pos {pos!r}: only {model}'s '2D' / 'head' are supported")


def text_config(lang: dict, n_layers: int) -> dict:
    """language_config -> the text config's fields: which layers are MoE (from
    first_k_dense_replace and moe_layer_freq; none when the expert count is null or 0), rope
    and attention bias."""
    first_dense, freq = int(lang.get("first_k_dense_replace", 0)), int(lang.get("moe_layer_freq", 1))
    sparse = lang.get("n_routed_experts") not in (None, 0)
    text = {k: lang[k] for k in TEXT_FIELDS if lang.get(k) is not None}
    text.update(
        mlp_layer_types=["sparse" if sparse and i >= first_dense and i % freq == 0 else "dense" for i in range(n_layers)],
        rope_parameters={"rope_type": "default", "rope_theta": float(lang.get("rope_theta", 10000.0))},
        attention_bias=bool(lang.get("attention_bias", False)),
    )
    return text


def language_config(t, error: type[Exception]) -> dict:
    """A text config -> the published language_config. Raises `error` for a layer pattern the
    published layout cannot say (dense layers first, then MoE layers). The published
    config.json repeats these fields at its top level, which is all DeepSeek's remote code
    reads (its config class is DeepseekV2Config(**config.json)); vLLM reads language_config."""
    kinds = list(t.mlp_layer_types)
    first_dense = kinds.index("sparse") if "sparse" in kinds else len(kinds)
    if kinds != ["dense"] * first_dense + ["sparse"] * (len(kinds) - first_dense):
        raise error(f"text_config.mlp_layer_types {kinds}: the published layout has dense layers first, then MoE "
                    "layers (first_k_dense_replace)")
    lang = {k: getattr(t, k) for k in TEXT_FIELDS if getattr(t, k, None) is not None}
    lang.update(first_k_dense_replace=first_dense, moe_layer_freq=1, use_mla=False, norm_topk_prob=False,
                scoring_func="softmax", rope_theta=float(t.rope_parameters.get("rope_theta", 10000.0)),
                attention_bias=bool(t.attention_bias))
    # As published: plain multi-head attention spelled the DeepSeek-V2 way (no MLA ranks, zero
    # rope/nope split) and one expert group. vLLM reads these fields: without the zero head-dim
    # split it builds MLA attention, and a null expert count or group is refused. A decoder
    # without MoE layers keeps its expert count and says "dense" through first_k_dense_replace.
    lang.update(kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    lang["n_group"] = lang.get("n_group") or 1
    lang["topk_group"] = lang.get("topk_group") or 1
    lang.update(lm_head=True, rm_head=False)  # as published: an LM head, no reward head
    return lang
