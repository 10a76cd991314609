"""SmolVLM and Idefics3: a SigLIP-style vision model, a pixel-shuffle connector and a Llama text model
at `model.text_model` (not `model.language_model`).

Their chat templates read only typed content parts: a plain-string answer renders as nothing, so
answers are given as one text part."""

from __future__ import annotations

from pathlib import Path

from .base import FamilyAdapter, HEAD_TENSOR_NAMES
from .tiny import family_tokenizer, save_tiny, text_config


class SmolVLMAdapter(FamilyAdapter):
    model_type = "smolvlm"
    model_class_name = "SmolVLMForConditionalGeneration"
    text_model_path = "model.text_model"
    vision_prefixes = ("model.vision_model.",)  # the connector trains with the language model
    typed_answers = True
    head_tensor_names = {**HEAD_TENSOR_NAMES, "norm.weight": ("model.text_model.norm.weight",),
                         "embed_tokens.weight": ("model.text_model.embed_tokens.weight",)}


class Idefics3Adapter(SmolVLMAdapter):
    model_type = "idefics3"
    model_class_name = "Idefics3ForConditionalGeneration"


# SmolVLM's own template: it reads only typed content parts (a plain-string answer renders as nothing)
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """SmolVLM: SigLIP-style vision + pixel shuffle (4 tokens per 32-pixel tile), Llama text at
    `model.text_model`; images larger than a tile are split into tiles plus a global view."""
    import transformers

    named = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
             "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"}
    tok = family_tokenizer(["<|endoftext|>", "<|im_start|>", *named.values()], named, bos_token="<|im_start|>",
                            eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    config = transformers.SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **text_config(tok, rms_norm_eps=1e-5)),
        scale_factor=2, image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    image_processor = transformers.SmolVLMImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                           max_image_size={"longest_edge": 32})
    processor = transformers.SmolVLMProcessor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                              chat_template=SMOLVLM_CHAT_TEMPLATE)
    return save_tiny(out_dir, seed, lambda: transformers.SmolVLMForConditionalGeneration(config), processor)
