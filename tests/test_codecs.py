"""Hidden-state codecs (issue 6): round trips and bounds, zarr/numcodecs registration, caches written with
every codec (verify, reader, trainer), the v1 manifest, and `plan` against a real cache size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch
import zarr

from genrecal_cache.format import codecs as C
from genrecal_cache.fidelity import SyntheticTeacher, codec_fidelity, fidelity, synthetic_post_norm_states, topk_fidelity
from genrecal_cache.format.head import HeadConfig, TeacherHead
from genrecal_cache.info import summarize
from genrecal_cache.format.manifest import CacheFormatError, Manifest, sha256_bytes
from genrecal_cache import open_cache
from genrecal_cache.reader import TeacherCache
from genrecal_cache.format.layout import plan_layout
from genrecal_cache.plan import estimate_cache_size
from genrecal_cache.writer import CacheWriter, SampleArrays, SampleRecord
from genrecal_cache.verify import verify

REPO = Path(__file__).resolve().parents[1]
D, V, K = 96, 500, 8
TEACHER = dict(id="tiny/teacher", revision=None, config_sha256=sha256_bytes(b"{}"), model_type="qwen2_vl")
LOSSY = ("fp8", "ecq")


def _inputs() -> dict[str, np.ndarray]:
    """Awkward inputs for every codec: LLM-like states, odd widths, zero/tiny/huge rows, one row."""
    rng = np.random.default_rng(0)
    x = synthetic_post_norm_states(300, 257, seed=1)
    x[3] = 0                                       # an all-zero token
    x[4] *= 1e-30                                  # subnormal-small
    x[5] *= 1e6                                    # huge
    x[6, 7] = 1e4                                  # one outlier far above the rest
    return {"llm": x, "narrow": rng.standard_normal((50, 3)).astype(np.float32), "one_row": x[:1],
            "wide": (rng.standard_t(3, (4, 5000)) * 7).astype(np.float32), "one_col": x[:, :1].copy(),
            "no_cols": np.zeros((4, 0), np.float32)}


@pytest.fixture(scope="module")
def head() -> TeacherHead:
    g = torch.Generator().manual_seed(0)
    return TeacherHead(HeadConfig(D, V), 1 + 0.1 * torch.randn(D, generator=g), torch.randn(V, D, generator=g) * 0.3)


# ---- the transforms ------------------------------------------------------------------------------------------

def test_fp8_rounding_is_torchs_float8_e4m3fn():
    rng = np.random.default_rng(0)
    table = np.unique(np.abs(C.E4M3_TABLE[np.isfinite(C.E4M3_TABLE)]))
    mids = ((table[1:].astype(np.float64) + table[:-1]) / 2).astype(np.float32)  # ties: round half to even
    vals = np.concatenate([table, -table, mids, -mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(448)),
                           rng.uniform(-448, 448, 200_000).astype(np.float32),
                           (rng.standard_normal(200_000) * 2.0 ** rng.integers(-14, 8, 200_000)).astype(np.float32)])
    vals = np.clip(vals, -448, 448).astype(np.float32)
    want = torch.from_numpy(vals).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(C.float32_to_e4m3(vals), want)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 2.0 ** 7, 3e4])
@pytest.mark.parametrize("cols", [512, 257])  # rows of even length decode codes in pairs, odd ones one by one
def test_fp8_decode_of_every_code_is_its_e4m3_value_times_the_scale(scale, cols):
    """Every code, in every position of a pair, decodes to its e4m3 value times its row's scale (NaN
    codes included)."""
    rows = 3
    payload = C.fp8_encode(np.ones((rows, cols), np.float32))  # a valid header of this shape
    body = payload[C.HEADER.size:].reshape(rows, 4 + cols)
    scales = np.float32(scale) * np.array([1, 0.5, 3], np.float32)
    body[:, :4] = scales.view(np.uint8).reshape(rows, 4)
    codes = (np.arange(rows * cols).reshape(rows, cols) * 7 + np.arange(rows)[:, None]) % 256  # each code in even and odd columns
    body[:, 4:] = codes.astype(np.uint8)
    want = C.E4M3_TABLE[codes] * scales[:, None]
    np.testing.assert_array_equal(C.decode_payload(payload), want)
    # decoding into a caller's buffer (as the fast reader does) gives the same
    out = np.full((rows, cols), 7.0, np.float32)
    C.decode_payload(payload, out=out)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name", C.HIDDEN_CODECS)
def test_round_trip_is_within_the_documented_bound(name):
    codec = C.hidden_codec(name)
    for label, x in _inputs().items():
        y = codec.round_trip(x)
        assert y.dtype == np.float32 and y.shape == x.shape, label
        bound = codec.error_bound(x)
        err = np.abs(y.astype(np.float64) - x)
        assert (err <= bound).all(), f"{name} on {label}: max excess {(err - bound).max()}"


def test_lossless_codecs_are_bit_exact():
    x = _inputs()["llm"]
    np.testing.assert_array_equal(C.hidden_codec("fp32").round_trip(x).view(np.uint32), x.view(np.uint32))
    bf16 = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # a bf16 teacher's states
    np.testing.assert_array_equal(C.hidden_codec("bf16").round_trip(bf16).view(np.uint32), bf16.view(np.uint32))


def test_lossy_codecs_are_close_on_llm_like_states():
    x = synthetic_post_norm_states(512, 1024, seed=3)
    rel = {n: np.linalg.norm(C.hidden_codec(n).round_trip(x) - x) / np.linalg.norm(x) for n in LOSSY}
    assert rel["fp8"] < 0.03 and rel["ecq"] < 0.05, rel
    # ecq keeps each token's largest values exactly (the "massive activation" channels)
    y = C.hidden_codec("ecq").round_trip(x)
    top = np.argmax(np.abs(x), axis=1)
    np.testing.assert_array_equal(y[np.arange(len(x)), top], x[np.arange(len(x)), top])


def test_payloads_are_self_describing_and_checked():
    x = _inputs()["llm"][:10]
    for q in (C.Fp8E4M3Codec(), C.EcqCodec()):
        p = q.encode_array(x)
        assert p.nbytes == q.encoded_size(*x.shape)
        np.testing.assert_array_equal(C.decode_payload(p.tobytes()), C.decode_payload(p))  # bytes or array
        with pytest.raises(C.CodecError, match="truncated"):
            C.decode_payload(p[:-3])
        bad = p.copy()
        bad[:4] = np.frombuffer(b"XXXX", np.uint8)
        with pytest.raises(C.CodecError, match="bad magic"):
            C.decode_payload(bad)
    with pytest.raises(C.CodecError, match="NaN or inf"):
        C.fp8_encode(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(C.CodecError, match="float32"):
        C.ecq_encode(np.zeros((2, 2), np.float64))


# ---- registration ----------------------------------------------------------------------------------------------

def test_numcodecs_ids_round_trip():
    x = _inputs()["llm"][:20]
    for cid, bound in (("genrecal_fp8_e4m3", C.fp8_error_bound(x)), ("genrecal_ecq", C.ecq_error_bound(x))):
        codec = numcodecs.get_codec({"id": cid})
        out = np.empty_like(x)
        codec.decode(codec.encode(x), out=out)
        assert (np.abs(out - x) <= bound).all()
        assert numcodecs.get_codec(codec.get_config()).get_config() == codec.get_config()


def test_zarr_array_with_the_codecs_outside_a_cache(tmp_path):
    x = synthetic_post_norm_states(100, 64, seed=2)
    for q in (C.Fp8E4M3Codec(), C.EcqCodec(step=0.05, outliers=2)):
        a = zarr.create_array(str(tmp_path / q.name), shape=x.shape, chunks=(32, 64), dtype="float32",
                              serializer=q, compressors=zarr.codecs.ZstdCodec(level=1))
        a[:] = x
        b = zarr.open_array(str(tmp_path / q.name), mode="r")
        assert b.serializer == q
        chunks = [C.decode_payload(q.encode_array(x[i:i + 32])) for i in range(0, 100, 32)]
        np.testing.assert_array_equal(b[:], np.concatenate(chunks))


# ---- caches written with every codec -----------------------------------------------------------------------------

def _samples(head: TeacherHead, n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    states = synthetic_post_norm_states(60 * n, D, seed=seed)
    out, pos = [], 0
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        if i % 7 == 3:
            out.append((SampleRecord(id=f"s{i}", messages=msgs, status="error", error="image is corrupt"), None))
            continue
        L = int(rng.integers(5, 60))
        h = torch.from_numpy(states[pos:pos + L].copy())
        pos += L
        ids, lps = head.topk_logprobs(h, K)
        mask = np.zeros(L, bool)
        mask[L // 2:] = True
        out.append((SampleRecord(id=f"s{i}", messages=msgs),
                    SampleArrays(rng.integers(0, V, L), mask, h, ids, lps)))
    return out


def _write(path: Path, head: TeacherHead, samples, codec: str, **kw):
    w = CacheWriter(path, hidden_size=D, vocab_size=V, topk=K, hidden_codec=codec, teacher=TEACHER,
                    tokenizer_sha256=sha256_bytes(b"tok"), chat_template_sha256=None, head=head, command="pytest",
                    **({"shard_tokens": 128, "chunk_tokens": 32} | kw))
    for row, arrays in samples:
        w.add(row, arrays)
    return w.close()


@pytest.fixture(scope="module")
def caches(tmp_path_factory, head):
    samples = _samples(head)
    root = tmp_path_factory.mktemp("codec_caches")
    return samples, {name: (root / name, _write(root / name, head, samples, name)) for name in C.HIDDEN_CODECS}


@pytest.mark.parametrize("name", C.HIDDEN_CODECS)
def test_cache_with_each_codec_verifies_and_reads_decoded_float32(caches, head, name):
    samples, by_codec = caches
    path, manifest = by_codec[name]
    codec = C.hidden_codec(name)
    assert manifest.hidden_codec == name and manifest.format_version == 2
    assert manifest.arrays["hidden"]["dtype"] == codec.logical_dtype
    assert json.loads((path / "manifest.json").read_text())["hidden_codec"] == name
    assert verify(path) == []
    originals = {row.id: arrays for row, arrays in samples if arrays is not None}
    cache = open_cache(path)
    seen = 0
    for s in cache.iter_samples("shuffled", seed=1):
        h = originals[s.id].hidden.numpy()
        assert s.hidden.dtype == np.float32 and s.hidden.shape == h.shape
        if name == "fp32":
            np.testing.assert_array_equal(s.hidden, h)
        elif name == "bf16":
            np.testing.assert_array_equal(s.hidden, torch.from_numpy(h).to(torch.bfloat16).float().numpy())
        else:  # a sample's rows sit in chunks with other tokens; the bounds are per token, so they still hold
            assert (np.abs(s.hidden - h) <= codec.error_bound(h)).all()
        seen += 1
    assert seen == manifest.counts["ok"]
    # plain zarr (genrecal imported: codecs registered) returns the same float32 values
    feats = zarr.open_group(str(path / "features.zarr"), mode="r")
    s = cache[1]
    plain = feats["hidden"][s_range(cache, 1)]
    np.testing.assert_array_equal(codec.to_float32(plain), s.hidden)
    info = summarize(cache)
    assert info["hidden_codec"] == name
    assert info["arrays"]["hidden"]["raw_bytes_per_token"] == codec.row_bytes(D)
    assert 0 < info["arrays"]["hidden"]["bytes_per_token"] < 4 * D + 64


def test_bf16_caches_written_with_the_zstd_chain_still_read_bit_identically(caches, head, tmp_path):
    """bf16 `hidden` is blosc lz4 since issue 24 (blosc zstd-1 before; zarr.json records which): a cache written with
    the old chain verifies, reads through the direct shard reader (not zarr) and gives today's bits in both
    precisions, zarr alone reads it alike, and a merge of it is written with today's chain, bit for bit."""
    import dataclasses

    from genrecal_cache.merge import merge

    samples, by_codec = caches
    new = by_codec["bf16"][0]
    old = tmp_path / "old"
    _write(old, head, samples, dataclasses.replace(C.hidden_codec("bf16"), compression=C.ZSTD_SHUFFLE))
    merged = merge(old, tmp_path / "merged")
    chains = {p: json.loads((p / "manifest.json").read_text())["arrays"]["hidden"]["codec"]
              for p in (old, new, tmp_path / "merged")}
    assert chains[old].startswith("sharding_indexed[bytes, blosc(cname=zstd, clevel=1, shuffle=shuffle, ")
    assert chains[new] == chains[tmp_path / "merged"] != chains[old]
    assert chains[new].startswith("sharding_indexed[bytes, blosc(cname=lz4, clevel=1, shuffle=noshuffle, ")
    assert merged.hidden_codec == "bf16"
    for path in (old, tmp_path / "merged"):
        assert verify(path) == []
        with open_cache(path) as a, open_cache(new) as b:
            assert a._fast_readers(a._features()) is not None
            for precision in ("float32", "stored"):
                pairs = list(zip(a.iter_samples(precision=precision), b.iter_samples(precision=precision), strict=True))
                assert pairs
                for x, y in pairs:
                    assert x.id == y.id and x.hidden.dtype == y.hidden.dtype
                    np.testing.assert_array_equal(x.hidden, y.hidden)
                    np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
    plain = [zarr.open_array(str(p / "features.zarr" / "hidden"), mode="r")[...] for p in (old, new)]
    np.testing.assert_array_equal(plain[0], plain[1])


