"""The family matrix: every registered family as a teacher and as a student, on tiny random models built
offline with transformers' own classes, over images of different sizes in one batch.

Teacher: the stock CLI extracts a cache (its head check runs first); every cached state equals an
independent transformers forward of that sample alone (no batch, no padding), the cached top-k equals
the top-k of the model's *own* logits (its lm_head, norm, scale and soft-cap), and every answer mask
decodes to the answer. Student: the stock CLI (`genrecal-train`) runs stages 1-3 a few steps on a cache
of the Qwen2-VL teacher; the saved student loads with AutoModelForImageTextToText and generates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache.data import decode_image, read_samples
from genrecal_cache.families import ADAPTERS, adapter_for
from genrecal_cache import open_cache
from genrecal_cache.testing import FAMILY_BUILDERS, build_tiny_family, write_mixed_size_dataset

REPO = Path(__file__).resolve().parents[1]
FAMILIES = sorted(FAMILY_BUILDERS)
N_SAMPLES = 8
MULTI_TURN = "demo-000004"  # the two-turn conversation of the mixed data
# Samples a family cannot express, with the error it must give (as a teacher: an error row; as a
# student: skipped with that warning). Everything else must be cached and trained.
CANNOT_EXPRESS = {"paligemma": {MULTI_TURN: "PaliGemma is single-turn"}}


@pytest.fixture(scope="session")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def _family_dir(root: Path, family: str) -> Path:
    path = root / family
    if not (path / "config.json").is_file():
        build_tiny_family(family, path, seed=3)
    return path


@pytest.fixture(scope="session")
def mixed_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 demo questions (every type: two images, two turns) with images of 7 sizes and aspect ratios."""
    return write_mixed_size_dataset(tmp_path_factory.mktemp("mixed"), n=N_SAMPLES, seed=0)


@pytest.fixture(scope="session")
def mixed_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, mixed_jsonl: Path) -> Path:
    """The tiny Qwen2-VL teacher's cache of the mixed-size data: what every student trains on."""
    from genrecal_cache.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("mixed_cache") / "cache"
    extract(ExtractConfig(teacher=str(teacher_dir), data=str(mixed_jsonl), out=str(out), backend="transformers",
                          hidden_codec="fp32", batch_tokens=1 << 16, progress=False, context="full", topk_rows="all"))
    return out


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_every_registered_family_has_a_tiny_model_in_the_matrix() -> None:
    assert set(ADAPTERS) - {"idefics3"} == set(FAMILY_BUILDERS)  # Idefics3 is SmolVLM's adapter and model code


@pytest.mark.parametrize("family", FAMILIES)
def test_family_as_teacher_cache_equals_its_own_forward(family: str, family_root: Path, mixed_jsonl: Path,
                                                         tmp_path: Path) -> None:
    path = _family_dir(family_root, family)
    out = tmp_path / "cache"
    # all 8 samples in one padded batch: images of different sizes side by side
    cmd = [sys.executable, "-m", "cli.cache_cli", "extract", "--teacher", str(path), "--data", str(mixed_jsonl),
           "--out", str(out), "--backend", "transformers", "--hidden-codec", "fp32", "--topk", "8",
           "--batch-tokens", "100000", "--context", "full", "--topk-rows", "all"]  # every row, to compare
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    cache = open_cache(out)
    assert cache.manifest.teacher["model_type"] == family
    adapter = adapter_for(path)
    processor, model = adapter.load_processor(path), adapter.load_model(path)
    samples = list(read_samples(mixed_jsonl))
    assert len(cache) == len(samples) == N_SAMPLES
    sizes = {img.size for s in samples for img in map(decode_image, s.images)}
    assert len(sizes) >= 4  # the batch really mixed image sizes
    expected_errors = CANNOT_EXPRESS.get(family, {})
    for i, s in enumerate(samples):
        c = cache[i]
        if s.id in expected_errors:
            assert c.status == "error" and expected_errors[s.id] in c.error
            continue
        assert c.status == "ok", c.error
        enc = adapter.encode(processor, s, [decode_image(b) for b in s.images])
        assert np.array_equal(c.token_ids, enc.input_ids.numpy()) and np.array_equal(c.answer_mask, enc.answer_mask)
        answers = [m["content"] for m in s.messages if m["role"] == "assistant"]
        runs = [processor.tokenizer.decode(c.token_ids[a:b]) for a, b in _runs(c.answer_mask)]
        assert ["".join(r.split()) for r in runs] == ["".join(a.split()) for a in answers]
        with torch.no_grad():
            out_ = model(input_ids=enc.input_ids[None], **enc.model_inputs, use_cache=False)
            h = model.model(input_ids=enc.input_ids[None], **enc.model_inputs, use_cache=False).last_hidden_state[0]
        torch.testing.assert_close(torch.from_numpy(c.hidden), h, atol=2e-5, rtol=1e-4)
        ref = torch.log_softmax(out_.logits[0].float(), -1).topk(8, -1)
        torch.testing.assert_close(torch.from_numpy(c.topk_logprobs), ref.values, atol=1e-4, rtol=1e-4)
        same = (torch.from_numpy(c.topk_ids.astype(np.int64)) == ref.indices).float().mean()
        assert same > 0.95  # ids may swap only at exact ties of a random model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_as_student_trains_three_stages_and_generates(family: str, family_root: Path, mixed_cache: Path,
                                                             mixed_jsonl: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    path = _family_dir(family_root, family)
    # the stock CLI, as a user runs it (`genrecal-train`)
    cmd = [sys.executable, "-m", "cli.train_cli", "--cache", str(mixed_cache), "--student", str(path),
           "--out", str(tmp_path / "run"), "--device", "cpu", "--stages", "1,2,3", "--max-steps", "2",
           "--batch-size", "4", "--prefetch", "2", "--checkpoint-every", "1000", "--lr", "1e-3"]
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    final = run.stdout.strip().splitlines()[-1].removeprefix("final student: ")
    assert Path(final).is_dir(), run.stdout[-1000:]
    skipped = [line for line in run.stderr.splitlines() if "skipping cached sample" in line]
    expected = CANNOT_EXPRESS.get(family, {})
    # every sample encodes for every student, images of any size (but what the family cannot express)
    assert all(any(f"({sid!r})" in w and why in w for sid, why in expected.items()) for w in skipped), skipped
    assert all(any(f"({sid!r})" in w for w in skipped) for sid in expected), run.stderr[-3000:]
    stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert stages == [1, 1, 2, 2, 3, 3]
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    adapter = adapter_for(final)
    assert type(model).__name__ == adapter.model_class_name
    processor = adapter.load_processor(final)
    sample = next(s for s in read_samples(mixed_jsonl) if len(s.images) == 1 and len(s.messages) == 2)
    inputs, _ = adapter.prompt_inputs(processor, sample, [decode_image(b) for b in sample.images])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # stage 2 trained the language model; the vision encoder stayed frozen
    orig = adapter.load_model(path).state_dict()
    new = model.state_dict()
    frozen = tuple(adapter.vision_parameter_prefixes(model))
    vision = [k for k in orig if k.startswith(frozen)]
    assert vision and all(torch.equal(orig[k], new[k]) for k in vision)
    assert not torch.equal(orig[_lm_head_key(orig)], new[_lm_head_key(orig)])


def _lm_head_key(state: dict) -> str:
    return "lm_head.weight" if "lm_head.weight" in state else "model.language_model.embed_tokens.weight"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    m = np.concatenate([[False], np.asarray(mask, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
