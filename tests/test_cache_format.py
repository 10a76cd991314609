"""Cache format: writer -> reader round trips, iteration, verify, and reading over real HTTP.

Synthetic features (random numbers, a random TeacherHead): no model is needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import _http
from genrecal_cache.format import safety
from genrecal_cache.format.head import HeadConfig, TeacherHead
from genrecal_cache.format.manifest import CacheFormatError, Manifest, layout_limit, sha256_bytes
from genrecal_cache import open_cache
from genrecal_cache.format.layout import plan_layout
from genrecal_cache.writer import CacheWriteError, CacheWriter, SampleArrays, SampleRecord
from genrecal_cache.verify import verify

D, V, K = 32, 300, 4
TEACHER = dict(id="tiny/teacher", revision="abc123", config_sha256=sha256_bytes(b"{}"), model_type="qwen2_vl",
               backend="synthetic")  # extra provenance keys are kept


def synthetic_head(seed: int = 0, scale: float = 0.2) -> TeacherHead:
    """The tests' stand-in teacher head (layer norm, D x V), random but seeded: what a synthetic cache stores."""
    g = torch.Generator().manual_seed(seed)
    return TeacherHead(HeadConfig(D, V), 1 + 0.1 * torch.randn(D, generator=g), torch.randn(V, D, generator=g) * scale)


@pytest.fixture(scope="module")
def head() -> TeacherHead:
    g = torch.Generator().manual_seed(0)
    return TeacherHead(HeadConfig(D, V, norm_type="rms", norm_eps=1e-6),
                       1 + 0.1 * torch.randn(D, generator=g), torch.randn(V, D, generator=g) * 0.2)


