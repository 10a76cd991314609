"""No silent garbage: a wrong head or a wrong answer mask stops extraction before anything is cached."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig

from genrecal_cache import families
from genrecal_cache.families import collate
from genrecal_cache.data import Sample
from genrecal_cache.extract import ExtractConfig, extract
from genrecal_cache.families import AnswerMaskError, HeadCheckError, Qwen2VLAdapter, adapter_for
from genrecal_cache.format.head import TeacherHead


class GemmaNormQwen(Qwen2VLAdapter):  # what generic code got wrong for Gemma, the other way round
    norm_formula = "rms_1p"


class ScaledQwen(Qwen2VLAdapter):  # a logit scale the model does not apply (Cohere's, misread)
    def logit_scale(self, text_config) -> float:
        return 16.0


def _sample(sid: str = "s0") -> tuple[Sample, list[Image.Image]]:
    messages = [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                {"role": "assistant", "content": "red"}]
    return Sample(sid, messages, [b""], []), [Image.new("RGB", (56, 56), "red")]


def _inputs(loaded) -> dict[str, torch.Tensor]:
    s, images = _sample()
    return collate([loaded.adapter.encode(loaded.processor, s, images)], pad_id=0)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_head_check_passes_for_the_registered_adapters(role, request) -> None:
    loaded = request.getfixturevalue(role)
    loaded.adapter.check_head(loaded.model, loaded.adapter.export_head(loaded.model), _inputs(loaded))
    loaded.adapter.check_norm(loaded.model.config, loaded.adapter.export_head(loaded.model))


@pytest.mark.parametrize("wrong", [GemmaNormQwen, ScaledQwen])
def test_head_check_catches_a_wrong_norm_formula_or_logit_scale(teacher, wrong) -> None:
    adapter = wrong()
    head = adapter.export_head(teacher.model)
    with pytest.raises(HeadCheckError, match=r"qwen2_vl: the exported teacher head does not reproduce .* "
                                             r"(final norm|logits) differ.*fix the family adapter"):
        adapter.check_head(teacher.model, head, _inputs(teacher))


def test_norm_check_without_the_model_catches_a_wrong_formula(teacher) -> None:
    """The vLLM backend's check: the family's own norm module, built on the meta device."""
    head = Qwen2VLAdapter().export_head(teacher.model)
    wrong = TeacherHead(replace(head.config, norm_type="rms_1p"), head.norm_weight, head.lm_head_weight)
    with pytest.raises(HeadCheckError, match=r"norm \(rms_1p\) differs from the family's Qwen2VLRMSNorm"):
        Qwen2VLAdapter().check_norm(teacher.model.config, wrong)


def test_extraction_with_a_wrong_head_stops_before_caching(teacher_dir: Path, demo_jsonl: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(families.ADAPTERS, "qwen2_vl", GemmaNormQwen)
    out = tmp_path / "cache"
    with pytest.raises(HeadCheckError, match="final norm differs"):
        extract(ExtractConfig(teacher=str(teacher_dir), data=str(demo_jsonl), out=str(out), backend="transformers",
                              limit=4, progress=False))
    assert not (out / "manifest.json").exists()


def test_answer_mask_must_decode_to_the_answer(teacher) -> None:
    s, images = _sample("shifted")
    a = teacher.adapter
    enc = a.encode(teacher.processor, s, images)  # passes its own check
    a.check_answer_mask(teacher.processor, enc.input_ids, enc.answer_mask, ["red"], "here")
    shifted = torch.roll(enc.answer_mask, 1)  # what an unreported text insertion by a processor does
    with pytest.raises(AnswerMaskError, match=r"sample 'shifted' \(qwen2_vl\): the answer mask does not cover the "
                                              r"answer text.*decode to '<\|im_end\|>'.*Fix the adapter"):
        a.check_answer_mask(teacher.processor, enc.input_ids, shifted, ["red"], "sample 'shifted' (qwen2_vl)")
    with pytest.raises(AnswerMaskError, match="0 masked run"):
        a.check_answer_mask(teacher.processor, enc.input_ids, torch.zeros_like(shifted), ["red"], "here")


def test_unknown_family_is_refused_with_how_to_add_one() -> None:
    with pytest.raises(ValueError, match=r"unsupported model type 'llama'.*docs/families.md"):
        adapter_for(LlamaConfig())



def test_a_refused_family_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(families.REFUSED, "llama", "it is a text-only model")
    with pytest.raises(ValueError, match=r"model type 'llama' is not supported: it is a text-only model.*Supported"):
        adapter_for(LlamaConfig())


def test_check_head_logprobs_tolerance_and_nan(teacher) -> None:
    """The comparison behind the vLLM backend's head check: the head's log-probabilities at the engine's
    ids must be within `atol`; a scale the engine did not apply, or a NaN, is a `HeadCheckError`."""
    head = teacher.adapter.export_head(teacher.model)
    states = [torch.randn(5, head.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def engine(h: TeacherHead, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = torch.log_softmax(h.logits(x).float(), -1).topk(8, -1)
        return i, v

    ids, lps = zip(*(engine(head, h) for h in states))
    worst = teacher.adapter.check_head_logprobs(head, states, list(ids), list(lps), atol=1e-3)
    assert worst < 1e-5
    scaled = TeacherHead(replace(head.config, logit_scale=4.0), head.norm_weight, head.lm_head_weight)
    with pytest.raises(HeadCheckError, match=r"qwen2_vl: .*does not reproduce vLLM's own log-probabilities.*"
                                             r"sample \d, checked position \d.*Nothing was cached"):
        teacher.adapter.check_head_logprobs(scaled, states, list(ids), list(lps), atol=1e-3)
    nan = [lps[0], torch.full_like(lps[1], float("nan"))]
    with pytest.raises(HeadCheckError, match=r"differ by up to inf nats \(sample 1"):
        teacher.adapter.check_head_logprobs(head, states, list(ids), nan, atol=1e-3)
    with pytest.raises(HeadCheckError, match="no position"):
        teacher.adapter.check_head_logprobs(head, [s[:0] for s in states], [i[:0] for i in ids],
                                            [v[:0] for v in lps], atol=1e-3)