def s_range(cache: TeacherCache, i: int) -> slice:
    a = int(cache._offsets[i])
    return slice(a, a + int(cache._lengths[i]))


def test_lossy_caches_keep_the_teacher_close(caches, head):
    _, by_codec = caches
    exact = open_cache(by_codec["fp32"][0])
    for name in LOSSY:
        cache = open_cache(by_codec[name][0])
        ref = np.concatenate([s.hidden for s in exact.iter_samples()])
        dec = np.concatenate([s.hidden for s in cache.iter_samples()])
        f = fidelity(head, ref, dec)
        assert f.mean_kl < {"fp8": 5e-3, "ecq": 1e-2}[name] and f.top1_agreement > 0.9, (name, f)
        t = topk_fidelity(head, cache.iter_samples())  # against the stored top-k only
        assert t["tokens"] == f.tokens and t["kl_lower_bound"] <= f.mean_kl + 1e-9
        assert abs(t["top1_agreement"] - f.top1_agreement) < 0.02


def test_a_plain_zarr_process_decodes_through_entry_points(caches):
    """No `import genrecal_cache`: zarr finds the codecs through the installed package's entry points."""
    _, by_codec = caches
    code = ("import sys, zarr, numpy as np\n"
            "assert 'genrecal_cache' not in sys.modules\n"
            "a = zarr.open_array(sys.argv[1], mode='r')\n"
            "np.save(sys.argv[2], a[:])\n"
            "assert 'genrecal_cache.codecs' in sys.modules  # loaded by zarr, from the entry point\n")
    for name in LOSSY:
        out = by_codec[name][0].parent / f"{name}.npy"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([sys.executable, "-c", code, str(by_codec[name][0] / "features.zarr" / "hidden"), str(out)],
                       check=True, env=env, cwd="/")
        cache = open_cache(by_codec[name][0])
        np.testing.assert_array_equal(np.load(out), np.concatenate([cache[i].hidden for i in range(len(cache))]))


