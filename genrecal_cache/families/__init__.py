"""Model-family adapters: everything that differs between VLM families lives here, nowhere else.

One module per family says where its parts are and what its head computes (`base.FamilyAdapter`
holds the shared logic). `ADAPTERS` maps a config's `model_type` to its adapter; an unknown family
is refused (never handled by generic code that might be silently wrong): docs/families.md says
how to add one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .base import (HEAD_TENSOR_NAMES, NORM_FORMULAS, AnswerMaskError, EncodeError, Encoded, FamilyAdapter,
                   HeadCheckError)
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

ADAPTERS: dict[str, type[FamilyAdapter]] = {a.model_type: a for a in (Qwen2VLAdapter, LlavaAdapter)}


def adapter_for(config: PreTrainedConfig | str | os.PathLike) -> FamilyAdapter:
    """The adapter for a model config (or a model folder/hub id, whose config is read)."""
    if isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}. "
                         f"A family is supported only when its head and answer masks are known to be exact: "
                         f"add an adapter module in genrecal_cache/families/ and its tiny test model "
                         f"(docs/families.md, 'Adding a family')")
    return ADAPTERS[model_type]()


__all__ = ["ADAPTERS", "HEAD_TENSOR_NAMES", "NORM_FORMULAS", "AnswerMaskError", "EncodeError", "Encoded",
           "FamilyAdapter", "HeadCheckError", "LlavaAdapter", "Qwen2VLAdapter", "adapter_for"]