def make_samples(head: TeacherHead, n: int = 40, seed: int = 0) -> list[tuple[SampleRecord, SampleArrays | None]]:
    """n samples of 3..60 tokens; every 9th is an error row; answers are the tail, some with 2 spans."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"<image>question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        images = [bytes(rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8))]
        if i % 9 == 4:
            out.append((SampleRecord(id=f"q{i}", messages=msgs, images=images, image_refs=[f"img/{i}.png"],
                                     status="error", error="image file is truncated", extra={"qtype": "count"}), None))
            continue
        L = int(rng.integers(3, 60))
        hidden = torch.from_numpy(rng.standard_normal((L, D)).astype(np.float32) * 3)
        mask = np.zeros(L, dtype=bool)
        mask[L // 2:] = True
        if i % 5 == 0 and L > 6:
            mask[L // 2 + 1] = False  # two answer spans
        ids, lps = head.topk_logprobs(hidden, K)
        arrays = SampleArrays(token_ids=rng.integers(0, V, L).astype(np.int64), answer_mask=mask, hidden=hidden,
                              topk_ids=ids, topk_logprobs=lps)
        out.append((SampleRecord(id=f"q{i}", messages=msgs, images=images, image_refs=[f"img/{i}.png"],
                                 extra={"qtype": ["count", "color"][i % 2]}), arrays))
    return out


def write_cache(path: Path, head: TeacherHead, samples, hidden_dtype: str = "bfloat16",
                shard_tokens: int | None = None, chunk_tokens: int | None = None) -> Manifest:
    w = CacheWriter(path, hidden_size=D, vocab_size=V, topk=K, hidden_codec=hidden_dtype, teacher=TEACHER,
                    tokenizer_sha256=sha256_bytes(b"tok"), chat_template_sha256=sha256_bytes(b"tpl"), head=head,
                    command="pytest", shard_tokens=shard_tokens, chunk_tokens=chunk_tokens, queue_size=4)
    for row, arrays in samples:
        w.add(row, arrays)
    return w.close()


@pytest.fixture(scope="module")
def samples(head):
    return make_samples(head)


@pytest.fixture(scope="module")
def bf16_cache(tmp_path_factory, head, samples) -> Path:
    """Multi-shard bf16 cache: 64-token shards of 16-token chunks, so samples straddle shards."""
    path = tmp_path_factory.mktemp("bf16") / "cache"
    write_cache(path, head, samples, "bfloat16", shard_tokens=64, chunk_tokens=16)
    return path


def ok_ids(samples) -> list[str]:
    return [row.id for row, arrays in samples if arrays is not None]


def check_sample(got, row: SampleRecord, arrays: SampleArrays | None, hidden_dtype: str) -> None:
    assert (got.id, got.status, got.error) == (row.id, row.status, row.error)
    assert got.messages == row.messages and got.images == row.images and got.extra == row.extra
    if arrays is None:
        assert got.token_ids.shape == (0,) and got.hidden.shape == (0, D) and got.topk_ids.shape == (0, K)
        return
    np.testing.assert_array_equal(got.token_ids, np.asarray(arrays.token_ids))
    assert got.token_ids.dtype == np.int32 and got.answer_mask.dtype == np.bool_
    np.testing.assert_array_equal(got.answer_mask, arrays.answer_mask)
    np.testing.assert_array_equal(got.topk_ids, arrays.topk_ids.numpy())
    np.testing.assert_array_equal(got.topk_logprobs, arrays.topk_logprobs.numpy())
    want = arrays.hidden if hidden_dtype == "float32" else arrays.hidden.to(torch.bfloat16).float()
    assert got.hidden.dtype == np.float32
    # bit-exact: compare the raw bits, not values (catches -0.0 vs 0.0 and NaN payloads too)
    np.testing.assert_array_equal(got.hidden.view(np.uint32), want.numpy().view(np.uint32))


# ---- round trips ---------------------------------------------------------------------------------

def test_float32_round_trip_is_bit_exact(tmp_path, head, samples):
    m = write_cache(tmp_path / "c", head, samples, "float32")
    cache = open_cache(tmp_path / "c")
    assert len(cache) == len(samples) == m.counts["samples"]
    assert m.counts["ok"] == len(ok_ids(samples)) and m.counts["error"] == len(samples) - m.counts["ok"]
    assert m.counts["tokens"] == sum(len(a.token_ids) for _, a in samples if a is not None)
    assert cache.manifest == m and m.arrays["hidden"]["dtype"] == "float32" and m.teacher == TEACHER
    for i, (row, arrays) in enumerate(samples):
        check_sample(cache[i], row, arrays, "float32")
    assert verify(tmp_path / "c") == []


def test_bf16_round_trip_matches_torch_cast(bf16_cache, samples):
    cache = open_cache(bf16_cache)
    assert cache.manifest.arrays["hidden"]["dtype"] == "bfloat16"
    for i, (row, arrays) in enumerate(samples):
        check_sample(cache[i], row, arrays, "bfloat16")
        assert cache.by_id(row.id).index == i
    with pytest.raises(KeyError, match="nope"):
        cache.by_id("nope")
    # file:// URLs and pickling (DataLoader workers) give the same samples
    for other in (open_cache(f"file://{bf16_cache}"), pickle.loads(pickle.dumps(cache))):
        assert len(other) == len(cache)
        np.testing.assert_array_equal(other[1].hidden, cache[1].hidden)
    with pytest.raises(IndexError):
        cache[len(samples)]


def test_bf16_tensor_input_keeps_its_bits(tmp_path, head):
    h = (torch.randn(7, D) * 5).to(torch.bfloat16)
    ids, lps = head.topk_logprobs(h.float(), K)
    arrays = SampleArrays(torch.arange(7), torch.ones(7, dtype=torch.bool), h, ids, lps)
    write_cache(tmp_path / "c", head, [(SampleRecord(id="a", messages=[]), arrays)])
    got = open_cache(tmp_path / "c")[0].hidden
    np.testing.assert_array_equal(got, h.float().numpy())


def test_multi_shard_layout(bf16_cache):
    cache = open_cache(bf16_cache)
    m = cache.manifest
    S, T = m.arrays["hidden"]["shard_tokens"], m.counts["tokens"]
    assert (S, m.arrays["hidden"]["chunk_tokens"]) == (64, 16)
    idx = cache.index
    off, n = idx.column("token_offset").to_numpy(), idx.column("num_tokens").to_numpy()
    straddling = [i for i in range(len(cache)) if n[i] and off[i] // S != (off[i] + n[i] - 1) // S]
    assert len(straddling) >= 3
    pieces = cache.plan("shuffled", seed=0)  # each read group = the samples starting in one shard
    assert len(pieces) == len({off[i] // S for p in pieces for i in p})
    assert all(len({off[i] // S for i in p}) == 1 for p in pieces)
    for name in ("token_ids", "hidden"):  # one file per shard, each with a checksum
        files = sorted((bf16_cache / "features.zarr" / name / "c").rglob("*"))
        assert len([f for f in files if f.is_file()]) == math.ceil(T / S)
    assert set(m.checksums) == {p.relative_to(bf16_cache).as_posix() for p in bf16_cache.rglob("*")
                                if p.is_file() and p.name != "manifest.json"}
    assert m.sizes == {rel: (bf16_cache / rel).stat().st_size for rel in m.checksums}  # each file's exact size
    rows = idx.to_pylist()
    assert rows[0]["answer_spans"] and all(e > s for r in rows for s, e in r["answer_spans"])
    assert all(r["num_tokens"] == 0 and r["token_offset"] == 0 for r in rows if r["status"] == "error")


def test_default_layout_targets_few_megabyte_chunks_and_large_shards():
    big = plan_layout(8192, 20, "bfloat16")
    assert (big.chunk_tokens["hidden"], big.shard_tokens) == (256, 8192)  # 4 MiB chunks, 128 MiB shards
    assert big.chunk_tokens["topk_ids"] == 8192  # small arrays: one chunk per shard
    mid = plan_layout(3584, 20, "float32")
    assert mid.chunk_tokens["hidden"] * 3584 * 4 <= 4 << 20 and mid.shard_tokens * 3584 * 4 <= 128 << 20
    assert plan_layout(64, 5, "float32", shard_tokens=100).chunk_tokens["hidden"] == 100
    with pytest.raises(ValueError, match="multiple"):
        plan_layout(64, 5, "float32", shard_tokens=100, chunk_tokens=30)


# ---- iteration -----------------------------------------------------------------------------------

def test_ordered_and_shuffled_cover_every_ok_sample_once(bf16_cache, samples):
    cache = open_cache(bf16_cache)
    ordered = [s.id for s in cache.iter_samples("ordered")]
    assert ordered == ok_ids(samples)
    shuffled = [s.id for s in cache.iter_samples("shuffled", seed=1)]
    assert sorted(shuffled) == sorted(ordered) and shuffled != ordered
    assert shuffled == [s.id for s in cache.iter_samples("shuffled", seed=1)]
    assert shuffled != [s.id for s in cache.iter_samples("shuffled", seed=2)]
    by_id = dict(zip([r.id for r, _ in samples], samples))
    for s in cache.iter_samples("shuffled", seed=3):  # group reads slice each sample correctly
        check_sample(s, *by_id[s.id], "bfloat16")
    errors = [s.id for s in cache.iter_samples(status="error")]
    assert errors == [r.id for r, a in samples if a is None]
    assert sorted(s.id for s in cache.iter_samples("shuffled", status="all")) == sorted(by_id)


@pytest.mark.parametrize("order", ["ordered", "shuffled"])
@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_rank_split_is_disjoint_covering_and_balanced(bf16_cache, samples, order, world_size):
    cache = open_cache(bf16_cache)
    parts = [[i for piece in cache.plan(order, seed=5, rank=r, world_size=world_size) for i in piece]
             for r in range(world_size)]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) and sorted(flat) == [i for i, (_, a) in enumerate(samples) if a is not None]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    got = [s.index for s in cache.iter_samples(order, seed=5, rank=1, world_size=world_size)]
    assert got == parts[1]
    assert [s.index for s in cache.iter_samples(order, seed=5, rank=1, world_size=world_size, start=2)] == got[2:]


def test_teacher_logits_is_lm_head_of_cached_hidden(bf16_cache, head):
    cache = open_cache(bf16_cache)
    s = cache[0]
    logits = cache.teacher_logits(0)
    assert logits.shape == (len(s.token_ids), V)
    torch.testing.assert_close(logits, torch.from_numpy(s.hidden) @ head.lm_head_weight.T, rtol=1e-5, atol=1e-5)
    loaded = cache.head()
    torch.testing.assert_close(loaded.lm_head_weight, head.lm_head_weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.norm_weight, head.norm_weight, rtol=0, atol=0)


# ---- verify and format errors --------------------------------------------------------------------

@pytest.fixture
def broken(tmp_path, bf16_cache) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(bf16_cache, path)
    return path


def test_verify_passes_on_a_fresh_cache(bf16_cache):
    assert verify(bf16_cache) == []


def test_verify_detects_a_flipped_byte(broken):
    shard = broken / "features.zarr" / "hidden" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    faults = verify(broken)
    assert len(faults) == 1 and faults[0].startswith("features.zarr/hidden/c/2/0: sha256 mismatch")
    assert "corrupt" in faults[0]


@pytest.mark.parametrize("sizes", [True, False], ids=["sizes", "older-cache-without-sizes"])
def test_verify_detects_a_truncated_parquet(broken, sizes):
    """The manifest's size is checked before the file is hashed; a cache written before sizes were
    recorded gets the sha256 check alone."""
    if not sizes:
        m = json.loads((broken / "manifest.json").read_text())
        del m["extra"]["sizes"]
        (broken / "manifest.json").write_text(json.dumps(m))
    p = broken / "samples.parquet"
    n = p.stat().st_size
    p.write_bytes(p.read_bytes()[:-100])
    faults = verify(broken)
    want = (f"samples.parquet: size mismatch (the file has {n - 100} bytes, the manifest lists {n})" if sizes
            else "samples.parquet: sha256 mismatch")
    assert [f for f in faults if f.startswith("samples.parquet: ") and "mismatch" in f] == [
        next(f for f in faults if f.startswith(want))]
    assert any(f.startswith("samples.parquet: unreadable") for f in faults)
    with pytest.raises(CacheFormatError, match="samples.parquet: unreadable"):
        open_cache(broken)


def test_verify_detects_deleted_and_stray_files(broken):
    (broken / "features.zarr" / "topk_ids" / "c" / "1" / "0").unlink()
    (broken / "features.zarr" / "hidden" / "c" / "99").mkdir()
    (broken / "features.zarr" / "hidden" / "c" / "99" / "0").write_bytes(b"x")
    faults = verify(broken)
    assert any(f.startswith("features.zarr/topk_ids/c/1/0: listed in the manifest but missing") for f in faults)
    assert any(f.startswith("features.zarr/hidden/c/99/0: stored but not listed") for f in faults)


def test_verify_detects_mask_span_disagreement(broken):
    # rewrite answer_mask shard 0 with one flipped token and re-checksum it: only the structure check can see it
    import zarr
    arr = zarr.open_array(broken / "features.zarr", path="answer_mask", mode="r+")
    S = arr.shards[0]
    block = arr[:S]
    block[5] = not block[5]
    arr[:S] = block
    m = json.loads((broken / "manifest.json").read_text())
    shard = broken / "features.zarr/answer_mask/c/0"
    m["checksums"]["features.zarr/answer_mask/c/0"] = sha256_bytes(shard.read_bytes())
    m["extra"]["sizes"]["features.zarr/answer_mask/c/0"] = shard.stat().st_size
    (broken / "manifest.json").write_text(json.dumps(m))
    faults = verify(broken)
    assert len(faults) == 1 and "answer_mask disagrees with samples.parquet answer_spans (first at token 5)" in faults[0]


def test_verify_reports_unreadable_shards_and_metadata(broken):
    shard = broken / "features.zarr" / "answer_mask" / "c" / "0"
    shard.write_bytes(b"\0" * len(shard.read_bytes()))  # fails its crc32c when read
    faults = verify(broken)
    assert faults[0].startswith("features.zarr/answer_mask/c/0: sha256 mismatch")
    assert faults[1].startswith("features.zarr/answer_mask/c/0: unreadable") and len(faults) == 2
    meta = broken / "features.zarr" / "topk_ids" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    faults = verify(broken)
    assert any(f.startswith("features.zarr/topk_ids/zarr.json: size mismatch") for f in faults)
    assert faults[-1].startswith("features.zarr/topk_ids/zarr.json: unreadable array metadata")


def test_missing_manifest_means_incomplete(broken):
    (broken / "manifest.json").unlink()
    with pytest.raises(CacheFormatError, match="incomplete"):
        open_cache(broken)
    assert "incomplete" in verify(broken)[0]
    with pytest.raises(CacheFormatError, match="does not exist"):
        open_cache(broken / "nowhere")


def test_wrong_version_and_missing_array_are_named(broken):
    m = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**m, "format_version": 4}))
    with pytest.raises(CacheFormatError, match=r"manifest.json: field 'format_version' is 4"):
        open_cache(broken)
    (broken / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(broken / "features.zarr" / "topk_logprobs")
    with pytest.raises(CacheFormatError, match=r"features.zarr/topk_logprobs: array missing"):
        open_cache(broken)


# the top-level keys genrecal releases before file sizes accept (they refuse any other): sizes live in `extra`
VERSION_2_KEYS = {"format_version", "created", "tool_version", "command", "teacher", "tokenizer_sha256",
                  "chat_template_sha256", "hidden_size", "vocab_size", "topk", "arrays", "counts", "checksums",
                  "hidden_codec", "extra"}


def test_file_sizes_stay_readable_by_older_genrecal(bf16_cache):
    raw = json.loads((bf16_cache / "manifest.json").read_text())
    assert set(raw) == VERSION_2_KEYS and raw["format_version"] == 2 and raw["extra"]["sizes"]
    del raw["extra"]["sizes"]  # and a cache written before sizes reads as one without them
    old = Manifest.from_json(json.dumps(raw))
    assert old.sizes == {} and safety.file_limit("samples.parquet", old) == layout_limit("samples.parquet", old)


@pytest.mark.parametrize("value,problem", [
    (-1, r"must be an integer number of bytes >= 0, got int -1"),
    (1.5, r"must be an integer number of bytes >= 0, got float 1.5"),
    ("1024", r"must be an integer number of bytes >= 0, got str '1024'"),
    (True, r"must be an integer number of bytes >= 0, got bool True"),
    (None, r"must be an integer number of bytes >= 0, got NoneType None"),
    (2 ** 70, r"is 1180591620717411303424 bytes, beyond the 1048576 bytes this cache's layout allows that file"),
    ((1 << 20) + 1, r"is 1048577 bytes, beyond the 1048576 bytes"),
])
def test_a_hostile_file_size_is_refused_by_the_manifest_parser(bf16_cache, value, problem):
    """A size is the bound every read of the file gets: a hostile one must not lift the layout's bound
    (here a zarr.json, at most 1 MiB) nor be anything but a count of bytes."""
    raw = json.loads((bf16_cache / "manifest.json").read_text())
    raw["extra"]["sizes"]["features.zarr/hidden/zarr.json"] = value
    with pytest.raises(CacheFormatError, match=r"^x/manifest.json: field 'extra.sizes.features.zarr/hidden/zarr.json' "
                       + problem + ".*re-download or re-extract the cache"):
        Manifest.from_json(json.dumps(raw), source="x/manifest.json")


def test_sizes_must_be_an_object_of_listed_files(bf16_cache):
    raw = json.loads((bf16_cache / "manifest.json").read_text())
    raw["extra"]["sizes"]["../../etc/passwd"] = 10
    with pytest.raises(CacheFormatError, match=r"field 'extra.sizes.../../etc/passwd' names a file that 'checksums' "
                                               r"does not list"):
        Manifest.from_json(json.dumps(raw))
    raw["extra"]["sizes"] = [1, 2]
    with pytest.raises(CacheFormatError, match=r"field 'extra.sizes' must be an object \(path -> bytes\), got list"):
        Manifest.from_json(json.dumps(raw))


def test_manifest_validation_is_strict(bf16_cache):
    text = (bf16_cache / "manifest.json").read_text()
    assert Manifest.from_json(text).to_json() == text
    bad = json.loads(text)
    del bad["teacher"]["config_sha256"]
    with pytest.raises(CacheFormatError, match=r"x/manifest.json: field 'teacher.config_sha256' is missing"):
        Manifest.from_json(json.dumps(bad), source="x/manifest.json")
    bad = json.loads(text)
    bad["hidden_size"] = "32"
    with pytest.raises(CacheFormatError, match=r"manifest.json: field 'hidden_size' must be an integer >= 0, got str"):
        Manifest.from_json(json.dumps(bad))
    bad = json.loads(text)
    bad["counts"]["tokenz"] = 1
    with pytest.raises(CacheFormatError, match=r"field 'counts.tokenz' is unknown"):
        Manifest.from_json(json.dumps(bad))
    bad = json.loads(text)
    bad["teacher"]["backend"] = "vllm"  # extra provenance in 'teacher' is kept
    assert Manifest.from_json(json.dumps(bad)).teacher["backend"] == "vllm"
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        Manifest.from_json(text[:50])


def test_writer_rejects_bad_samples_naming_them(tmp_path, head):
    w = CacheWriter(tmp_path / "c", hidden_size=D, vocab_size=V, topk=K, teacher=TEACHER, tokenizer_sha256="t",
                    chat_template_sha256=None, head=head, command="pytest")
    h = torch.randn(5, D)
    ids, lps = head.topk_logprobs(h, K)
    good = SampleArrays(np.arange(5), np.ones(5, bool), h, ids, lps)
    with pytest.raises(ValueError, match=r"sample 'x': hidden has shape \(4, 32\), expected \(5, 32\)"):
        w.add(SampleRecord(id="x", messages=[]), SampleArrays(np.arange(5), np.ones(5, bool), h[:4], ids, lps))
    with pytest.raises(ValueError, match=r"sample 'x': token_ids outside \[0, vocab_size=300\)"):
        w.add(SampleRecord(id="x", messages=[]), SampleArrays(np.arange(5) + 299, np.ones(5, bool), h, ids, lps))
    with pytest.raises(ValueError, match="NaN"):
        w.add(SampleRecord(id="x", messages=[]), SampleArrays(np.arange(5), np.ones(5, bool), h * np.nan, ids, lps))
    with pytest.raises(ValueError, match="needs an error message"):
        w.add(SampleRecord(id="x", messages=[], status="error"), None)
    with pytest.raises(ValueError, match="error row carries no arrays"):
        w.add(SampleRecord(id="x", messages=[], status="error", error="bad"), good)
    with pytest.raises(ValueError, match="sample 'x': status 'ok' needs arrays"):
        w.add(SampleRecord(id="x", messages=[]), None)
    w.add(SampleRecord(id="x", messages=[]), good)
    with pytest.raises(ValueError, match="sample 'x': duplicate id"):
        w.add(SampleRecord(id="x", messages=[]), good)
    w.close()
    assert open_cache(tmp_path / "c")[0].id == "x"
    with pytest.raises(ValueError, match=r"invalid cache metadata: .*field 'teacher.model_type' is missing"):
        CacheWriter(tmp_path / "d", hidden_size=D, vocab_size=V, topk=K, teacher={"id": "t", "revision": None,
                    "config_sha256": "x"}, tokenizer_sha256="t", chat_template_sha256=None, head=head, command="")
    assert not (tmp_path / "d").exists()
    with pytest.raises(CacheWriteError, match="already holds a complete cache"):
        CacheWriter(tmp_path / "c", hidden_size=D, vocab_size=V, topk=K, teacher=TEACHER, tokenizer_sha256="t",
                    chat_template_sha256=None, head=head, command="pytest")


def test_a_basis_that_cannot_be_saved_is_one_clear_error_and_stops_the_writer(tmp_path, head, samples):
    """Low-rank context: the basis is fitted and saved on the caller's thread (at close, for a run with fewer context
    rows than the fit wants). A save that fails (here a folder squats its path) names the file, leaves no manifest,
    and the writer thread does not outlive the failed cache."""
    import threading

    from genrecal_cache.format.manifest import BASIS_NAME
    from genrecal_cache.format.roles import Storage

    out = tmp_path / "c"
    w = CacheWriter(out, hidden_size=D, vocab_size=V, topk=K, teacher=TEACHER, tokenizer_sha256="t",
                    chat_template_sha256=None, head=head, command="pytest",
                    storage=Storage(context="lowrank", rank=4, topk_rows="answer"))
    (out / BASIS_NAME).mkdir()
    with pytest.raises(CacheWriteError, match=f"{BASIS_NAME}: could not save the low-rank context basis"):
        with w:
            for row, arrays in samples[:5]:
                w.add(row, arrays)
    assert not (out / "manifest.json").exists()
    assert not [t for t in threading.enumerate() if t.name == "CacheWriter(c)"]


def test_writer_thread_failure_reaches_the_caller(tmp_path, head, samples):
    w = CacheWriter(tmp_path / "c", hidden_size=D, vocab_size=V, topk=K, teacher=TEACHER, tokenizer_sha256="t",
                    chat_template_sha256=None, head=head, command="pytest", shard_tokens=16, chunk_tokens=16)
    # a regular file where the shard directory must go: the first shard write fails in the thread
    (tmp_path / "c" / "features.zarr" / "hidden" / "c").write_bytes(b"")
    with pytest.raises(CacheWriteError, match=r"writer thread failed at sample 'q\d+'"):
        for row, arrays in samples:
            w.add(row, arrays)
        w.close()
    assert not (tmp_path / "c" / "manifest.json").exists()


# ---- HTTP ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def serve(directory: Path, ranges: bool):
    """A real HTTP server on a free local port (tests/_http.py), with or without Range support; yields its URL."""
    with _http.serve(directory, ranges=ranges) as (url, _):
        yield url


@pytest.fixture(params=["ranges", "no-ranges"])
def http_url(request, bf16_cache):
    with serve(bf16_cache, ranges=request.param == "ranges") as url:
        yield url


def test_read_and_verify_over_http(request, http_url, bf16_cache, head):
    local, remote = open_cache(bf16_cache), open_cache(http_url)
    request.addfinalizer(remote.close)  # closes its aiohttp session
    assert remote.manifest == local.manifest and len(remote) == len(local)
    assert remote.index.equals(local.index)
    for a, b in zip(local.iter_samples("shuffled", seed=4, status="all"),
                    remote.iter_samples("shuffled", seed=4, status="all")):
        assert a.id == b.id and a.images == b.images and a.messages == b.messages
        for name in ("token_ids", "answer_mask", "hidden", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    s = remote.by_id("q7")  # random access: partial shard reads (byte ranges inside a shard)
    np.testing.assert_array_equal(s.hidden, local.by_id("q7").hidden)
    torch.testing.assert_close(remote.head().lm_head_weight, head.lm_head_weight, rtol=0, atol=0)
    assert verify(http_url) == []


def test_big_parquet_over_a_server_without_ranges(tmp_path, head):
    """samples.parquet larger than fsspec's read-ahead block: the reader falls back to one download."""
    rng = np.random.default_rng(1)
    samples = [(row, arrays) for row, arrays in make_samples(head, n=4)]
    for row, _ in samples:
        row.images = [rng.bytes(2 << 20)]  # incompressible, 4 x 2 MiB
    write_cache(tmp_path / "c", head, samples)
    with serve(tmp_path / "c", ranges=False) as url, open_cache(url) as cache:
        assert [s.images for s in cache.iter_samples(status="all")] == [r.images for r, _ in samples]
        assert verify(url) == []


def test_a_kill_while_the_head_is_saved_leaves_nothing_that_blocks_the_rerun(tmp_path, head, samples):
    """safetensors writes `<name>.tmpXXXXXX` beside the file it saves: a kill during the head save (before
    anything is committed) leaves it, and the re-run must clear it as its own start-up file, not refuse."""
    out = tmp_path / "cache"
    (out / "_commits").mkdir(parents=True)
    (out / "teacher_head.safetensors.tmp").write_bytes(b"partial")
    (out / "teacher_head.safetensors.tmp.tmpk3x9q1").write_bytes(b"partial")
    m = write_cache(out, head, samples)
    assert m.counts["samples"] == len(samples)
    assert not list(out.glob("teacher_head.safetensors.tmp*"))
