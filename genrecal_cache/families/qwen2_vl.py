"""Qwen2-VL: Qwen2 text decoder with multimodal RoPE (M-RoPE), ViT + patch merger under `visual`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cpu_compat import install_compat_shim
from .base import FamilyAdapter
from .tiny import (
    QWEN2_SPLIT_REGEX, family_tokenizer, mrope_section, round_up, save_tiny, text_config, tokenizer_corpus,
    train_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class Qwen2VLAdapter(FamilyAdapter):
    model_type = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    vision_prefixes = ("model.visual.",)  # the patch merger (projector) lives inside `visual`


QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL-*-Instruct's chat template, verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_teacher(out_dir: str | Path, seed: int = 0, hidden_size: int = 128, layers: int = 2,
                       vocab_size: int = 800, head_dim: int = 64, vision_width: int = 64, vision_depth: int = 1,
                       image_side: int | None = None) -> Path:
    """Save a random Qwen2-VL-architecture model with its processor into `out_dir`; return it.

    A 56x56 image becomes a 4x4 grid of 14-pixel patches, merged 2x2 into 4 image tokens
    (`min_pixels=784, max_pixels=3136`, so larger images are scaled down to at most 4 tokens).
    `image_side=S` instead resizes every image to about S x S pixels ((S/28)^2 image tokens), e.g.
    112 for 16 tokens.
    """
    install_compat_shim()  # Qwen2VLProcessor cannot even be built without torchvision otherwise
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size, QWEN2_VL_SPECIAL_TOKENS, split_regex=QWEN2_SPLIT_REGEX,
                                nfc=True, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    heads = hidden_size // head_dim
    rotary_half = head_dim // 2  # M-RoPE splits the rotary frequencies into (temporal, height, width)
    section = [rotary_half // 4, (rotary_half - rotary_half // 4) // 2]
    section.append(rotary_half - sum(section))
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=round_up(len(tokenizer), 64), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden_size, num_heads=max(1, vision_width // 64),
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    pixels = (784, 3136) if image_side is None else (image_side * image_side, image_side * image_side)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels[0], max_pixels=pixels[1], patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    processor = _qwen2_vl_processor(Qwen2VLProcessor, image_processor, tokenizer)
    return save_tiny(out_dir, seed, lambda: Qwen2VLForConditionalGeneration(config), processor)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """The family matrix's tiny Qwen2-VL: the tiny teacher at the matrix's widths."""
    return build_tiny_teacher(out_dir, seed=seed, hidden_size=64, head_dim=32, vision_width=32)


QWEN_STYLE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>"]


def build_qwen_style(name: str, out_dir: Path, seed: int) -> Path:
    """Qwen2.5-VL / Qwen3-VL: the Qwen2-VL processor layout and template, their own model classes."""
    import transformers

    tok = family_tokenizer(QWEN_STYLE_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_STYLE_SPECIAL}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section(32)}
    if name == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=text_config(tok, rms_norm_eps=1e-6, rope_parameters=rope),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[0]),
            tie_word_embeddings=False, **tokens)
        model_cls, proc_cls, patch, template = (transformers.Qwen2_5_VLForConditionalGeneration,
                                                transformers.Qwen2_5_VLProcessor, 14, QWEN2_VL_CHAT_TEMPLATE)
    else:  # qwen3_vl: interleaved M-RoPE, DeepStack, 16-pixel patches, no default system prompt
        config = transformers.Qwen3VLConfig(
            text_config=text_config(tok, rms_norm_eps=1e-6, rope_parameters={**rope, "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                               deepstack_visual_indexes=[0]),
            tie_word_embeddings=False, **tokens)
        model_cls, proc_cls, patch = (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLProcessor, 16)
        template = QWEN2_VL_CHAT_TEMPLATE.replace(
            "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
            "<|im_end|>\n{% endif %}", "")
    side = 2 * patch * 2  # 2x2 merged tokens at most: (side/patch/2)^2 = 4 image tokens
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=(patch * 2) ** 2, max_pixels=side * side,
                                                            patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, chat_template=template)
    return save_tiny(out_dir, seed, lambda: model_cls(config), processor)


def _qwen2_vl_processor(processor_cls: type, image_processor: Any, tokenizer: PreTrainedTokenizerFast) -> Any:
    """A Qwen2VLProcessor; its video processor is added only where torchvision can build one."""
    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(min_pixels=784, max_pixels=3136, patch_size=14, merge_size=2,
                                                temporal_patch_size=2)
    except ImportError:  # no torchvision: the compat shim has removed the video processor
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                         chat_template=QWEN2_VL_CHAT_TEMPLATE)
