"""LLaVA: a Llama-type text decoder, a CLIP/SigLIP vision tower and an MLP projector."""

from __future__ import annotations

from pathlib import Path

from .base import FamilyAdapter
from .tiny import LLAMA3_SPLIT_REGEX, save_tiny, tokenizer_corpus, train_tokenizer


class LlavaAdapter(FamilyAdapter):
    model_type = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    # the projector trains with the language model; only the vision encoder stays frozen
    vision_prefixes = ("model.vision_tower.",)


STUDENT_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>", "<|pad|>", "<image>"]

# Llama-3 style: BOS in the template, headers per turn, string content trimmed (as Llama 3's is).
STUDENT_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def build_tiny_student(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                       vocab_size: int = 500, head_dim: int = 32, image_size: int = 32, patch_size: int = 8) -> Path:
    """Save a random LLaVA model (Llama text + SigLIP vision) with its processor; return `out_dir`.

    Every image is resized to `image_size` and gives (image_size/patch_size)^2 tokens (16 by default).
    """
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              SiglipImageProcessorPil, SiglipVisionConfig)

    # A different corpus (American spelling), regex and size: token splits differ from the teacher's
    # even for shared words, as they do between real model families.
    corpus = [t.replace("colour", "color") for t in tokenizer_corpus()]
    tokenizer = train_tokenizer(corpus, vocab_size, STUDENT_SPECIAL_TOKENS, split_regex=LLAMA3_SPLIT_REGEX,
                                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
                                add_bos=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in STUDENT_SPECIAL_TOKENS}
    heads = hidden_size // head_dim
    config = LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
            max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"], pad_token_id=ids["<|pad|>"],
        ),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, image_size=image_size, patch_size=patch_size),
        image_token_index=ids["<image>"], image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False,
    )
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="full", chat_template=STUDENT_CHAT_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=0)
    return save_tiny(out_dir, seed, lambda: LlavaForConditionalGeneration(config), processor, hub_vision_names=True)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """The family matrix's tiny LLaVA: the tiny student."""
    return build_tiny_student(out_dir, seed=seed)
