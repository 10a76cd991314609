"""Model-family adapters: everything that differs between VLM families lives here, nowhere else.

An adapter knows how to load a family's processor and model, how to turn a `Sample` into token
ids plus an answer mask with the family's own chat template (`encode`), where the final norm,
lm_head, decoder stack and vision tower live, and how to export the teacher head.

Answer masks come from character offsets: the conversation is rendered once in full and once up
to each assistant turn with ``add_generation_prompt=True``; the answer starts where that prefix
ends. The text is tokenized with offsets, image placeholders are expanded by the processor, and
a token is an answer token when its characters lie inside an answer. A token that straddles an
answer boundary (the template glues answer text to template text) is an error, never a guess.

Families: ``qwen2_vl`` (Qwen2-VL; teacher, also usable as a student) and ``llava`` (LLaVA:
a Llama-type text model with a SigLIP/CLIP vision tower; the student).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .data import IMAGE_MARKER, Sample
from .head import HeadConfig, TeacherHead

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedConfig


@dataclass
class Encoded:
    """One sample in one model's tokenization."""

    input_ids: torch.Tensor  # [L] int64
    answer_mask: torch.Tensor  # [L] bool: True on tokens of assistant *content* (not template tokens)
    model_inputs: dict  # extra forward kwargs with batch dim 1 (pixel_values, image_grid_thw, ...)
    prompt: str  # rendered chat text (what vLLM gets, with one placeholder per image)
    images: list = field(default_factory=list)  # the decoded PIL images, in placeholder order (for vLLM)


class EncodeError(ValueError):
    """A sample that cannot be encoded for this model (template, answer boundary or length problem)."""


