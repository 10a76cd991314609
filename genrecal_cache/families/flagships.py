"""Real-size configurations of flagship checkpoints, written here (no hub access), for checks on the meta device.

Each entry holds the fields of the checkpoint's `config.json` that decide shapes and the head (text and
vision widths, depths, heads, vocabularies, norms, rotary settings, special token ids), with the
transformers 5 layout. `flagship_config(name)` builds the config; `FamilyAdapter.meta_model(config)`
then builds the full model on the meta device (no memory), which the adapter checks walk
(`check_adapter_on_meta`). Weights are never needed: the point is that every family's adapter finds
its parts, shapes and head formula in the real architecture, not only in the tiny test models.
"""

from __future__ import annotations

from typing import Any

import torch

from ..format.head import TeacherHead
from .base import FamilyAdapter

_QWEN2_VL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                        vision_end_token_id=151653)
_MROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}


def _qwen2_text(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_parameters=dict(_MROPE), tie_word_embeddings=tied, hidden_act="silu")


def _qwen2_vl(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> dict:
    return dict(model_type="qwen2_vl", tie_word_embeddings=tied, **_QWEN2_VL_TOKENS,
                text_config=_qwen2_text(hidden, inter, layers, heads, kv, vocab, tied),
                vision_config=dict(depth=32, embed_dim=1280, hidden_size=hidden, mlp_ratio=4, num_heads=16,
                                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3))


def _internvl_2_5(vision: dict, text: dict) -> dict:
    return dict(model_type="internvl", image_token_id=151667, downsample_ratio=0.5, vision_feature_layer=-1,
                vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
                vision_config=dict(image_size=[448, 448], patch_size=[14, 14], use_absolute_position_embeddings=True,
                                   **vision),
                text_config=text)


FLAGSHIPS: dict[str, dict[str, Any]] = {
    "Qwen2-VL-72B-Instruct": _qwen2_vl(8192, 29568, 80, 64, 8, 152064, tied=False),
    "Qwen2-VL-7B-Instruct": _qwen2_vl(3584, 18944, 28, 28, 4, 152064, tied=False),
    "Qwen2-VL-2B-Instruct": _qwen2_vl(1536, 8960, 28, 12, 2, 151936, tied=True),
    "Qwen2.5-VL-72B-Instruct": dict(
        model_type="qwen2_5_vl", tie_word_embeddings=False, **_QWEN2_VL_TOKENS,
        text_config=_qwen2_text(8192, 29568, 80, 64, 8, 152064, tied=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, out_hidden_size=8192,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")),
    # InternVL2.5 in transformers' native (-hf) layout: InternViT-6B + Qwen2.5-72B; InternViT-300M + InternLM2.5-7B
    # (converted to a Llama decoder by transformers' conversion script)
    "InternVL2_5-78B": _internvl_2_5(
        dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
             use_qk_norm=True, norm_type="rms_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1),
        dict(model_type="qwen2", vocab_size=151674, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
             num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-6, max_position_embeddings=32768,
             rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False)),
    "InternVL2_5-8B": _internvl_2_5(
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1),
        dict(model_type="llama", vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768,
             rope_parameters={"rope_type": "dynamic", "rope_theta": 1_000_000.0, "factor": 2.0},
             tie_word_embeddings=False)),
    "gemma-3-27b-it": dict(
        model_type="gemma3", mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000,
        image_token_index=262144, tie_word_embeddings=True,
        text_config=dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                         num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
                         sliding_window=1024, rms_norm_eps=1e-6, max_position_embeddings=131072,
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                             "rope_theta": 1_000_000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                         final_logit_softcapping=None, tie_word_embeddings=True),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14,
                           vision_use_head=False)),
}


PUBLISHERS = {"qwen": "Qwen", "internvl": "OpenGVLab", "gemma": "google"}  # name prefix -> hub organization


def flagship_name(spec: str) -> str | None:
    """The FLAGSHIPS key `spec` names: the key itself or its hub id under its publisher's organization (any case).
    A same-named repo elsewhere (a fine-tune) is not assumed to share the config."""
    org, slash, name = spec.rpartition("/")
    key = next((k for k in FLAGSHIPS if k.lower() == name.lower()), None)
    if key is None or not slash:
        return key
    publisher = next((o for prefix, o in PUBLISHERS.items() if key.lower().startswith(prefix)), "")
    return key if org.lower() == publisher.lower() else None


def flagship_config(name: str) -> Any:
    """The transformers config of flagship checkpoint `name` (a key of `FLAGSHIPS`), built offline."""
    from transformers import AutoConfig

    if name not in FLAGSHIPS:
        raise KeyError(f"unknown flagship {name!r}; have {sorted(FLAGSHIPS)}")
    fields = dict(FLAGSHIPS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def check_adapter_on_meta(adapter: FamilyAdapter, config: Any) -> dict[str, Any]:
    """Walk the real-size model built on the meta device with the adapter; raise on anything it cannot
    find or that disagrees with the config. Returns what it found (for reports)."""
    model = adapter.meta_model(config)
    text, norm, head = adapter.text_model(model), adapter.final_norm(model), adapter.lm_head(model)
    tc = adapter.text_config(model)
    hc = adapter.head_config(config)
    if tuple(head.weight.shape) != (hc.vocab_size, hc.hidden_size):
        raise ValueError(f"{adapter.model_type}: lm_head is {tuple(head.weight.shape)}, the head config says "
                         f"({hc.vocab_size}, {hc.hidden_size})")
    if tuple(norm.weight.shape) != (hc.hidden_size,) or len(text.layers) != tc.num_hidden_layers:
        raise ValueError(f"{adapter.model_type}: final norm {tuple(norm.weight.shape)} / {len(text.layers)} layers "
                         f"do not match the text config")
    if adapter.tied_head(config) and head.weight is not text.embed_tokens.weight:
        raise ValueError(f"{adapter.model_type}: the config ties the head but lm_head is a separate matrix")
    vision = adapter.vision_parameter_prefixes(model)
    # the norm formula against the family's own norm module, with random weights of the real width
    g = torch.Generator().manual_seed(0)
    probe = TeacherHead(hc, 0.1 * torch.randn(hc.hidden_size, generator=g),
                        torch.empty(hc.vocab_size, hc.hidden_size, device="meta"))
    adapter.check_norm(config, probe)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "hidden_size": hc.hidden_size, "vocab_size": hc.vocab_size, "norm": hc.norm_type,
            "layers": len(text.layers), "vision_prefixes": vision, "decoder_layer": type(text.layers[0]).__name__}


__all__ = ["FLAGSHIPS", "check_adapter_on_meta", "flagship_config"]
