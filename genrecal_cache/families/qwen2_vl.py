"""Qwen2-VL: Qwen2 text decoder with multimodal RoPE (M-RoPE), ViT + patch merger under `visual`."""

from .base import FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    model_type = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    vision_prefixes = ("model.visual.",)  # the patch merger (projector) lives inside `visual`
