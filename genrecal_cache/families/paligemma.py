"""PaliGemma: a SigLIP tower, a linear projector and a Gemma (PaliGemma 2: Gemma 2) text decoder.

PaliGemma is a single-turn prefix-LM without a chat template: its processor builds
``<image>... <bos> question \\n`` (the prefix, attended bidirectionally) + ``answer <eos>`` (the
suffix, `token_type_ids` 1) from the question and a separate `suffix`. So this adapter does not render
a template: the answer mask is the suffix without its EOS, and the mask check then confirms it
decodes to the answer. Multi-turn and text-only samples cannot be expressed and are `EncodeError`s.
The final norm is Gemma's `x*(1+w)`; PaliGemma 2's logits are soft-capped (`final_logit_softcapping`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import IMAGE_MARKER, Sample
from .base import EncodeError, Encoded, FamilyAdapter
from .gemma3 import Gemma3Adapter
from .tiny import family_tokenizer, save_tiny, text_config, with_gemma_newlines


class PaliGemmaAdapter(FamilyAdapter):
    model_type = "paligemma"
    model_class_name = "PaliGemmaForConditionalGeneration"
    # a Gemma text decoder behind the same SigLIP tower layout: Gemma's head (norm x*(1+w), soft-cap field)
    vision_prefixes = Gemma3Adapter.vision_prefixes
    norm_formula = Gemma3Adapter.norm_formula
    softcap_field = Gemma3Adapter.softcap_field
    attention = "prefix"  # images + question attend both ways, the answer causally (token_type_ids)

    def _prefix(self, processor: Any, sample: Sample, n_images: int, where: str) -> tuple[str, str | None]:
        """(processor text: one image token per image + the question, the answer or None)."""
        if sample.error:
            raise EncodeError(f"{where}: the sample is marked bad: {sample.error}")
        turns = [m for m in sample.messages if m["role"] != "system"]
        if len(turns) not in (1, 2) or turns[0]["role"] != "user" or (len(turns) == 2 and turns[1]["role"] != "assistant"):
            raise EncodeError(f"{where}: PaliGemma is single-turn (one question, one answer); this sample has "
                              f"{len(turns)} turns. Split it into single-turn samples or use another family")
        question = turns[0]["content"]
        if question.count(IMAGE_MARKER) != n_images or n_images == 0:
            raise EncodeError(f"{where}: PaliGemma needs at least one image and one '{IMAGE_MARKER}' per image; "
                              f"{question.count(IMAGE_MARKER)} marker(s), {n_images} image(s)")
        text = processor.image_token * n_images + " ".join(question.replace(IMAGE_MARKER, " ").split())
        return text, turns[1]["content"] if len(turns) == 2 else None

    def encode(self, processor: Any, sample: Sample, images: list, max_len: int | None = None) -> Encoded:
        where = f"sample {sample.id!r} ({self.model_type})"
        text, answer = self._prefix(processor, sample, len(images), where)
        if not answer or not answer.strip():
            raise EncodeError(f"{where}: no answer to distil")
        try:
            out = processor(text=[text], images=[list(images)], suffix=[answer], return_tensors="pt")
        except (ValueError, TypeError) as e:
            raise EncodeError(f"{where}: the processor rejected the sample: {e}") from e
        input_ids = out.pop("input_ids")[0].long()
        suffix = out["token_type_ids"][0].bool()
        out.pop("labels", None)
        out.pop("attention_mask", None)
        if max_len is not None and len(input_ids) > max_len:
            raise EncodeError(f"{where}: {len(input_ids)} tokens exceed max_len={max_len}; raise max_len "
                              f"or drop/shorten the sample")
        answer_mask = suffix.clone()
        last = int(suffix.nonzero().max())
        if int(input_ids[last]) == processor.tokenizer.eos_token_id:
            answer_mask[last] = False  # the EOS closes the answer: a label, not answer text
        self.check_answer_mask(processor, input_ids, answer_mask, [answer], where)
        return Encoded(input_ids=input_ids, answer_mask=answer_mask, model_inputs=dict(out), prompt=text,
                       images=list(images))

    def prompt_inputs(self, processor: Any, sample: Sample, images: list) -> tuple[dict, str]:
        where = f"sample {sample.id!r} ({self.model_type})"
        text, answer = self._prefix(processor, sample, len(images), where)
        if answer is None:
            raise EncodeError(f"{where}: no assistant turn to use as the reference answer")
        return dict(processor(text=[text], images=[list(images)], return_tensors="pt")), answer

    def rotary_factory(self, model: torch.nn.Module):
        return type(self.text_model(model).rotary_emb)


def build_tiny(out_dir: Path, seed: int) -> Path:
    """PaliGemma: SigLIP (16 tokens per 32-pixel image) + linear projector + Gemma text (x*(1+w) norms, tied
    head); no chat template (the processor builds image tokens + BOS + question + newline + answer)."""
    import transformers

    tok = with_gemma_newlines(family_tokenizer(["<pad>", "<eos>", "<bos>", "<image>"], {"image_token": "<image>"},
                                                 bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"))
    image_processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds <loc>/<seg>
    text = transformers.GemmaConfig(**text_config(tok, rms_norm_eps=1e-6) | {"tie_word_embeddings": True})
    text.vocab_size = len(processor.tokenizer)
    config = transformers.PaliGemmaConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=1, image_size=32, patch_size=8,
                                                      projection_dim=64),
        text_config=text, image_token_index=tok.image_token_id, projection_dim=64, hidden_size=64,
        tie_word_embeddings=True)
    return save_tiny(out_dir, seed, lambda: transformers.PaliGemmaForConditionalGeneration(config), processor,
                 hub_vision_names=True)
