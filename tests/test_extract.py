"""Issue 2 acceptance: the reference extractor stores exactly what an independent HF forward gives,
bad inputs become error rows without losing the good ones, and the CLI reports/verifies it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache.data import decode_image, read_samples
from genrecal_cache.extract import ExtractConfig, extract
from genrecal_cache import open_cache
from genrecal_cache.reader import TeacherCache
from genrecal_cache.verify import verify

REPO = Path(__file__).resolve().parents[1]


def _extract(teacher_dir: Path, data: Path, out: Path, **kw) -> TeacherCache:
    cfg = ExtractConfig(teacher=str(teacher_dir), data=str(data), out=str(out), backend="transformers",
                        progress=False, **{"hidden_codec": "float32", "batch_tokens": 512, "context": "full",
                                           "topk_rows": "all", **kw})
    extract(cfg)
    return open_cache(out)


@pytest.fixture(scope="module")
def fp32_cache(teacher_dir: Path, demo_jsonl: Path, tmp_path_factory) -> TeacherCache:
    return _extract(teacher_dir, demo_jsonl, tmp_path_factory.mktemp("x") / "cache")


def test_cached_states_logits_topk_match_an_independent_hf_forward(fp32_cache, teacher, demo_jsonl):
    samples = {s.id: s for s in read_samples(demo_jsonl)}
    assert len(fp32_cache) == len(samples) and fp32_cache.manifest.counts["error"] == 0
    model, adapter, processor = teacher.model, teacher.adapter, teacher.processor
    lm_head = adapter.lm_head(model)
    for i in range(len(fp32_cache)):
        c = fp32_cache[i]
        s = samples[c.id]
        enc = adapter.encode(processor, s, [decode_image(b) for b in s.images])
        with torch.no_grad():  # one sample, no padding: independent of the extractor's batching
            inputs = {"input_ids": enc.input_ids[None], **enc.model_inputs}
            out = model(**inputs, output_hidden_states=True, use_cache=False)
        ref_h = out.hidden_states[-1][0]
        np.testing.assert_array_equal(c.token_ids, enc.input_ids.numpy())
        np.testing.assert_array_equal(c.answer_mask, enc.answer_mask.numpy())
        assert np.abs(c.hidden - ref_h.numpy()).max() <= 1e-5, c.id
        # logits recomputed from the cache (cached head on cached states) equal HF's logits
        logits = fp32_cache.teacher_logits(i)
        assert torch.allclose(logits, out.logits[0], atol=1e-4), c.id
        assert torch.allclose(lm_head(torch.from_numpy(c.hidden)), out.logits[0], atol=1e-4)
        k = fp32_cache.manifest.topk
        vals, ids = torch.log_softmax(out.logits[0].float(), -1).topk(k + 1, -1)
        # a rank is tied when its value is within 1e-5 of a neighbour (the order there is arbitrary)
        gap = (vals[:, :-1] - vals[:, 1:]) > 1e-5  # gap[j]: rank j is clearly above rank j+1
        untied = gap[:, :k] & torch.cat([torch.ones_like(gap[:, :1]), gap[:, : k - 1]], 1)
        same = torch.from_numpy(c.topk_ids).long() == ids[:, :k]
        assert bool(same[untied].all()), c.id
        assert float(untied.float().mean()) > 0.5  # the check is not vacuous
        vals = vals[:, :k]
        np.testing.assert_allclose(c.topk_logprobs, vals.numpy(), atol=1e-4)


def test_answer_mask_decodes_to_exactly_the_answers(fp32_cache, teacher):
    tok = teacher.processor.tokenizer
    seen_multi = False
    for i in range(len(fp32_cache)):
        c = fp32_cache[i]
        answers = [m["content"] for m in c.messages if m["role"] == "assistant"]
        m = c.answer_mask.astype(np.int8)
        starts = np.flatnonzero(np.diff(np.concatenate([[0], m])) == 1)
        ends = np.flatnonzero(np.diff(np.concatenate([m, [0]])) == -1) + 1
        decoded = [tok.decode(c.token_ids[a:b].tolist()) for a, b in zip(starts, ends)]
        assert decoded == answers, c.id
        seen_multi |= len(answers) > 1
    assert seen_multi, "the demo data must include multi-turn samples"


def test_bf16_cache_is_within_documented_tolerance(teacher_dir, demo_jsonl, fp32_cache, tmp_path):
    bf = _extract(teacher_dir, demo_jsonl, tmp_path / "bf16", hidden_codec="bfloat16", limit=6)
    for i in range(len(bf)):
        exact = fp32_cache.by_id(bf[i].id).hidden
        # bf16 keeps 8 mantissa bits: relative error <= 2^-8 per element (docs/cache-format.md)
        assert np.all(np.abs(bf[i].hidden - exact) <= np.abs(exact) * 2.0 ** -8 + 1e-30)
        np.testing.assert_array_equal(bf[i].topk_ids, fp32_cache.by_id(bf[i].id).topk_ids)


def _bad_dataset(src: Path, out: Path) -> Path:
    """The demo set plus a missing image, a corrupt image, an empty answer and an over-long sample."""
    shutil.copytree(src.parent, out)
    good = [json.loads(line) for line in (out / src.name).read_text().splitlines()]
    (out / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    q = lambda text, ans: [{"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": ans}]  # noqa: E731
    img = good[0]["image"]
    bad = [
        {"id": "bad-missing", "image": "images/nope.png", "conversations": q("Which colour?", "red")},
        {"id": "bad-corrupt", "image": "images/corrupt.png", "conversations": q("Which colour?", "red")},
        {"id": "bad-empty", "image": img, "conversations": q("Which colour?", "")},
        {"id": "bad-long", "image": img, "conversations": q("Which colour? " * 200, "red")},
    ]
    rows = good[:3] + bad[:2] + good[3:6] + bad[2:] + good[6:8]
    path = out / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_inputs_become_error_rows_and_good_ones_all_stay(teacher_dir, demo_jsonl, tmp_path):
    data = _bad_dataset(demo_jsonl, tmp_path / "data")
    cache = _extract(teacher_dir, data, tmp_path / "cache", max_len=256)
    rows = {r["id"]: r for r in cache.index.to_pylist()}
    assert len(rows) == 12
    expected = {"bad-missing": "nope.png", "bad-corrupt": "corrupt.png", "bad-empty": "empty",
                "bad-long": "max_len=256"}
    for sid, words in expected.items():
        assert rows[sid]["status"] == "error" and words in rows[sid]["error"], rows[sid]["error"]
    ok = [sid for sid, r in rows.items() if r["status"] == "ok"]
    assert len(ok) == 8 and all(sid.startswith("demo-") for sid in ok)
    assert cache.manifest.counts["ok"] == 8 and cache.manifest.counts["error"] == 4
    assert verify(tmp_path / "cache") == []

    cli = [sys.executable, "-m", "cli.cache_cli"]
    info = subprocess.run([*cli, "info", str(tmp_path / "cache")], capture_output=True, text=True, cwd=REPO)
    assert info.returncode == 0, info.stderr
    assert "12 (8 ok, 4 error)" in info.stdout and "bad-corrupt" in info.stdout
    assert "bytes/token" in info.stdout
    js = json.loads(subprocess.run([*cli, "info", "--json", str(tmp_path / "cache")], capture_output=True,
                                   text=True, cwd=REPO, check=True).stdout)
    assert js["counts"]["error"] == 4 and js["arrays"]["hidden"]["bytes_per_token"] > 0


def test_verify_cli_exit_codes(fp32_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(fp32_cache.url, cache)
    cli = [sys.executable, "-m", "cli.cache_cli", "verify", str(cache)]
    assert subprocess.run(cli, capture_output=True, cwd=REPO).returncode == 0
    shard = next(p for p in (cache / "features.zarr" / "hidden").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = subprocess.run(cli, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr and shard.name in r.stderr