def test_verify_catches_a_codec_mismatch(caches, tmp_path):
    import shutil

    _, by_codec = caches
    path = tmp_path / "c"
    shutil.copytree(by_codec["fp8"][0], path)
    m = json.loads((path / "manifest.json").read_text())
    m["hidden_codec"] = "ecq"
    m["arrays"]["hidden"]["dtype"] = "int8"
    (path / "manifest.json").write_text(json.dumps(m))
    faults = verify(path)
    assert any("encoded with 'genrecal.fp8_e4m3'" in f and "needs 'genrecal.ecq'" in f for f in faults), faults
    m["hidden_codec"] = "int3"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheFormatError, match="field 'hidden_codec' is 'int3'"):
        open_cache(path)


def test_version1_manifests_still_read(caches, tmp_path):
    import shutil

    samples, by_codec = caches
    for name in ("bf16", "fp32"):
        path = tmp_path / name
        shutil.copytree(by_codec[name][0], path)
        m = json.loads((path / "manifest.json").read_text())
        del m["hidden_codec"]
        m["format_version"] = 1
        text = json.dumps(m, indent=1) + "\n"
        (path / "manifest.json").write_text(text)
        parsed = Manifest.from_json(text)
        assert parsed.hidden_codec == name and parsed.to_json() == text  # stays version 1
        assert verify(path) == []
        np.testing.assert_array_equal(open_cache(path)[0].hidden, open_cache(by_codec[name][0])[0].hidden)
    m["hidden_codec"] = "bf16"  # not a version-1 field
    with pytest.raises(CacheFormatError, match="'hidden_codec' is unknown"):
        Manifest.from_json(json.dumps(m))


