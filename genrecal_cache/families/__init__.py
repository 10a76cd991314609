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
from .collate import collate
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .mistral3 import Mistral3Adapter
from .paligemma import PaliGemmaAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .smolvlm import Idefics3Adapter, SmolVLMAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

ADAPTERS: dict[str, type[FamilyAdapter]] = {a.model_type: a for a in (
    Qwen2VLAdapter, LlavaAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, InternVLAdapter, Gemma3Adapter, SmolVLMAdapter,
    Idefics3Adapter, LlavaOnevisionAdapter, Mistral3Adapter, PaliGemmaAdapter)}


# Families looked at and refused, with why: a half-supported family would write wrong caches silently.
# (None at present; an entry here makes `adapter_for` raise with its reason.)
REFUSED: dict[str, str] = {}


class ModelNotFound(ValueError):
    """A model folder or hub id that gives no model config (`model_config`); the message is the one line to print."""


def looks_like_hub_id(spec: str) -> bool:
    """`name` or `org/name`: no URL scheme, no leading / . ~, no further slash (what a local path that is not there
    rarely looks like)."""
    return "://" not in spec and not spec.startswith(("/", ".", "~")) and spec.count("/") <= 1 \
        and not spec.endswith("/")


def model_config(spec: str | os.PathLike, flag: str) -> PreTrainedConfig:
    """The transformers config of a model folder or hub id `spec`, or a ModelNotFound naming `flag` (the option the
    user gave it by), what is wrong and the fix: no such folder, a folder with no config.json, or a hub id this
    machine cannot read (offline and not in the local hub cache, no such repo, a gated one)."""
    from pathlib import Path

    from transformers import AutoConfig

    spec, path = str(spec), Path(spec)
    if not path.exists() and not looks_like_hub_id(spec):
        raise ModelNotFound(f"{flag} {spec}: no such folder; give a model folder or a hub id (org/name)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFound(f"{flag} {spec}: no config.json in this folder; give a model folder (config.json, weights, "
                         f"processor), such as a run's final/")
    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:  # not a folder or hub id, offline, no such repo; a config with no model_type
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelNotFound(f"{flag} {spec}: cannot be loaded ({first[:300]}); give a model folder (config.json, "
                         f"weights, processor; a training run's model is in its final/) or a hub id") from None


def adapter_for(config: PreTrainedConfig | str | os.PathLike) -> FamilyAdapter:
    """The adapter for a model config (or a model folder/hub id, whose config is read)."""
    if isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(f"model type {model_type!r} is not supported: {REFUSED[model_type]}. Supported: "
                         f"{', '.join(sorted(ADAPTERS))} (docs/families.md)")
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}. "
                         f"A family is supported only when its head and answer masks are known to be exact: "
                         f"add an adapter module in genrecal_cache/families/ and its tiny test model "
                         f"(docs/families.md, 'Adding a family')")
    return ADAPTERS[model_type]()


__all__ = ["ADAPTERS", "REFUSED", "HEAD_TENSOR_NAMES", "NORM_FORMULAS", "AnswerMaskError", "EncodeError", "Encoded",
           "FamilyAdapter", "Gemma3Adapter", "HeadCheckError", "Idefics3Adapter", "InternVLAdapter", "LlavaAdapter",
           "LlavaOnevisionAdapter", "Mistral3Adapter", "ModelNotFound", "PaliGemmaAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter",
           "SmolVLMAdapter", "adapter_for", "collate", "looks_like_hub_id", "model_config"]
