"""Gemma 3: a SigLIP vision tower, an average-pooling projector and the Gemma 3 text decoder.

What generic code gets wrong here: the final norm is `x/rms(x) * (1 + w)` (w is stored around 0),
the logits may be soft-capped (`final_logit_softcapping`), and the rotary embedding is one module
for all layer types whose `forward` takes the layer type (sliding or full attention)."""

from __future__ import annotations

import torch

from .base import FamilyAdapter


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
