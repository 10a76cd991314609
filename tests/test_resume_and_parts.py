"""Issue 7, parts 1-2: crash-safe resume of extraction (SIGKILL at commit points and at random times) and
caches written in parts by independent jobs, read as one and merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from genrecal_cache.journal import KILL_POINTS
from genrecal_cache.format.manifest import CacheFormatError
from genrecal_cache import open_cache
from genrecal_cache.reader import TeacherCache
from genrecal_cache.verify import verify

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("token_ids", "answer_mask", "hidden", "topk_ids", "topk_logprobs", "row_flags")

# One process imports torch/transformers once, then forks a child per run: each child runs `extract`
# (transformers backend, tiny teacher, batches of one sample, 64-token shards, a commit after every
# shard) and is SIGKILLed, either by itself at a named point of the commit sequence (GENRECAL_KILL_AT)
# or by the parent after a random delay. Forking saves re-importing torch for every run. With
# `old_chain: n`, the first n runs write arrays as genrecal did before the inner crc32c.
DRIVER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)  # no OpenMP pool in the parent: children are forked
    from transformers import AutoConfig
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_cache.families import adapter_for
    teacher, data, out, plan = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    adapter = adapter_for(AutoConfig.from_pretrained(teacher))  # import transformers' lazy modules once
    adapter.load_processor(teacher), adapter.load_model(teacher)
    cfg = ExtractConfig(teacher=teacher, data=data, out=out, backend="transformers", hidden_codec="bfloat16",
                        batch_tokens=plan.get("batch_tokens", 1), topk=4, progress=False, commit_seconds=0,
                        shard_tokens=64,
                        context_fit_rows=64,  # the default low-rank context: basis fitted (and saved) early
                        num_shards=plan.get("num_shards", 1), shard_index=plan.get("shard_index", 0))
    rng = random.Random(plan.get("seed", 0))
    log = []
    for kill in plan["kills"] + [None]:
        pid = os.fork()
        if pid == 0:
            if len(log) < plan.get("old_chain", 0):  # this run is an older genrecal's: no inner crc32c
                import zarr
                create = zarr.Group.create_array
                def create_array(self, name, **kw):
                    kw["compressors"] = tuple(c for c in kw["compressors"] if type(c).__name__ != "Crc32cCodec")
                    return create(self, name, **kw)
                zarr.Group.create_array = create_array
            if isinstance(kill, str):
                os.environ["GENRECAL_KILL_AT"] = kill
            try:
                extract(cfg)
            except BaseException as e:
                print("child failed:", repr(e), file=sys.stderr, flush=True)
                os._exit(3)
            os._exit(0)
        if isinstance(kill, float):
            deadline = time.monotonic() + kill
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.01)
            else:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
        else:
            done, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        log.append([kill, code])
        if code not in (0, -9):
            break
    print(json.dumps(log))
""")


