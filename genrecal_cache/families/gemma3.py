"""Gemma 3: a SigLIP vision tower, an average-pooling projector and the Gemma 3 text decoder.

What generic code gets wrong here: the final norm is `x/rms(x) * (1 + w)` (w is stored around 0),
the logits may be soft-capped (`final_logit_softcapping`), and the rotary embedding is one module
for all layer types whose `forward` takes the layer type (sliding or full attention)."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import FamilyAdapter
from .tiny import family_tokenizer, save_tiny, text_config, with_gemma_newlines


class Gemma3Adapter(FamilyAdapter):
    model_type = "gemma3"
    model_class_name = "Gemma3ForConditionalGeneration"
    vision_prefixes = ("model.vision_tower.",)
    norm_formula = "rms_1p"
    softcap_field = "final_logit_softcapping"
    attention = "image"  # image tokens attend to each other both ways (token_type_ids in its forward)

    def rotary_factory(self, model: torch.nn.Module):
        rotary_cls = type(self.text_model(model).rotary_emb)
        return lambda config: LayerTypeRotary(rotary_cls(config), "full_attention")


class LayerTypeRotary(torch.nn.Module):
    """A rotary embedding whose `forward` takes a layer type, fixed to one type: the Recalibrator's
    blocks are all full-attention layers (`Recalibrator` sets their `layer_types`)."""

    def __init__(self, rotary: torch.nn.Module, layer_type: str):
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, self.layer_type)


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """Gemma 3: SigLIP + 2x2 average pooling to 4 image tokens, Gemma 3 text (x*(1+w) norms, sliding and
    full layers, tied head, soft-capped logits: real Gemma 3 checkpoints have no cap; it is set here so
    the tests exercise it)."""
    import transformers

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = with_gemma_newlines(family_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                                                  *named.values()], named, bos_token="<bos>", eos_token="<eos>",
                                                 pad_token="<pad>"))
    config = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**text_config(
            tok, rms_norm_eps=1e-6, query_pre_attn_scalar=32, sliding_window=16, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention"]) | {"tie_word_embeddings": True}),
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=1, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id, tie_word_embeddings=True)
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                             chat_template=GEMMA3_CHAT_TEMPLATE)
    return save_tiny(out_dir, seed, lambda: transformers.Gemma3ForConditionalGeneration(config), processor,
                 hub_vision_names=True)
