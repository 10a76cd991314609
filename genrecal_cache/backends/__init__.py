"""Teacher forward backends: `hf` (transformers, the numerical reference) and `vllm`."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype names
