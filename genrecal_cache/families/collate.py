"""One batch of encodings: right-padded ids and attention mask, the processor's other inputs batched.

Used by the teacher forward (genrecal_cache/backends/hf.py) and by the trainer's student batches
(genrecal_train/batches.py).
"""

from __future__ import annotations

import torch

from .base import Encoded

__all__ = ["collate"]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids to one length; per-token kwargs ([1, L] tensors) are padded the same way,
    per-image kwargs (pixel_values, image_grid_thw, image_sizes, ...) are concatenated along dim 0.

    Images of different sizes give per-image tensors of different shapes (Pixtral's native-resolution
    pixels, LLaVA-OneVision's number of crops, SmolVLM's number of tiles): they are zero-padded at the
    end of every other dim to the largest, as each family's processor pads a batch itself; the models
    crop the padding off by `image_sizes` (Pixtral, LLaVA-OneVision) or drop all-zero tiles (SmolVLM)."""
    longest = max(int(e.input_ids.shape[0]) for e in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, e in enumerate(batch):
        n = e.input_ids.shape[0]
        ids[i, :n] = e.input_ids
        mask[i, :n] = 1
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    for key in batch[0].model_inputs:
        values = [e.model_inputs[key] for e in batch]
        if all(v.dim() == 2 and v.shape[0] == 1 and v.shape[1] == e.input_ids.shape[0] for v, e in zip(values, batch)):
            padded = torch.zeros((len(batch), longest), dtype=values[0].dtype)
            for i, v in enumerate(values):
                padded[i, : v.shape[1]] = v[0]
            out[key] = padded
        else:
            out[key] = torch.cat(_pad_to_largest(values), dim=0)
    return out


def _pad_to_largest(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad tensors of one rank at the end of every dim but the first to the largest size."""
    if len({v.shape[1:] for v in values}) <= 1:
        return values
    if len({v.dim() for v in values}) != 1:
        raise ValueError(f"cannot batch model inputs of ranks {sorted({v.dim() for v in values})}")
    size = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    out = []
    for v in values:
        pad = []
        for d in reversed(range(1, v.dim())):
            pad += [0, size[d - 1] - v.shape[d]]
        out.append(torch.nn.functional.pad(v, pad))
    return out
