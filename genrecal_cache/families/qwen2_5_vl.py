"""Qwen2.5-VL: Qwen2-VL's text decoder and M-RoPE; a windowed-attention ViT + merger under `visual`."""

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 - the family's own spelling
    model_type = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
