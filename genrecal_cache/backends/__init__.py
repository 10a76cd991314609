"""Teacher forward backends: `hf` (transformers, the numerical reference) and `vllm`."""