def test_old_hidden_dtype_names_still_work(tmp_path, head):
    samples = _samples(head, n=4)
    m = _write(tmp_path / "a", head, samples, "float32")
    assert m.hidden_codec == "fp32"
    with pytest.raises(ValueError, match="disagree"):  # --hidden-codec fp8 --hidden-dtype bfloat16
        C.resolve_hidden_codec("fp8", "bfloat16")
    with pytest.raises(ValueError, match="unknown hidden codec 'int4'"):
        _write(tmp_path / "c", head, samples, "int4")
    assert plan_layout(8192, 20, "bfloat16") == plan_layout(8192, 20, "bf16")


def test_layout_caps_decoded_shards():
    for codec in ("fp8", "ecq"):
        lay = plan_layout(8192, 64, codec)
        assert lay.shard_tokens * 8192 * 4 <= 256 << 20 and lay.chunk_tokens["hidden"] == 256


# ---- plan ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bf16", "fp8", "ecq"])
def test_plan_estimate_matches_a_written_cache(tmp_path, name):
    """The estimate compresses synthetic LLM-like data through the writer's own arrays; a cache of the same
    kind of data must come out within 10% (per array for hidden, in total for the features)."""
    d, vocab, k, n_tok = 256, 3000, 16, 12_000
    g = torch.Generator().manual_seed(1)
    head = TeacherHead(HeadConfig(d, vocab), torch.ones(d), torch.randn(vocab, d, generator=g) * 0.1)
    states = synthetic_post_norm_states(n_tok, d, seed=5)
    from genrecal_cache.fidelity import synthetic_topk

    ids, lps = synthetic_topk(n_tok, vocab, k, seed=6)
    rng = np.random.default_rng(7)
    w = CacheWriter(tmp_path / "c", hidden_size=d, vocab_size=vocab, topk=k, hidden_codec=name, teacher=TEACHER,
                    tokenizer_sha256="t", chat_template_sha256=None, head=head, command="pytest")
    for i, a in enumerate(range(0, n_tok, 400)):
        L = min(400, n_tok - a)
        mask = np.zeros(L, bool)
        mask[300:] = True
        w.add(SampleRecord(id=f"s{i}", messages=[{"role": "user", "content": "q" * 300}]),
              SampleArrays(rng.integers(0, vocab, L), mask, states[a:a + L], ids[a:a + L], lps[a:a + L]))
    m = w.close()
    est = estimate_cache_size(n_tok, d, vocab, k, name, samples=30)
    sizes = {f: (tmp_path / "c" / f).stat().st_size for f in m.checksums}
    actual = {arr: sum(s for f, s in sizes.items() if f.startswith(f"features.zarr/{arr}/")) for arr in m.arrays}
    assert est.layout.shard_tokens == m.arrays["hidden"]["shard_tokens"]
    assert abs(est.arrays["hidden"]["bytes"] / actual["hidden"] - 1) < 0.10, (est.arrays["hidden"], actual["hidden"])
    assert abs(est.features_bytes / sum(actual.values()) - 1) < 0.10
    assert abs(est.head_bytes - sizes["teacher_head.safetensors"] / 2) < 0.05 * est.head_bytes  # fp32 head here


