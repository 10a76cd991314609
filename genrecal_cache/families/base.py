"""The shared part of every family adapter (`FamilyAdapter`); each family's module only says what differs.

An adapter knows how to load a family's processor and model, how to turn a `Sample` into token
ids plus an answer mask with the family's own chat template (`encode`), where the text decoder,
final norm, lm_head and vision tower live, how the final norm computes (`norm_formula`), which
logit scale / soft-cap the family applies, where the head tensors are in a checkpoint, and how
the Recalibrator builds the student's rotary embedding.

Answer masks come from character offsets: the conversation is rendered once in full and once up
to each assistant turn with ``add_generation_prompt=True``; the answer starts where that prefix
ends. The text is tokenized with offsets, image placeholders are expanded by the processor, and
a token is an answer token when its characters lie inside an answer. A token that straddles an
answer boundary (the template glues answer text to template text) is an error, never a guess.
Every mask is then checked once more: its tokens must decode to the answer text (modulo
whitespace); a processor that inserts text it does not report would otherwise shift the mask
silently (`AnswerMaskError`, which stops an extraction or a training run).

Nothing is guessed about the head either: `check_head` runs the model's own forward and compares
its logits and its final norm with the exported `TeacherHead` (`HeadCheckError` on a mismatch).

Long because it is the one shared implementation of every family hook (the family modules only
set attributes and override what differs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..data import IMAGE_MARKER, Sample
from ..format.head import HeadConfig, TeacherHead
from ..format.manifest import answer_spans

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


class AnswerMaskError(RuntimeError):
    """An answer mask whose tokens do not decode to the answer: the adapter (not the sample) is wrong.

    Not an `EncodeError`: it must stop the run, not be recorded as one bad sample."""


class HeadCheckError(RuntimeError):
    """The exported teacher head does not reproduce the teacher's own logits or final norm."""


# Where HF VLM checkpoints keep the head (candidates, first present wins): as transformers 5 saves
# them and as older hub checkpoints have them. Families with another layout override it.
HEAD_TENSOR_NAMES: dict[str, tuple[str, ...]] = {
    "norm.weight": ("model.language_model.norm.weight", "model.norm.weight", "language_model.model.norm.weight"),
    "norm.bias": (),  # RMS norms have none
    "lm_head.weight": ("lm_head.weight", "language_model.lm_head.weight"),
    "embed_tokens.weight": ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight",
                            "language_model.model.embed_tokens.weight"),
}

NORM_FORMULAS = ("rms", "rms_1p", "layer")  # x*w | x*(1+w) (Gemma) | LayerNorm, see head.py


