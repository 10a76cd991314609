"""InternVL (transformers' native `InternVLForConditionalGeneration`, the `-hf` checkpoints): an
InternViT vision tower, a pixel-shuffle MLP projector and a Qwen2/Llama text decoder.

The original remote-code InternVL checkpoints (`InternVLChatModel`, `model_type` "internvl_chat")
are another layout and are refused; convert them to the `-hf` format first."""

from __future__ import annotations

from pathlib import Path

from .base import FamilyAdapter
from .tiny import family_tokenizer, save_tiny, text_config


class InternVLAdapter(FamilyAdapter):
    model_type = "internvl"
    model_class_name = "InternVLForConditionalGeneration"
    vision_prefixes = ("model.vision_tower.",)  # the projector trains with the language model
    vllm_needs_torchvision = True  # vLLM's InternVL (interns1.py) imports transformers' video processor


INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<IMG_CONTEXT>\n{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """InternVL (-hf layout): InternViT + pixel shuffle + Qwen2; images tiled into 1-4 crops by aspect ratio."""
    import transformers

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = family_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()], named,
                            eos_token="<|im_end|>", pad_token="<|endoftext|>")
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                           image_size=[28, 28], patch_size=[7, 7]),
        text_config=dict(model_type="qwen2", **text_config(tok, rms_norm_eps=1e-6)),
        image_token_id=tok.context_image_token_id, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                            min_patches=1, max_patches=4)
    processor = transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                               chat_template=INTERNVL_CHAT_TEMPLATE)
    return save_tiny(out_dir, seed, lambda: transformers.InternVLForConditionalGeneration(config), processor)