# ---- fidelity on a realistic synthetic teacher, and the trainer on lossy caches ------------------------------------

def test_fidelity_of_the_codecs_on_a_synthetic_llm():
    t = SyntheticTeacher(hidden_size=256, vocab_size=2000, seed=0)
    h = t.states(400)
    stats = t.stats(h)
    assert 0.4 < stats.mean_top1_prob < 0.95  # neither uniform nor one-hot
    f = {n: codec_fidelity(t.head, h, n) for n in C.HIDDEN_CODECS}
    assert f["fp32"].mean_kl == 0 and f["fp32"].top1_agreement == 1
    assert f["bf16"].mean_kl < 1e-4 < f["fp8"].mean_kl < f["ecq"].mean_kl < 2e-2
    assert f["ecq"].top1_agreement > 0.95


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_cache_from_extract_trains(tmp_path, teacher_dir, student_dir, demo_jsonl, name):
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import train

    out = tmp_path / "cache"
    m = extract(ExtractConfig(context="full", topk_rows="all", teacher=str(teacher_dir), data=str(demo_jsonl), out=str(out), backend="transformers",
                              hidden_codec=name, progress=False, limit=12))
    assert m.hidden_codec == name and verify(out) == []
    run = tmp_path / "run"
    train(TrainConfig(cache=str(out), student=str(student_dir), out=str(run), stages=[1], max_steps=2, batch_size=4,
                      device="cpu", prefetch=2, checkpoint_every=1000))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.mark.parametrize("name", C.HIDDEN_CODECS)