class FamilyAdapter:
    """Shared logic; subclasses only say where things live in their family's modules."""

    model_type: ClassVar[str]
    model_class_name: ClassVar[str]  # the full VLM class in `transformers`
    uses_mrope: ClassVar[bool] = False
    vision_prefixes: ClassVar[tuple[str, ...]]  # parameter-name prefixes of the frozen vision encoder

    # --- loading -------------------------------------------------------------------------------

    def load_processor(self, path: str | os.PathLike) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    def load_model(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
        import transformers

        model_class = getattr(transformers, self.model_class_name)
        return model_class.from_pretrained(path, dtype=dtype).to(device).eval()

    # --- where things live ---------------------------------------------------------------------

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm) without vision parts or lm_head."""
        return model.model.language_model

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.text_model(model).norm

    def lm_head(self, model: torch.nn.Module) -> torch.nn.Linear:
        return model.lm_head

    def text_config(self, model: torch.nn.Module) -> Any:
        return model.config.text_config

    def decoder_layer_class(self, model: torch.nn.Module) -> type[torch.nn.Module]:
        return type(self.text_model(model).layers[0])

    def vision_parameter_prefixes(self, model: torch.nn.Module) -> list[str]:
        """Prefixes of `model.named_parameters()` names of the vision encoder (frozen in stages 2 and 3)."""
        names = [n for n, _ in model.named_parameters()]
        prefixes = [p for p in self.vision_prefixes if any(n.startswith(p) for n in names)]
        if not prefixes:
            raise ValueError(f"{type(model).__name__}: no parameters under {self.vision_prefixes}; "
                             f"is this really a {self.model_type} model?")
        return prefixes

    def head_config(self, model: torch.nn.Module) -> HeadConfig:
        norm, head = self.final_norm(model), self.lm_head(model)
        if isinstance(norm, torch.nn.LayerNorm):
            norm_type, eps = "layer", norm.eps
        else:  # the RMSNorm classes of these families store eps as `variance_epsilon`
            norm_type, eps = "rms", getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise ValueError(f"cannot read the epsilon of final norm {type(norm).__name__}")
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"{self.model_type}: lm_head has a bias, which TeacherHead does not support")
        vocab, hidden = head.weight.shape
        return HeadConfig(hidden_size=hidden, vocab_size=vocab, norm_type=norm_type, norm_eps=float(eps))

    def export_head(self, model: torch.nn.Module) -> TeacherHead:
        norm = self.final_norm(model)
        return TeacherHead(self.head_config(model), norm.weight, self.lm_head(model).weight,
                           getattr(norm, "bias", None))

    # --- encoding ------------------------------------------------------------------------------

    def encode(self, processor: Any, sample: Sample, images: list[Image.Image], max_len: int | None = None) -> Encoded:
        """Tokenize `sample` with the family's chat template; mark the assistant answers.

        `images` are the decoded sample images (PIL), in marker order. `prompt` holds every
        template token already: tokenize it with `add_special_tokens(processor, prompt)`.
        Raises `EncodeError`.
        """
        where = f"sample {sample.id!r} ({self.model_type})"
        if sample.error:
            raise EncodeError(f"{where}: the sample is marked bad: {sample.error}")
        n_markers = sum(m["content"].count(IMAGE_MARKER) for m in sample.messages if m["role"] != "assistant")
        if n_markers != len(images):
            raise EncodeError(f"{where}: {n_markers} '{IMAGE_MARKER}' marker(s) but {len(images)} image(s) given")
        placeholder = getattr(processor, "image_token", None) or IMAGE_MARKER
        for m in sample.messages:
            if m["role"] == "assistant" and (IMAGE_MARKER in m["content"] or placeholder in m["content"]):
                raise EncodeError(f"{where}: an assistant answer contains an image placeholder; images can "
                                  f"only be in user turns")
        messages = [self._chat_message(m) for m in sample.messages]
        full = self._render(processor, messages, add_generation_prompt=False)
        spans = [self._answer_span(processor, messages, k, full, where)
                 for k, m in enumerate(messages) if m["role"] == "assistant"]

        try:
            out = processor(
                text=[full], images=images or None, return_tensors="pt", return_offsets_mapping=True,
                return_text_replacement_offsets=True,
                add_special_tokens=self.add_special_tokens(processor, full),
            )
        except (ValueError, TypeError) as e:  # e.g. an extreme aspect ratio, placeholder text in a question
            raise EncodeError(f"{where}: the processor rejected the sample: {e}") from e
        input_ids = out.pop("input_ids")[0].long()
        offsets = out.pop("offset_mapping")[0].tolist()
        replacements = out.pop("text_replacement_offsets", [[]])
        out.pop("attention_mask", None)  # all ones for one unpadded sequence; batching builds its own
        if max_len is not None and len(input_ids) > max_len:
            raise EncodeError(f"{where}: {len(input_ids)} tokens exceed max_len={max_len}; raise max_len "
                              f"or drop/shorten the sample")
        shift = _expansion_shift(replacements[0] if replacements else [])
        answer_mask = torch.zeros(len(input_ids), dtype=torch.bool)
        for start, end in spans:
            self._mark(answer_mask, offsets, shift(start), shift(end), full[start:end], where)
        return Encoded(input_ids=input_ids, answer_mask=answer_mask, model_inputs=dict(out), prompt=full,
                       images=list(images))

    def prompt_inputs(self, processor: Any, sample: Sample, images: list[Image.Image]) -> tuple[dict, str]:
        """Generation inputs (batch 1) for everything before the last answer, and that answer.

        Images that only belong to the dropped last answer's turns never occur: answers hold none.
        """
        where = f"sample {sample.id!r} ({self.model_type})"
        last = max((k for k, m in enumerate(sample.messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise EncodeError(f"{where}: no assistant turn to use as the reference answer")
        messages = [self._chat_message(m) for m in sample.messages[:last]]
        prompt = self._render(processor, messages, add_generation_prompt=True)
        out = processor(text=[prompt], images=images or None, return_tensors="pt",
                        add_special_tokens=self.add_special_tokens(processor, prompt))
        return dict(out), sample.messages[last]["content"]

    @staticmethod
    def add_special_tokens(processor: Any, prompt: str) -> bool:
        """Whether tokenizing a rendered `prompt` must add the tokenizer's special tokens (BOS).

        Templates that write BOS themselves (Llama 3 style) must not get a second one; pass this
        to vLLM too (`tokenization_kwargs={"add_special_tokens": ...}`), whose default is True.
        """
        bos = processor.tokenizer.bos_token
        return bos is not None and not prompt.startswith(bos)

    def _chat_message(self, message: dict) -> dict:
        """Sample message -> template message: user/system text is split into text and image parts."""
        if message["role"] == "assistant":
            return {"role": "assistant", "content": message["content"]}
        parts: list[dict] = []
        for i, piece in enumerate(message["content"].split(IMAGE_MARKER)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return {"role": message["role"], "content": parts}

    @staticmethod
    def _render(processor: Any, messages: list[dict], add_generation_prompt: bool) -> str:
        # deep-enough copy: apply_chat_template normalises content blocks in place
        msgs = [{**m, "content": list(m["content"]) if isinstance(m["content"], list) else m["content"]}
                for m in messages]
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _answer_span(self, processor: Any, messages: list[dict], k: int, full: str, where: str) -> tuple[int, int]:
        """Character span of assistant message `k`'s content in the full rendering."""
        prefix = self._render(processor, messages[:k], add_generation_prompt=True)
        if not full.startswith(prefix):
            raise EncodeError(f"{where}: the chat template renders turn {k} differently with and without the "
                              f"rest of the conversation, so the answer cannot be located")
        start, content = len(prefix), messages[k]["content"]
        if not content.strip():
            raise EncodeError(f"{where}: answer of turn {k} is empty; there is nothing to distil")
        # Templates may trim the answer (Llama 3's does): accept the content as rendered, nothing else.
        for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
            if candidate and full.startswith(candidate, start):
                return start, start + len(candidate)
        raise EncodeError(f"{where}: answer of turn {k} is empty or altered by the chat template "
                          f"(expected {content[:40]!r} at character {start})")

    @staticmethod
    def _mark(mask: torch.Tensor, offsets: list, start: int, end: int, text: str, where: str) -> None:
        inside = []
        for i, (a, b) in enumerate(offsets):
            if b <= start or a >= end or a == b:  # outside, or zero-width (special tokens added by the tokenizer)
                continue
            if a < start or b > end:
                raise EncodeError(f"{where}: token {i} (characters {a}-{b}) straddles the boundary of the answer "
                                  f"{text[:40]!r} (characters {start}-{end}); the chat template glues the answer "
                                  f"to template text, e.g. no separator before it")
            inside.append(i)
        if not inside:
            raise EncodeError(f"{where}: the answer {text[:40]!r} produced no tokens")
        if offsets[inside[0]][0] != start or offsets[inside[-1]][1] != end:
            raise EncodeError(f"{where}: the tokenizer does not cover the answer {text[:40]!r} exactly "
                              f"(characters {start}-{end}); its normalizer drops or moves characters")
        mask[inside] = True

    # --- forward -------------------------------------------------------------------------------

    def final_hidden_states(self, model: torch.nn.Module, enc: Encoded, grad: bool = False) -> torch.Tensor:
        """[L, d] last-layer hidden states *after* the final norm (what lm_head reads).

        Runs the base model (no lm_head), so no [L, vocab] logits are ever formed. Without
        autograd unless `grad=True` (a student being trained through its features).
        """
        param = next(model.parameters())
        inputs = {k: (v.to(param.device, param.dtype) if torch.is_floating_point(v) else v.to(param.device))
                  for k, v in enc.model_inputs.items()}
        with torch.set_grad_enabled(grad):
            out = model.model(input_ids=enc.input_ids[None].to(param.device), use_cache=False, **inputs)
        return out.last_hidden_state[0]


