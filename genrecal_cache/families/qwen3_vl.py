"""Qwen3-VL: Qwen3 text decoder (q/k norms) with interleaved M-RoPE; ViT + DeepStack mergers under `visual`."""

from __future__ import annotations

from pathlib import Path

from .qwen2_vl import Qwen2VLAdapter, build_qwen_style


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_type = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"


def build_tiny(out_dir: Path, seed: int) -> Path:
    """A tiny random qwen3_vl model (`build_qwen_style`)."""
    return build_qwen_style("qwen3_vl", out_dir, seed)