def test_direct_local_reads_equal_zarr_reads(caches, name, tmp_path):
    """TeacherCache reads local shards itself (genrecal_cache/io/fastread.py); zarr must see the same."""
    import shutil

    path = caches[1][name][0]
    cache = open_cache(path)
    feats = cache._features()
    assert cache._fast_readers(feats) is not None
    T = cache.manifest.counts["tokens"]
    rng = np.random.default_rng(0)
    for lo, hi in [(0, T), (0, 1), (T - 1, T), (31, 33), (127, 129), *(sorted(rng.integers(0, T, 2)) for _ in range(8))]:
        got = cache._read_tokens(int(lo), int(hi))
        for k, a in feats.items():
            want = a[int(lo):int(hi)]
            if k == "hidden":
                want = C.hidden_codec(name).to_float32(want)
            assert got[k].dtype == want.dtype
            np.testing.assert_array_equal(got[k], want)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shard = broken / "features.zarr" / "hidden" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match="crc32c"):
        open_cache(broken)[0]


def _frames(shard: Path, chunks: int) -> list[tuple[int, int]]:
    """(offset, bytes) of each inner chunk of a shard file (index at the end: 16 bytes per chunk, then crc32c)."""
    data = shard.read_bytes()
    idx = np.frombuffer(data[-(16 * chunks + 4):-4], "<u8").reshape(chunks, 2)
    return [(int(o), int(n)) for o, n in idx]


def test_stored_bf16_chunks_go_straight_from_the_file_and_are_checked(head, tmp_path, monkeypatch):
    """bf16 under lz4 without shuffle: a chunk of LLM-like rows is stored as it is (blosc's header, then the bytes) and
    a stored-precision read puts it straight into the output (`ShardedArrayReader._stored_frame`); chunks of zero
    rows are compressed and decoded. Both equal zarr's reads; a flipped byte, a header declaring another size and
    an inf in such a chunk are refused."""
    import google_crc32c
    import struct

    from genrecal_cache.io.fastread import BLOSC_MEMCPYED, ShardedArrayReader

    samples = _samples(head, n=12)
    for k, (_, arrays) in enumerate(samples):
        if arrays is not None and k % 3 == 0:  # some samples' rows are left out, as role-aware storage does
            arrays.hidden.zero_()
    path = tmp_path / "bf16"
    _write(path, head, samples, "bf16")
    m = json.loads((path / "manifest.json").read_text())["arrays"]["hidden"]
    per_shard = m["shard_tokens"] // m["chunk_tokens"]
    shard = path / "features.zarr" / "hidden" / "c" / "0" / "0"
    data = shard.read_bytes()
    stored = [(o, n) for o, n in _frames(shard, per_shard) if n != 2 ** 64 - 1 and data[o + 2] & BLOSC_MEMCPYED]
    encoded = m["chunk_tokens"] * D * 2
    assert stored and all(n == 16 + encoded + 4 for _, n in stored)
    assert len(stored) < per_shard  # and some compressed chunks (the zero rows)

    direct = []
    original = ShardedArrayReader._stored_frame

    def counting(self, *args):  # noqa: ANN001, ANN202
        direct.append(original(self, *args))
        return direct[-1]

    monkeypatch.setattr(ShardedArrayReader, "_stored_frame", counting)
    cache = open_cache(path)
    feats = cache._features()
    T = cache.manifest.counts["tokens"]
    for lo, hi in [(0, T), (0, 32), (32, 64), (5, 70), (T - 1, T)]:
        got = cache._read_tokens(lo, hi, widen=False)["hidden"]
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, feats["hidden"][lo:hi])
    assert any(direct) and all(direct)
    for s, f in zip(cache.iter_samples(precision="stored"), cache.iter_samples(), strict=True):
        np.testing.assert_array_equal(C.bf16_bits_to_float32(s.hidden), f.hidden)

    offset = stored[0][0]

    def altered(change) -> None:  # noqa: ANN001
        b = bytearray(data)
        change(b)
        b[offset + 16 + encoded:offset + 20 + encoded] = np.uint32(
            google_crc32c.value(bytes(b[offset:offset + 16 + encoded]))).tobytes()
        shard.write_bytes(bytes(b))

    b = bytearray(data)
    b[offset + 100] ^= 1  # a byte of the payload, crc32c left as it was
    shard.write_bytes(bytes(b))
    with pytest.raises(CacheFormatError, match="crc32c"):
        open_cache(path)._read_tokens(0, T, widen=False)
    altered(lambda b: struct.pack_into("<I", b, offset + 4, encoded + 2))  # the header declares another size
    with pytest.raises(CacheFormatError, match=f"declares {encoded + 2} decoded bytes"):
        open_cache(path)._read_tokens(0, T, widen=False)
    altered(lambda b: struct.pack_into("<H", b, offset + 16 + 2 * D + 6, 0x7F80))  # an inf in the chunk's 2nd row
    with pytest.raises(CacheFormatError, match="NaN or inf"):
        open_cache(path)._read_tokens(0, T, widen=False)


