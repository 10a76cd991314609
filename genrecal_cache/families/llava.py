"""LLaVA: a Llama-type text decoder, a CLIP/SigLIP vision tower and an MLP projector."""

from .base import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    model_type = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    # the projector trains with the language model; only the vision encoder stays frozen
    vision_prefixes = ("model.vision_tower.",)
