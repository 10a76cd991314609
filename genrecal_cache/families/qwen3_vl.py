"""Qwen3-VL: Qwen3 text decoder (q/k norms) with interleaved M-RoPE; ViT + DeepStack mergers under `visual`."""

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_type = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