class Qwen2VLAdapter(FamilyAdapter):
    model_type = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    uses_mrope = True
    vision_prefixes = ("model.visual.",)  # the patch merger (projector) lives inside `visual`


class LlavaAdapter(FamilyAdapter):
    model_type = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    # the projector trains with the language model; only the vision encoder stays frozen
    vision_prefixes = ("model.vision_tower.",)


ADAPTERS: dict[str, type[FamilyAdapter]] = {a.model_type: a for a in (Qwen2VLAdapter, LlavaAdapter)}


def adapter_for(config: PreTrainedConfig | str | os.PathLike) -> FamilyAdapter:
    """The adapter for a model config (or a model folder/hub id, whose config is read)."""
    if isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))} "
                         f"(add an adapter in genrecal_cache/families.py)")
    return ADAPTERS[model_type]()


def _expansion_shift(replacements: list[dict]) -> Callable[[int], int]:
    """Map a character position of the rendered text to the processor's expanded text.

    The processor replaces each image placeholder by many copies; answers never contain
    placeholders, so a position moves right by the growth of every placeholder before it.
    """
    growth = sorted((r["span"][1], (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))
                    for r in replacements)

    def shift(pos: int) -> int:
        return pos + sum(g for end, g in growth if end <= pos)

    return shift


__all__ = ["ADAPTERS", "EncodeError", "Encoded", "FamilyAdapter", "LlavaAdapter", "Qwen2VLAdapter", "adapter_for"]
