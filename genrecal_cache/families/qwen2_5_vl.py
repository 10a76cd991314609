"""Qwen2.5-VL: Qwen2-VL's text decoder and M-RoPE; a windowed-attention ViT + merger under `visual`."""

from __future__ import annotations

from pathlib import Path

from .qwen2_vl import Qwen2VLAdapter, build_qwen_style


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 - the family's own spelling
    model_type = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"


def build_tiny(out_dir: Path, seed: int) -> Path:
    """A tiny random qwen2_5_vl model (`build_qwen_style`)."""
    return build_qwen_style("qwen2_5_vl", out_dir, seed)
