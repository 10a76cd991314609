"""Mistral 3 (Mistral-Small-3.1 vision): a Pixtral vision tower (native resolution: images of different
sizes are padded to one tensor and cropped back by `image_sizes`), a patch-merger projector and a
Mistral text decoder."""

from __future__ import annotations

from pathlib import Path

from .base import FamilyAdapter
from .tiny import family_tokenizer, save_tiny, text_config


class Mistral3Adapter(FamilyAdapter):
    model_type = "mistral3"
    model_class_name = "Mistral3ForConditionalGeneration"
    vision_prefixes = ("model.vision_tower.",)


MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}{% elif block['type'] == 'image' %}[IMG]{% endif %}"
    "{% endfor %}{% endif %}[/INST]{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """Mistral 3: Pixtral vision at native resolution (8-pixel patches, longest edge 64, rows ended by
    [IMG_BREAK]), 2x2 patch merger, Mistral text; BOS written by the template. (transformers' Mistral 3
    fails on a batch whose images make a single merged token in all: keep images >= 2 merged patches.)"""
    import transformers

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = family_tokenizer(special, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = transformers.Mistral3Config(
        vision_config=transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=1, head_dim=32, image_size=64,
                                                       patch_size=8),
        text_config=transformers.MistralConfig(**text_config(tok, rms_norm_eps=1e-5)),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
        tie_word_embeddings=False)
    image_processor = transformers.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8)
    processor = transformers.PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                              spatial_merge_size=2, chat_template=MISTRAL3_CHAT_TEMPLATE)
    return save_tiny(out_dir, seed, lambda: transformers.Mistral3ForConditionalGeneration(config), processor)
