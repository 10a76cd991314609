"""Reference backend: a plain transformers forward of the teacher, batched with right padding.

It is the numerical reference every other backend is checked against, and the CPU default.
"""

from __future__ import annotations

import torch

from genrecal_cache.families import Encoded, FamilyAdapter

__all__ = ["HFBackend", "collate"]


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


class HFBackend:
    """Runs `model.model(...)` (the VLM body without lm_head) and returns post-norm final states."""

    name = "transformers"
    needs_images = False  # the processor's outputs (Encoded.model_inputs) are all it needs

    def __init__(self, adapter: FamilyAdapter, path: str, dtype: torch.dtype, device: str, pad_id: int):
        self.device = torch.device(device)
        self.adapter = adapter
        self.model = adapter.load_model(path, dtype=dtype, device=device).eval()
        self.head = adapter.export_head(self.model).to(self.device)
        self.pad_id = pad_id

    def _inputs(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        inputs = {k: v.to(self.device) for k, v in collate(batch, self.pad_id).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def check_head(self, batch: list[Encoded]) -> None:
        """The exported head against the teacher's own full forward (logits and final norm) on one sample."""
        self.adapter.check_head(self.model, self.head, self._inputs(batch[:1]))

    @torch.inference_mode()
    def hidden_states(self, batch: list[Encoded]) -> list[torch.Tensor]:
        out = self.model.model(**self._inputs(batch), use_cache=False)
        h = out.last_hidden_state
        return [h[i, : e.input_ids.shape[0]] for i, e in enumerate(batch)]

    def close(self) -> None:
        del self.model
