"""Teacher states in the cache's own precision (issues 24 and 21): `iter_samples(precision="stored")` hands a bf16
cache's `hidden` over as bf16 bits (no float32 widening on the CPU) and low-rank context rows as their coefficients
(no GEMM on the CPU); the trainer widens and reconstructs on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache import open_cache
from genrecal_cache.extract import ExtractConfig, extract
from genrecal_cache.families import adapter_for
from genrecal_cache.format.head import HeadConfig, TeacherHead
from genrecal_cache.format.roles import FLAG_COMPACT, Storage
from genrecal_cache.reader import TeacherCache
from genrecal_cache.writer import CacheWriter, SampleArrays, SampleRecord
from genrecal_train.config import TrainConfig
from genrecal_train.batches import CacheStream, collate, make_example
from genrecal_train.model import GenRecal


@pytest.fixture(scope="module", params=["full", "lowrank"])
def bf16_cache(request, teacher_dir: Path, demo_jsonl: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"bf16-{request.param}") / "cache"
    extract(ExtractConfig(teacher=str(teacher_dir), data=str(demo_jsonl), out=str(out), backend="transformers",
                          hidden_codec="bf16", progress=False, context=request.param, context_fit_rows=256))
    return out


def test_stored_precision_is_the_stored_bits_and_lowrank_rows_coefficients(bf16_cache: Path):
    """Stored precision hands over exactly what the float32 read decodes, before decoding: the bf16 bits of the
    exact rows, and the coefficients of the low-rank rows (their `hidden` zero), which the basis turns into the
    float32 read's rows bit for bit (the reader's own reconstruction) and to float32 rounding on a device."""
    with open_cache(bf16_cache) as c:
        wide = {s.index: s.hidden.copy() for s in c.iter_samples()}
        assert all(s.context is None for s in c.iter_samples())  # float32: reconstructed into `hidden`
        n = 0
        for s in c.iter_samples(precision="stored"):
            assert s.hidden.dtype == np.uint16
            t = s.hidden_tensor()
            assert t.dtype == torch.bfloat16 and t.data_ptr() == s.hidden.ctypes.data  # a view, not a copy
            compact = (s.row_flags & FLAG_COMPACT) > 0
            ref = wide[s.index]
            np.testing.assert_array_equal(t[~compact].float().numpy(), ref[~compact])  # exact rows: the same values
            assert compact.any() == (c.manifest.roles.context == "lowrank") == (s.context is not None)
            if s.context is not None:
                assert s.context_basis is c.context_basis() and s.context.shape == (len(ref), c.manifest.roles.rank)
                assert not s.hidden[compact].any() and not s.context[~compact].any()
                on_device = s.context_basis.decode_tensor(torch.from_numpy(s.context[compact]))  # as the trainer does
                np.testing.assert_allclose(on_device.numpy(), ref[compact], rtol=1e-5, atol=1e-6)
            n += 1
        assert n == len(wide)
        for piece in c.plan():  # a whole read group: its coefficients rebuild the float32 read bit for bit
            lo, group, _ = c.read_group(piece)
            _, stored, _ = c.read_group(piece, precision="stored")
            rebuilt = torch.from_numpy(stored["hidden"]).view(torch.bfloat16).float().numpy()
            if "context" in stored:
                c.context_basis().decode_into(rebuilt, stored["context"], (stored["row_flags"] & FLAG_COMPACT) > 0)
            np.testing.assert_array_equal(rebuilt, group["hidden"])


@torch.no_grad()
def test_forward_on_stored_precision_equals_the_float32_read(bf16_cache: Path, student_dir: Path):
    """The model widens bf16 teacher states itself and reconstructs low-rank rows from their coefficients: the
    losses are those of the float32 read, bit for bit with full storage, to float32 rounding with low-rank rows
    (another GEMM); the stream pins them when asked (for a GPU)."""
    cache, adapter = open_cache(bf16_cache), adapter_for(student_dir)
    lowrank = cache.manifest.roles.context == "lowrank"
    processor = adapter.load_processor(student_dir)
    tok = cache.teacher_tokenizer()
    cfg = TrainConfig(cache=str(bf16_cache), student=str(student_dir), out="unused", w_uld=1.0)  # stage 3: ULD too
    torch.manual_seed(0)
    model = GenRecal(adapter.load_model(student_dir), adapter, cache.head(), cfg).eval()
    pad = processor.tokenizer.pad_token_id
    out, rows = {}, {}
    for precision in ("float32", "stored"):
        examples = [make_example(s, adapter, processor, 2048, tok) for s in cache.iter_samples(precision=precision)][:4]
        assert examples[0].teacher_hidden.dtype == (torch.bfloat16 if precision == "stored" else torch.float32)
        assert all((e.teacher_lowrank is not None) == (lowrank and precision == "stored") for e in examples)
        rows[precision] = collate(examples, pad, 0).rows
        out[precision] = {st: model(collate(examples, pad, 0), st) for st in (1, 2, 3)}
    # the batch carries the low-rank rows of z_ql as coefficients; rebuilt, they are the float32 read's rows
    assert (sum(lr.question.numel() for lr in rows["stored"].lowrank) > 0) == lowrank
    cpu = torch.device("cpu")
    for which in ("answer", "question"):
        ref = rows["float32"].teacher_states(which, cpu)
        assert torch.equal(ref, getattr(rows["float32"], f"teacher_{which}"))  # float32: nothing to rebuild
        torch.testing.assert_close(rows["stored"].teacher_states(which, cpu), ref, rtol=1e-5, atol=1e-6, msg=which)
    assert out["float32"][3]["l_uld"] > 0
    for st in (1, 2, 3):
        for k, v in out["float32"][st].items():
            if lowrank:
                torch.testing.assert_close(out["stored"][st][k], v, rtol=1e-5, atol=1e-6, msg=f"{st} {k}")
            else:
                assert torch.equal(v, out["stored"][st][k]), (st, k)
    if torch.cuda.is_available():
        stream = CacheStream(cache, adapter, processor, batch_size=2, max_len=2048, prefetch=1, teacher_tokenizer=tok,
                             precision="stored", pin_memory=True)
        try:
            rows = next(stream.batches()).rows
            assert rows.teacher_answer.dtype == torch.bfloat16
            assert rows.teacher_answer.is_pinned() and rows.teacher_question.is_pinned()
            assert all(lr.question_coefficients.is_pinned() for lr in rows.lowrank)
        finally:
            stream.close()


@pytest.fixture(scope="module", params=["bf16", "fp8", "ecq"])
def lowrank_cache(request, tmp_path_factory) -> Path:
    """A low-rank cache of each answer codec written straight by CacheWriter (small shards: many read groups)."""
    d, k, vocab = 64, 4, 50
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    head = TeacherHead(HeadConfig(d, vocab), torch.ones(d), torch.randn(vocab, d, generator=g) * 0.2)
    out = tmp_path_factory.mktemp(f"lowrank-{request.param}") / "cache"
    w = CacheWriter(out, hidden_size=d, vocab_size=vocab, topk=k, hidden_codec=request.param, head=head,
                    teacher=dict(id="synthetic", revision=None, config_sha256="-", model_type="synthetic"),
                    tokenizer_sha256="-", chat_template_sha256=None, command="pytest", shard_tokens=256,
                    chunk_tokens=64, storage=Storage(context="lowrank", rank=8, topk_rows="answer"), basis_fit_rows=200)
    for i in range(40):
        L = int(rng.integers(2, 70))
        hidden = rng.standard_normal((L, d)).astype(np.float32) * 2
        mask = np.arange(L) >= L - max(1, L // 5)
        ids, lps = head.topk_logprobs(torch.from_numpy(hidden), k)
        w.add(SampleRecord(id=f"s{i}", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
              SampleArrays(rng.integers(0, vocab, L), mask, hidden, ids, lps))
    w.close()
    return out


def _groups(cache, precision: str) -> list[dict[str, np.ndarray]]:
    return [cache.read_group(piece, precision=precision)[1] for piece in cache.plan(status="all")]


def test_stored_and_float32_reads_are_the_same_through_zarr_and_the_direct_reader(lowrank_cache: Path, monkeypatch):
    """Every codec: the direct shard reader (fastread.py) and zarr give the same arrays bit for bit in both
    precisions, and the stored read's coefficients, reconstructed as the reader does it, give the float32 read."""
    with open_cache(lowrank_cache) as c:
        assert c._fast_readers(c._features()) is not None and c.manifest.roles.context == "lowrank"
        fast = {p: _groups(c, p) for p in ("float32", "stored")}
        monkeypatch.setattr(TeacherCache, "_fast_readers", lambda self, feats: None)  # zarr decodes everything
        slow = {p: _groups(c, p) for p in ("float32", "stored")}
        assert len(fast["stored"]) > 3
        for p in fast:
            for a, b in zip(fast[p], slow[p]):
                assert a.keys() == b.keys() and ("context" in a) == (p == "stored")
                for name in a:
                    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), (p, name)
        for wide, stored in zip(fast["float32"], fast["stored"]):
            compact = (stored["row_flags"] & FLAG_COMPACT) > 0
            assert compact.any() and not stored["hidden"][compact].any()
            rebuilt = c.hidden_codec.to_float32(stored["hidden"]) if stored["hidden"].dtype != np.float32 \
                else stored["hidden"].copy()
            c.context_basis().decode_into(rebuilt, stored["context"], compact)
            np.testing.assert_array_equal(rebuilt, wide["hidden"])
