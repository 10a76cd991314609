"""LLaVA-OneVision: SigLIP tower, MLP projector, a Qwen2 text decoder; "anyres" images become a base view
plus a variable number of crops (pixel_values [images, crops, C, H, W] with `image_sizes`).

Its chat template reads only typed content parts, so answers are given as one text part."""

from __future__ import annotations

from pathlib import Path

from .base import FamilyAdapter
from .tiny import family_tokenizer, save_tiny, text_config


class LlavaOnevisionAdapter(FamilyAdapter):
    model_type = "llava_onevision"
    model_class_name = "LlavaOnevisionForConditionalGeneration"
    vision_prefixes = ("model.vision_tower.",)
    typed_answers = True


# LLaVA-OneVision's layout: images first, then the text parts; typed content only
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """LLaVA-OneVision: SigLIP (16 tokens per 32-pixel view), anyres crops on a 32/64-pixel grid, Qwen2 text."""
    import transformers

    tok = family_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                            {"image_token": "<image>", "video_token": "<video>"},
                            eos_token="<|im_end|>", pad_token="<|endoftext|>")
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=1, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", **text_config(tok, rms_norm_eps=1e-6)),
        image_token_index=tok.image_token_id, video_token_index=tok.video_token_id, image_grid_pinpoints=grid,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    image_processor = transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                                  image_grid_pinpoints=grid)
    processor = transformers.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                                     num_image_tokens=16, vision_feature_select_strategy="full",
                                                     chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
    return save_tiny(out_dir, seed, lambda: transformers.LlavaOnevisionForConditionalGeneration(config), processor,
                 hub_vision_names=True)
