"""The one map from dtype names (`--dtype` of extraction, `--param-dtype` of training) to torch dtypes."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "torch_dtype"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (one of DTYPES); anything else is one ValueError naming the choices."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: use bfloat16, float16 or float32 (or bf16, fp16, fp32)") from None