def test_plan_and_extract_cli_options():
    from typer.testing import CliRunner

    from cli.cache_cli import app

    r = CliRunner().invoke(app, ["plan", "--tokens", "1000000", "--hidden-size", "512", "--vocab", "5000",
                                 "--codec", "ecq", "--topk", "8", "--samples", "2000", "--json", "--context", "full",
                                 "--topk-rows", "all"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)
    assert est["hidden_codec"] == "ecq" and est["tokens"] == 1_000_000
    assert 0.25 < est["arrays"]["hidden"]["bytes_per_token"] / (2 * 512) < 0.40  # every row at the codec
    r = CliRunner().invoke(app, ["plan", "--tokens", "10", "--hidden-size", "8", "--vocab", "9", "--topk", "4",
                                 "--codec", "int3"], env={"COLUMNS": "200"})
    assert r.exit_code != 0 and "unknown hidden codec 'int3'" in r.output, r.output
    r = CliRunner().invoke(app, ["extract", "--help"])
    assert "--hidden-codec" in r.output


def test_reused_read_buffers_never_change_a_sample_still_in_use(caches):
    """iter_samples reuses group buffers (fastread.BufferPool) only once no sample's view is alive."""
    for name in ("bf16", "ecq"):
        cache = open_cache(caches[1][name][0])
        want = {s.id: s.hidden.copy() for s in cache.iter_samples(readahead=0)}
        kept, derived = {}, []
        for j, s in enumerate(cache.iter_samples("shuffled", seed=3)):
            if j % 3 == 0:
                kept[s.id] = s.hidden                       # the sample's view itself
            elif j % 3 == 1:
                derived.append((s.id, torch.from_numpy(s.hidden)[1:]))  # only a tensor made from a view of it
        assert kept and derived
        for sid, h in kept.items():
            np.testing.assert_array_equal(h, want[sid])
        for sid, t in derived:
            np.testing.assert_array_equal(t.numpy(), want[sid][1:])
    from genrecal_cache.io.fastread import BufferPool

    pool = BufferPool(max_buffers=2, min_bytes=0)
    a = pool.empty((4, 4), np.float32)
    b = pool.empty((4, 4), np.float32)
    assert not np.shares_memory(a, b)
    view = a[1:]
    del a
    assert not np.shares_memory(pool.empty((4, 4), np.float32), view)  # a's buffer is still in use by the view
    del view
    c = pool.empty((4, 4), np.float32)
    assert any(np.shares_memory(c, buf) for buf in pool._bufs)  # now reused


def test_bf16_rounding_in_numpy_is_torchs():
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32),
                        np.array([0.0, -0.0, 1e-45, -1e-45, 3.38e38, -3.38e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8],
                                 np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(C.float32_to_bf16_bits(x), want)
    np.testing.assert_array_equal(C.hidden_codec("bf16").to_stored(torch.from_numpy(x)), want)
