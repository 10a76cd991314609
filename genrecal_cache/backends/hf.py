"""Reference backend: a plain transformers forward of the teacher, batched with right padding.

It is the numerical reference every other backend is checked against, and the CPU default.
"""

from __future__ import annotations

import torch

from genrecal_cache.families import Encoded, FamilyAdapter, collate

__all__ = ["HFBackend"]


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