def _run_driver(teacher_dir: Path, data: Path, out: Path, plan: dict) -> list:
    r = subprocess.run([sys.executable, "-c", DRIVER, str(teacher_dir), str(data), str(out), json.dumps(plan)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads(r.stdout.strip().splitlines()[-1])
    assert log[-1] == [None, 0], (log, r.stderr[-3000:])
    return log


def _rows(cache) -> dict[str, dict]:
    return {r["id"]: r for r in cache.index.to_pylist()}


def _assert_same_samples(a, b, own_basis: bool = False) -> None:
    """Same ids, rows (but for offsets/index) and bit-identical features. `own_basis`: `b` is a cache in parts
    (or merged from one), whose parts fit their own low-rank context basis: its context rows are compared as
    states present where `a` has them, not bit for bit."""
    ra, rb = _rows(a), _rows(b)
    assert sorted(ra) == sorted(rb)
    for sid in ra:
        for k in ("status", "error", "num_tokens", "answer_spans", "messages", "image_refs", "extra"):
            assert ra[sid][k] == rb[sid][k], (sid, k)
        sa, sb = a.by_id(sid), b.by_id(sid)
        assert sa.images == sb.images
        for name in ARRAYS:
            x, y = getattr(sa, name), getattr(sb, name)
            if own_basis and name == "hidden":
                np.testing.assert_array_equal(sa.hidden_rows, sb.hidden_rows)
                x, y = x[sa.exact_rows], y[sb.exact_rows]
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (sid, name)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """10 demo samples plus two bad ones (an error row early and one in the middle)."""
    from genrecal_cache.demo_data import write_demo_dataset

    path = write_demo_dataset(tmp_path_factory.mktemp("rdata"), n=10, seed=3)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    q = [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": "red"}]
    rows.insert(1, {"id": "bad-a", "image": "images/missing-a.png", "conversations": q})
    rows.insert(7, {"id": "bad-b", "image": "images/missing-b.png", "conversations": q})
    out = path.parent / "mixed.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def reference(teacher_dir, small_data, tmp_path_factory) -> Path:
    """An uninterrupted run (same driver, no kills)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    _run_driver(teacher_dir, small_data, out, {"kills": []})
    return out


def test_sigkill_at_30_points_then_resume_gives_the_uninterrupted_cache(teacher_dir, small_data, reference,
                                                                       tmp_path):
    out = tmp_path / "cache"
    ref = open_cache(reference)
    assert ref.manifest.arrays["hidden"]["shard_tokens"] == 64 and ref.manifest.counts["tokens"] > 5 * 64
    rng = np.random.default_rng(7)
    # every named point of the commit sequence (mid-flush included), three times, in random order; then
    # kills at random times (they miss when a run ends first, which depends on load); then the two points
    # of close (after which little work is left): 21 kills at named points alone, 30 planned in all
    during = [f"{p}:1" for p in KILL_POINTS[:6]] * 3 + ["flush-array:2"]
    during = [during[i] for i in rng.permutation(len(during))]
    timed = [round(float(t), 2) for t in rng.uniform(0.2, 1.5, 9)]
    kills = during + timed + ["consolidated:1", "manifest-written:1"]
    log = _run_driver(teacher_dir, small_data, out, {"kills": kills})
    assert sum(code == -9 for _, code in log) >= 20, log
    assert not (out / "_progress.json").exists() and not (out / "_commits").exists()
    assert verify(out) == []
    got = open_cache(out)
    ids = got.index.column("id").to_pylist()
    assert ids == ref.index.column("id").to_pylist() and len(set(ids)) == len(ids) == 12  # each input once
    m_ref, m_got = json.loads((reference / "manifest.json").read_text()), json.loads((out / "manifest.json").read_text())
    assert m_got["counts"] == m_ref["counts"]
    # bit-identical: every feature shard, the head and samples.parquet have the same sha256
    assert m_got["checksums"] == m_ref["checksums"]
    assert m_got["extra"]["sizes"] == m_ref["extra"]["sizes"] == {rel: (out / rel).stat().st_size
                                                                  for rel in m_got["checksums"]}
    _assert_same_samples(ref, got)


def test_a_resume_cuts_the_batches_of_the_uninterrupted_run_bit_for_bit(teacher_dir, small_data, tmp_path):
    """Batches of several samples (batch composition changes the numerics): runs killed at commits and at
    random times, each resumed, give the uninterrupted run's bytes. Commits fall between batches only, so a
    resume starts where the uninterrupted run started a batch (issue 23: a stop mid-batch once changed
    later samples' hidden states and logprobs by up to 3.8e-6)."""
    plan = {"batch_tokens": 160}  # ~50-token samples: 2-3 per batch
    ref = tmp_path / "ref"
    _run_driver(teacher_dir, small_data, ref, {"kills": [], **plan})
    out = tmp_path / "cache"
    log = _run_driver(teacher_dir, small_data, out, {"kills": ["committed:1", "flush-array:2", "rows-written:1",
                                                               "committed:1", "progress-tmp:1"], **plan})
    assert sum(code == -9 for _, code in log) >= 3, log
    m_ref, m_got = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert m_got["counts"] == m_ref["counts"] and m_got["checksums"] == m_ref["checksums"]
    _assert_same_samples(open_cache(ref), open_cache(out))


def test_a_run_begun_before_the_chunk_crc32c_resumes_with_its_own_codec_chain(teacher_dir, small_data, reference,
                                                                             tmp_path):
    """Begun by a genrecal whose arrays had no inner crc32c, killed after 3 commits, finished by today's:
    the new shards keep the arrays' chain, so old and new shards decode alike; the manifest records it."""
    out = tmp_path / "cache"
    log = _run_driver(teacher_dir, small_data, out, {"kills": ["committed:3"], "old_chain": 1})
    assert log == [["committed:3", -9], [None, 0]], log
    ref = open_cache(reference)
    m_ref, m_got = json.loads((reference / "manifest.json").read_text()), json.loads((out / "manifest.json").read_text())
    assert m_got["counts"]["tokens"] > 5 * 64  # the old run committed 3 shards, today's wrote the rest
    for name in ARRAYS:
        inner, _ = m_got["arrays"][name]["codec"].split("], index")
        assert not inner.endswith(", crc32c") and m_ref["arrays"][name]["codec"] == f"{inner}, crc32c], index [bytes, crc32c]"
    assert verify(out) == []
    got = open_cache(out)
    assert got.index.column("id").to_pylist() == ref.index.column("id").to_pylist()
    _assert_same_samples(ref, got)


def test_resume_refuses_other_settings_and_readers_refuse_a_running_extraction(teacher_dir, small_data, tmp_path):
    from genrecal_cache.extract import ExtractConfig, extract

    out2 = tmp_path / "cache2"
    env = {**os.environ, "GENRECAL_KILL_AT": "committed:2"}
    r = subprocess.run([sys.executable, "-m", "cli.cache_cli", "extract", "--teacher", str(teacher_dir), "--data",
                        str(small_data), "--out", str(out2), "--backend", "transformers", "--topk", "4",
                        "--batch-tokens", "1", "--commit-seconds", "0", "--hidden-codec", "bf16", "--shard-tokens", "64"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out2 / "_progress.json").exists() and not (out2 / "manifest.json").exists()
    with pytest.raises(CacheFormatError, match="extraction is running here or was interrupted"):
        open_cache(out2)
    with pytest.raises(Exception, match=r"cannot resume: .*topk: was 4, now 5"):
        extract(ExtractConfig(teacher=str(teacher_dir), data=str(small_data), out=str(out2), backend="transformers",
                              topk=5, batch_tokens=1, hidden_codec="bf16", progress=False, shard_tokens=64))


def test_two_parts_from_separate_processes_read_and_merge_as_one_cache(teacher_dir, small_data, reference, tmp_path):
    out = tmp_path / "sharded"
    for i in range(2):  # two independent processes, one per part (each killed once on the way)
        _run_driver(teacher_dir, small_data, out, {"kills": ["committed:2"], "num_shards": 2, "shard_index": i})
    assert sorted(p.name for p in out.iterdir()) == ["part-00000-of-00002", "part-00001-of-00002"]
    ref = open_cache(reference)
    multi = open_cache(out)
    assert len(multi) == len(ref) == 12
    with pytest.raises(CacheFormatError, match=r"a cache written in parts \(2 parts: part-00000-of-00002, .*use "
                                               r"genrecal_cache.open_cache"):
        TeacherCache.open(out)  # opens one cache only
    # global index = part 0's rows, then part 1's; part i holds the inputs with index % 2 == i
    ref_ids = ref.index.column("id").to_pylist()
    assert multi.index.column("id").to_pylist() == ref_ids[0::2] + ref_ids[1::2]
    assert multi.index.column("index").to_pylist() == list(range(12))
    assert multi.manifest.counts == ref.manifest.counts | {"tokens": multi.manifest.counts["tokens"]}
    _assert_same_samples(ref, multi, own_basis=True)
    assert [multi[i].id for i in range(12)] == multi.index.column("id").to_pylist()
    # plan / iter_samples: ranks partition the ok samples; shuffled is a permutation
    ok = {i for i, s in enumerate(multi.index.column("status").to_pylist()) if s == "ok"}
    plans = [[i for g in multi.plan("shuffled", seed=3, rank=r, world_size=2) for i in g] for r in range(2)]
    assert set(plans[0]).isdisjoint(plans[1]) and set(plans[0]) | set(plans[1]) == ok
    got = [s.index for s in multi.iter_samples("shuffled", seed=3, rank=1, world_size=2)]
    assert got == plans[1]
    assert multi.head().vocab_size == ref.manifest.vocab_size
    # each file's size, listed like its checksum (part directory first)
    assert multi.manifest.sizes == {rel: (out / rel).stat().st_size for rel in multi.manifest.checksums}
    assert verify(out) == []
    # CLI: info and verify on the multi-part cache, then merge
    cli = [sys.executable, "-m", "cli.cache_cli"]
    info = subprocess.run([*cli, "info", str(out)], capture_output=True, text=True, cwd=REPO)
    assert info.returncode == 0 and "12 (10 ok, 2 error)" in info.stdout, info.stderr
    assert subprocess.run([*cli, "verify", str(out)], capture_output=True, cwd=REPO).returncode == 0
    merged = tmp_path / "merged"
    r = subprocess.run([*cli, "merge", str(out), "--out", str(merged)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert verify(merged) == []
    mc = open_cache(merged)
    assert mc.manifest.sizes == {rel: (merged / rel).stat().st_size for rel in mc.manifest.checksums}
    assert mc.index.column("id").to_pylist() == multi.index.column("id").to_pylist()
    _assert_same_samples(ref, mc, own_basis=True)


def test_a_part_from_another_teacher_setting_is_refused_by_name(teacher_dir, small_data, reference, tmp_path):
    import shutil

    out = tmp_path / "mixed"
    _run_driver(teacher_dir, small_data, out, {"kills": [], "num_shards": 2, "shard_index": 0})
    other = tmp_path / "other"
    from genrecal_cache.extract import ExtractConfig, extract

    extract(ExtractConfig(teacher=str(teacher_dir), data=str(small_data), out=str(other), backend="transformers",
                          topk=3, batch_tokens=1, hidden_codec="bf16", progress=False, num_shards=2, shard_index=1,
                          shard_tokens=64))
    shutil.move(str(other / "part-00001-of-00002"), str(out / "part-00001-of-00002"))
    with pytest.raises(CacheFormatError, match=r"part-00001-of-00002: written with a different .*topk: 3 vs 4"):
        open_cache(out)
    assert any("part-00001-of-00002" in f and "topk" in f for f in verify(out))
    shutil.rmtree(out / "part-00001-of-00002")
    with pytest.raises(CacheFormatError, match=r"1 of 2 parts missing \(part-00001-of-00002\)"):
        open_cache(out)