class FamilyAdapter:
    """Shared logic; a family's module sets the class attributes below and overrides what differs."""

    model_type: ClassVar[str]
    model_class_name: ClassVar[str]  # the full VLM class in `transformers`
    vision_prefixes: ClassVar[tuple[str, ...]]  # parameter-name prefixes of the frozen vision encoder
    text_model_path: ClassVar[str] = "model.language_model"  # attribute path of the text decoder
    softcap_field: ClassVar[str | None] = None  # text-config field holding the final logit soft-cap, if any
    norm_formula: ClassVar[str] = "rms"  # one of NORM_FORMULAS: what the final norm computes
    head_tensor_names: ClassVar[dict[str, tuple[str, ...]]] = HEAD_TENSOR_NAMES
    # Templates that read only typed content parts ({"type": "text", ...}) render a plain-string
    # answer as nothing: those families get typed answers.
    typed_answers: ClassVar[bool] = False
    # How tokens attend in the family's own forward: "causal" (most), "image" (bidirectionally within
    # each image: Gemma 3), "prefix" (bidirectionally over images + question: PaliGemma's prefix-LM).
    # Backends that cannot reproduce it refuse the family (backends/vllm.py: `vllm_refusal`).
    attention: ClassVar[str] = "causal"
    vllm_needs_torchvision: ClassVar[bool] = False  # vLLM's processor for this family imports torchvision

    # --- loading -------------------------------------------------------------------------------

    def load_processor(self, path: str | os.PathLike) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    def model_class(self) -> type[torch.nn.Module]:
        import transformers

        return getattr(transformers, self.model_class_name)

    def load_model(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
        return self.model_class().from_pretrained(path, dtype=dtype).to(device).eval()

    def meta_model(self, config: PreTrainedConfig) -> torch.nn.Module:
        """The model built from `config` on the meta device: real module tree and shapes, no memory."""
        with torch.device("meta"):
            return self.model_class()(config)

    # --- where things live ---------------------------------------------------------------------

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm) without vision parts or lm_head."""
        m = model
        for name in self.text_model_path.split("."):
            m = getattr(m, name)
        return m

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.text_model(model).norm

    def lm_head(self, model: torch.nn.Module) -> torch.nn.Linear:
        return model.lm_head

    def text_config(self, model: torch.nn.Module | PreTrainedConfig) -> Any:
        config = getattr(model, "config", model)
        return config.get_text_config()

    def decoder_layer_class(self, model: torch.nn.Module) -> type[torch.nn.Module]:
        return type(self.text_model(model).layers[0])

    def rotary_factory(self, model: torch.nn.Module) -> Callable[[PreTrainedConfig], torch.nn.Module]:
        """Builds the student's rotary embedding for the Recalibrator's blocks: `factory(config)(x, pos)`
        must return the `position_embeddings` its decoder layers take."""
        return type(self.text_model(model).rotary_emb)

    def vision_parameter_prefixes(self, model: torch.nn.Module) -> list[str]:
        """Prefixes of `model.named_parameters()` names of the vision encoder (frozen in stages 2 and 3)."""
        names = [n for n, _ in model.named_parameters()]
        prefixes = [p for p in self.vision_prefixes if any(n.startswith(p) for n in names)]
        if not prefixes:
            raise ValueError(f"{type(model).__name__}: no parameters under {self.vision_prefixes}; "
                             f"is this really a {self.model_type} model?")
        return prefixes

    # --- the head ------------------------------------------------------------------------------

    def logit_scale(self, text_config: Any) -> float:
        """Factor the family multiplies into the logits (1 for most)."""
        return 1.0

    def logit_softcap(self, text_config: Any) -> float | None:
        """tanh soft-cap of the final logits (Gemma 2 style), from the config field `softcap_field`;
        None for most families."""
        return (getattr(text_config, self.softcap_field, None) or None) if self.softcap_field else None

    def norm_eps(self, text_config: Any) -> float:
        eps = getattr(text_config, "rms_norm_eps", None) if self.norm_formula != "layer" else None
        eps = eps if eps is not None else getattr(text_config, "layer_norm_eps", None)
        if eps is None:
            raise ValueError(f"{self.model_type}: the text config has no rms_norm_eps / layer_norm_eps")
        return float(eps)

    def tied_head(self, config: PreTrainedConfig) -> bool:
        text = config.get_text_config()
        return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))

    def head_config(self, model_or_config: torch.nn.Module | PreTrainedConfig) -> HeadConfig:
        """The family's head, from its config: norm formula, eps, logit scale and soft-cap."""
        text = self.text_config(model_or_config)
        if self.norm_formula not in NORM_FORMULAS:
            raise ValueError(f"{self.model_type}: norm_formula {self.norm_formula!r} is not one of {NORM_FORMULAS}")
        if isinstance(model_or_config, torch.nn.Module):
            vocab, hidden = self.lm_head(model_or_config).weight.shape
        else:
            vocab, hidden = text.vocab_size, text.hidden_size
        return HeadConfig(hidden_size=int(hidden), vocab_size=int(vocab), norm_type=self.norm_formula,
                          norm_eps=self.norm_eps(text), logit_scale=float(self.logit_scale(text)),
                          logit_softcap=self.logit_softcap(text))

    def export_head(self, model: torch.nn.Module) -> TeacherHead:
        norm, head = self.final_norm(model), self.lm_head(model)
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"{self.model_type}: lm_head has a bias, which TeacherHead does not support")
        return TeacherHead(self.head_config(model), norm.weight, head.weight, getattr(norm, "bias", None))

    @torch.no_grad()
    def check_norm(self, config: PreTrainedConfig, head: TeacherHead, rtol: float = 1e-4) -> None:
        """The head's norm formula against the family's own final-norm module (built from `config` on the
        meta device, then given the head's weights): for backends that never load the model here."""
        norm = self.final_norm(self.meta_model(config)).to_empty(device="cpu").float()
        norm.weight.copy_(head.norm_weight.float())
        if getattr(norm, "bias", None) is not None:
            if head.norm_bias is None:
                raise HeadCheckError(f"{self.model_type}: the final norm has a bias but the exported head has none")
            norm.bias.copy_(head.norm_bias.float())
        x = torch.randn(4, head.hidden_size, generator=torch.Generator().manual_seed(0))
        rel = _rel(_float_head(head).final_norm(x), norm(x))
        if not rel <= rtol:
            raise HeadCheckError(f"{self.model_type}: the exported head's norm ({head.config.norm_type}) differs from "
                                 f"the family's {type(norm).__name__} by {rel:.3g} (relative); fix norm_formula in "
                                 f"the family adapter (genrecal_cache/families/, docs/families.md)")

    @torch.inference_mode()
    def check_head(self, model: torch.nn.Module, head: TeacherHead, inputs: dict[str, torch.Tensor],
                   positions: int = 16, rtol: float = 2e-2) -> None:
        """The exported `head` must reproduce the model's own forward on `inputs` (one batch, on the
        model's device): its final norm on the norm's real input, its logits on the last `positions`.

        A wrong norm formula, a missed logit scale or soft-cap, or the wrong tensors all show up
        here as a relative difference of order 1; float32 agrees to ~1e-6 and bf16 to ~1e-2."""
        norm = self.final_norm(model)
        seen: dict[str, torch.Tensor] = {}

        def hook(_module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.setdefault("x", args[0])
            seen.setdefault("y", out)

        handle = norm.register_forward_hook(hook)
        try:
            out = model(**inputs, use_cache=False, logits_to_keep=positions)
        finally:
            handle.remove()
        if "x" not in seen:
            raise HeadCheckError(f"{self.model_type}: the final norm {type(norm).__name__} did not run in the "
                                 f"model's forward; the adapter points at the wrong module")
        x, y = seen["x"], seen["y"]
        n = out.logits.shape[1]
        where = (f"{self.model_type}: the exported teacher head does not reproduce the teacher's own forward "
                 f"(head config {head.config})")
        fix = ("fix the family adapter (genrecal_cache/families/, see docs/families.md): its norm_formula, "
               "logit_scale/logit_softcap or head tensors")
        rel = _rel(head.final_norm(x), y)
        if not rel <= rtol:
            raise HeadCheckError(f"{where}: final norm differs by {rel:.3g} (relative); {fix}")
        rel = _rel(head.logits(y[:, -n:].to(head.lm_head_weight.dtype)), out.logits)
        if not rel <= rtol:
            raise HeadCheckError(f"{where}: logits differ by {rel:.3g} (relative); {fix}")

    @torch.no_grad()
    def check_head_logprobs(self, head: TeacherHead, states: list[torch.Tensor], ids: list[torch.Tensor],
                            logprobs: list[torch.Tensor], atol: float) -> float:
        """The exported `head` on post-norm `states` against an engine's own log-probabilities.

        Per sample: `states[i]` [P, d] are the states of P positions, `ids[i]` / `logprobs[i]` [P, m]
        the token ids and log-probabilities the engine returned for them (its top-m). Returns the
        largest |difference| in nats; above `atol` it raises `HeadCheckError`: a missed logit scale or
        soft-cap, a wrong norm formula or wrong tensors, which would make every cached top-k wrong."""
        if sum(h.shape[0] for h in states) == 0:
            raise HeadCheckError(f"{self.model_type}: no position to check the exported head on")
        worst, where = 0.0, (0, 0)
        for i, (h, t, lp) in enumerate(zip(states, ids, logprobs, strict=True)):
            if h.shape[0] == 0:
                continue
            ours = torch.log_softmax(head.logits(h.to(head.lm_head_weight.dtype)).float(), dim=-1)
            diff = (ours.gather(1, t.to(ours.device).long()) - lp.to(ours.device).float()).abs().amax(dim=1)
            diff = diff.nan_to_num(nan=float("inf"))  # a NaN anywhere fails the check
            p = int(diff.argmax())
            if float(diff[p]) > worst:
                worst, where = float(diff[p]), (i, p)
        if worst > atol:
            raise HeadCheckError(
                f"{self.model_type}: the exported teacher head does not reproduce vLLM's own log-probabilities "
                f"on the checked sample(s): they differ by up to {worst:.3g} nats (sample {where[0]}, checked "
                f"position {where[1]}; tolerance {atol:g}); head config {head.config}. Nothing was cached. Fix the "
                f"family adapter (genrecal_cache/families/, docs/families.md): its norm_formula, logit_scale/"
                f"logit_softcap or head tensors; or the checkpoint's config sets a logit scale or soft-cap that "
                f"vLLM applies and the adapter does not declare")
        return worst

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
        # the model's own placeholder typed as text would claim image features no image provides
        literal = [t for t in {placeholder, getattr(processor, "video_token", None)} if t and t != IMAGE_MARKER]
        for m in sample.messages:
            if m["role"] == "assistant" and (IMAGE_MARKER in m["content"] or placeholder in m["content"]):
                raise EncodeError(f"{where}: an assistant answer contains an image placeholder; images can "
                                  f"only be in user turns")
            if found := next((t for t in literal if t in m["content"]), None):
                raise EncodeError(f"{where}: a {m['role']} turn contains the literal text {found!r}, the model's "
                                  f"own image placeholder; mark images with '{IMAGE_MARKER}' and remove {found!r}")
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
        self.check_answer_mask(processor, input_ids, answer_mask, [full[a:b] for a, b in spans], where)
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

    def check_answer_mask(self, processor: Any, input_ids: torch.Tensor, mask: torch.Tensor, answers: list[str],
                          where: str) -> None:
        """Each run of masked tokens must decode to its answer text (whitespace aside). Raises
        `AnswerMaskError`: a mismatch means the adapter misreads the processor, for every sample."""
        runs = answer_spans(mask)
        decoded = [processor.tokenizer.decode(input_ids[a:b].tolist(), skip_special_tokens=False) for a, b in runs]
        squeeze = lambda t: "".join(t.split())  # noqa: E731 - tokenizers may move or drop whitespace
        if len(runs) != len(answers) or any(squeeze(d) != squeeze(t) for d, t in zip(decoded, answers)):
            got = next(((d, t) for d, t in zip(decoded, answers) if squeeze(d) != squeeze(t)), (decoded, answers))
            raise AnswerMaskError(
                f"{where}: the answer mask does not cover the answer text: {len(runs)} masked run(s) for "
                f"{len(answers)} answer(s); masked tokens decode to {got[0]!r:.80}, the answer is {got[1]!r:.80}. "
                f"The processor changes the text in a way the {self.model_type} adapter does not account for; "
                f"nothing was cached or trained from it. Fix the adapter (genrecal_cache/families/, "
                f"docs/families.md) or use another model")

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
            content = message["content"]
            return {"role": "assistant", "content": [{"type": "text", "text": content}] if self.typed_answers else content}
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
        if isinstance(content, list):  # typed answer parts: one text part
            content = content[0]["text"]
        if not content.strip():
            raise EncodeError(f"{where}: answer of turn {k} is empty; there is nothing to distil")
        # Templates may trim the answer (Llama 3's does): accept the content as rendered, nothing else.
        # Spaces a template writes between the generation prompt and the answer (SmolVLM's "Assistant:"
        # + " red") belong to the answer's first token in byte-level tokenizers: they join the span.
        gap = len(full) - start - len(full[start:].lstrip(" "))
        for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
            if candidate and full.startswith(candidate, start + gap):
                return start, start + gap + len(candidate)
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




def _float_head(head: TeacherHead) -> TeacherHead:
    """A float32 copy of the norm part of `head` (the lm_head stays out: it may be huge)."""
    bias = None if head.norm_bias is None else head.norm_bias.float()
    return TeacherHead(head.config, head.norm_weight.float(), torch.empty(head.vocab_size, head.hidden_size,
                                                                          device="meta"), bias)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    if got.shape != ref.shape:
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp(min=1e-12))


__all__ = ["HEAD_TENSOR_NAMES", "NORM_FORMULAS", "AnswerMaskError", "EncodeError", "Encoded", "FamilyAdapter",
           "HeadCheckError"]
