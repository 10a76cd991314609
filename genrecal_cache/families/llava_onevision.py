"""LLaVA-OneVision: SigLIP tower, MLP projector, a Qwen2 text decoder; "anyres" images become a base view
plus a variable number of crops (pixel_values [images, crops, C, H, W] with `image_sizes`).

Its chat template reads only typed content parts, so answers are given as one text part."""

from .base import FamilyAdapter


class LlavaOnevisionAdapter(FamilyAdapter):
    model_type = "llava_onevision"
    model_class_name = "LlavaOnevisionForConditionalGeneration"
    vision_prefixes = ("model.vision_tower.",)
    typed_answers = True
