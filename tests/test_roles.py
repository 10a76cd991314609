"""Role-aware storage (format version 3, docs/cache-format.md "Row roles"): each context policy round-trips
through extract -> verify -> merge -> pull -> parts -> train, answer rows stay exact, what is left out reads as
absent, and older readers refuse the new version by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache import open_cache
from genrecal_cache.extract import ExtractConfig, extract
from genrecal_cache.families import adapter_for
from genrecal_cache.format.manifest import CacheFormatError, Manifest
from genrecal_cache.format.roles import FLAG_COMPACT, ContextBasis, Storage, answer_rows
from genrecal_cache.io.pull import pull
from genrecal_cache.merge import merge
from genrecal_cache.plan import estimate_cache_size
from genrecal_cache.verify import verify

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("full", "lowrank", "text", "none")


def _extract(teacher_dir: Path, data: Path, out: Path, context: str, **kw) -> Path:
    extract(ExtractConfig(teacher=str(teacher_dir), data=str(data), out=str(out), backend="transformers",
                          hidden_codec="float32", progress=False, context=context, context_fit_rows=256,
                          topk_rows="all" if context == "full" else "answer", **kw))
    return out


@pytest.fixture(scope="module")
def caches(teacher_dir, demo_jsonl, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("roles")
    return {p: _extract(teacher_dir, demo_jsonl, root / p, p) for p in POLICIES}


def test_each_policy_stores_answer_rows_exactly_and_what_it_keeps_of_the_context(caches):
    full = open_cache(caches["full"])
    assert full.manifest.format_version == 2 and "row_flags" not in full.manifest.arrays  # byte for byte version 2
    sizes = {}
    for policy, path in caches.items():
        assert verify(path) == [], policy
        c = open_cache(path)
        sizes[policy] = sum(n for rel, n in c.manifest.sizes.items() if rel.startswith("features.zarr/"))
        for s in c.iter_samples():
            ref = full.by_id(s.id)
            ans = answer_rows(s.answer_mask)
            np.testing.assert_array_equal(s.token_ids, ref.token_ids)
            np.testing.assert_array_equal(s.hidden[ans], ref.hidden[ans])  # answer rows: exact (fp32 codec)
            np.testing.assert_array_equal(s.topk_ids[ans], ref.topk_ids[ans])
            assert s.exact_rows[ans].all() and s.topk_rows[ans].all()
            ctx = ~ans
            if policy == "full":
                assert s.exact_rows.all() and s.topk_rows.all()
                continue
            assert not s.topk_rows[ctx].any() and not s.topk_ids[ctx].any()  # top-k at answer rows only
            if policy == "lowrank":
                assert (s.row_flags[ctx] == FLAG_COMPACT).all()
                err = np.linalg.norm(s.hidden[ctx] - ref.hidden[ctx]) / np.linalg.norm(ref.hidden[ctx])
                assert 0 < err < 0.9, (s.id, err)  # a rank-16 approximation of 128-d states, not zeros
            elif policy == "text":
                image = np.isin(s.token_ids, c.manifest.roles.image_token_ids)
                assert image.any() and not s.hidden_rows[ctx & image].any() and not s.hidden[ctx & image].any()
                np.testing.assert_array_equal(s.hidden[ctx & ~image], ref.hidden[ctx & ~image])
            else:
                assert not s.hidden_rows[ctx].any() and not s.hidden[ctx].any()
    assert sizes["none"] < sizes["lowrank"] < sizes["text"] < sizes["full"], sizes


def test_lowrank_basis_is_the_principal_subspace_and_reconstructs_it():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 32)) + 3.0  # rank 4 plus an offset
    b = ContextBasis.fit(x, 4)
    np.testing.assert_allclose(b.decode(b.encode(x)), x, atol=1e-4)
    np.testing.assert_allclose(b.basis @ b.basis.T, np.eye(4), atol=1e-5)
    assert ContextBasis.fit(x, 8).basis[4:].any() == False  # noqa: E712 - rank beyond the data: zero rows


def test_merge_pull_and_parts_carry_the_storage(caches, teacher_dir, demo_jsonl, tmp_path):
    src = open_cache(caches["lowrank"])
    merged = merge(caches["lowrank"], tmp_path / "merged")
    assert merged.storage == src.manifest.storage and verify(tmp_path / "merged") == []
    m = open_cache(tmp_path / "merged")
    for s in src.iter_samples():
        t = m.by_id(s.id)
        np.testing.assert_array_equal(t.row_flags, s.row_flags)
        np.testing.assert_array_equal(t.hidden[s.exact_rows], s.hidden[s.exact_rows])
        np.testing.assert_allclose(t.hidden, s.hidden, atol=1e-5)  # context re-coded on the same basis
    pull(str(caches["text"]), tmp_path / "pulled")
    assert verify(tmp_path / "pulled") == []
    for i in range(2):  # a low-rank cache in parts: each part fits its own basis, read as one cache
        _extract(teacher_dir, demo_jsonl, tmp_path / "parts", "lowrank", num_shards=2, shard_index=i)
    parts = open_cache(tmp_path / "parts")
    assert verify(tmp_path / "parts") == [] and len(parts) == len(src)
    for s in parts.iter_samples():
        # other batches in a part's forward: equal to float32 rounding
        np.testing.assert_allclose(s.hidden[s.exact_rows], src.by_id(s.id).hidden[s.exact_rows], atol=1e-5)
    lean = list(parts.iter_samples(precision="stored", context=False))  # a step that reads no context row
    assert len(lean) == len(src) and all(s.context is None and not (s.row_flags & FLAG_COMPACT).any() for s in lean)
    merge(tmp_path / "parts", tmp_path / "merged-parts")
    assert verify(tmp_path / "merged-parts") == []


def test_a_lowrank_cache_reads_and_verifies_over_http_and_through_a_local_mirror(caches, tmp_path):
    from _http import serve

    local = open_cache(caches["lowrank"])
    with serve(caches["lowrank"]) as (url, _):
        assert verify(url) == []
        with open_cache(url, local_cache=tmp_path / "mirror") as remote:
            assert remote.context_basis() is not None
            for s in remote.iter_samples("shuffled", seed=1):
                ref = local.by_id(s.id)
                np.testing.assert_array_equal(s.hidden, ref.hidden)
                np.testing.assert_array_equal(s.row_flags, ref.row_flags)


def test_verify_catches_row_flags_that_disagree_with_the_storage(caches, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(caches["none"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["storage"]["topk_rows"] = "all"  # the flags on disk say answer rows only
    (bad / "manifest.json").write_text(json.dumps(m))
    assert any("row_flags" in f and "disagree" in f for f in verify(bad))


def test_an_older_genrecal_refuses_a_newer_version_by_name(caches):
    text = (caches["lowrank"] / "manifest.json").read_text()
    raw = json.loads(text)
    assert raw["format_version"] == 3 and raw["storage"]["context"] == "lowrank"
    with pytest.raises(CacheFormatError, match=r"'format_version' is 4, this genrecal reads versions 1, 2, 3"):
        Manifest.from_json(json.dumps({**raw, "format_version": 4}))
    with pytest.raises(CacheFormatError, match=r"field 'storage.context' must be a string"):
        Manifest.from_json(json.dumps({**raw, "storage": {**raw["storage"], "context": 3}}))
    with pytest.raises(CacheFormatError, match=r"field 'storage' is invalid: context policy 'half'"):
        Manifest.from_json(json.dumps({**raw, "storage": {**raw["storage"], "context": "half"}}))


def test_plan_at_paper_scale_per_policy():
    """The issue's figure: a 72B teacher over 9M samples of ~1.5k tokens (15% answer, 70% image tokens), ecq.
    Full storage plans as before role-aware storage (63.4 TiB); the default (low-rank context, top-k at answer
    rows) at most 14 TiB including the images. How plan compares with real caches: bench/roles.py."""
    kw = dict(tokens=13_500_000_000, samples=9_000_000, hidden_size=8192, vocab_size=152064, topk=64,
              hidden_codec="ecq", image_bytes_per_sample=150_000, answer_fraction=0.15, image_fraction=0.7)
    full = estimate_cache_size(**kw, storage=Storage())
    default = estimate_cache_size(**kw, storage=Storage("lowrank", 64, "answer"))
    none = estimate_cache_size(**kw, storage=Storage("none", None, "answer"))
    assert abs(full.total_bytes / 2**40 - 63.4) < 0.5
    assert default.total_bytes / 2**40 <= 14 and full.total_bytes / default.total_bytes >= 4.5
    assert none.total_bytes < default.total_bytes
    # the answer rows cost the same whatever the context policy (but the zero rows of `context` at them)
    assert default.roles["answer"] == pytest.approx(none.roles["answer"], rel=1e-3)


def test_training_reads_each_policy(caches, student_dir, tmp_path):
    """Stages 1-2 run on every policy; with no context rows the regularization pass reads the answer rows alone."""
    for policy in ("lowrank", "none"):
        out = tmp_path / policy
        r = subprocess.run([sys.executable, "-m", "cli.train_cli", "--cache", str(caches[policy]), "--student",
                            str(student_dir), "--out", str(out), "--stages", "1,2", "--max-steps", "2",
                            "--batch-size", "4"], capture_output=True, text=True, cwd=REPO,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("reg_kl" in x and np.isfinite(x["reg_kl"]) for x in lines), lines[-1]


def test_bad_storage_flags_are_one_usage_error(tmp_path):
    cli = [sys.executable, "-m", "cli.cache_cli"]
    for args, flag in ((["extract", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "o"), "--context", "half"],
                        "--context"),
                       (["plan", "--tokens", "100", "--hidden-size", "64", "--vocab", "100", "--topk-rows", "some"],
                        "--topk-rows"),
                       (["plan", "--tokens", "100", "--hidden-size", "64", "--vocab", "100", "--context", "none",
                         "--context-rank", "8"], "--context-rank")):
        r = subprocess.run(cli + args, capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 2 and f"Invalid value for {flag}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_the_randomized_fit_of_a_wide_basis_keeps_nearly_the_best_subspace():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1500, 1536)) * np.exp(-np.arange(1536) / 200)).astype(np.float32)
    b = ContextBasis.fit(x, 32)  # d > 1024: randomized SVD
    xc = x - b.mean
    kept = 1 - np.square(xc - b.decode(b.encode(x)) + b.mean).sum() / np.square(xc).sum()
    s = np.linalg.svd(xc.astype(np.float64), compute_uv=False)
    assert kept >= 0.98 * (s[:32] ** 2).sum() / (s ** 2).sum()
    np.testing.assert_array_equal(ContextBasis.fit(x, 32).basis, b.basis)  # deterministic


def test_plan_with_a_pilot_cache_agrees_with_the_real_cache(caches, teacher_dir, tmp_path):
    """`plan --sample PILOT`: compression measured on a pilot extraction's real rows (other samples of the same
    teacher) estimates the real cache's feature bytes within 15% for every policy (synthetic rows alone: +20-55%
    on the quality suite's teacher, docs/benchmarks.md)."""
    from genrecal_cache.demo_data import write_demo_dataset
    from genrecal_cache.plan import estimate_like, sample_rows

    data = write_demo_dataset(tmp_path / "pilot-data", n=16, seed=7)
    pilot = open_cache(_extract(teacher_dir, data, tmp_path / "pilot", "full"))
    image_ids = open_cache(caches["text"]).manifest.roles.image_token_ids
    rows = sample_rows(pilot, image_ids)
    assert all("states" in rows[r] and "topk_ids" in rows[r] for r in ("answer", "text", "image"))
    for policy in POLICIES:
        c = open_cache(caches[policy])
        m = c.manifest
        est = estimate_like(c, image_ids, rows)
        on_disk = sum(n for rel, n in m.sizes.items() if rel.startswith("features.zarr/") and "/c/" in rel)
        assert abs(est.features_bytes / on_disk - 1) < 0.15, (policy, est.features_bytes, on_disk)
    r = subprocess.run([sys.executable, "-m", "cli.cache_cli", "plan", "--tokens", "100000", "--hidden-size",
                        str(pilot.manifest.hidden_size), "--vocab", str(pilot.manifest.vocab_size), "--topk", "8",
                        "--sample", str(tmp_path / "pilot"), "--image-token-id", str(image_ids[0])],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "total" in r.stdout, r.stderr


@torch.no_grad()
def test_recal_context_none_trains_the_same_on_a_cache_without_context_rows(caches, student_dir):
    """--recal-context none reads the answer rows only: a `none` cache (no context rows) gives the losses of a
    `full` one exactly, so such a run can use the smallest cache; with the default prefix they differ."""
    from genrecal_train.batches import collate, make_example
    from genrecal_train.config import TrainConfig
    from genrecal_train.model import GenRecal

    adapter = adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    losses = {}
    for context in ("none", "question"):
        for policy in ("full", "none"):
            cache = open_cache(caches[policy])
            examples = [make_example(cache[i], adapter, processor, 2048, cache.teacher_tokenizer()) for i in range(4)]
            torch.manual_seed(0)
            cfg = TrainConfig(cache=str(caches[policy]), student=str(student_dir), out="unused", recal_context=context)
            model = GenRecal(adapter.load_model(student_dir), adapter, cache.head(), cfg).eval()
            losses[context, policy] = model(collate(examples, processor.tokenizer.pad_token_id, 0), 2)
    for k in ("l_s", "l_ar", "l_kl", "reg_ar", "reg_kl"):
        assert torch.equal(losses["none", "full"][k], losses["none", "none"][k]), k
    assert not torch.equal(losses["question", "full"]["reg_ar"], losses["question", "none"]["reg_ar"])


def test_a_reader_that_uses_no_context_row_never_reads_the_context_array(caches, tmp_path):
    """`iter_samples(context=False)` (training with --recal-context none, or stage 3) does not read a low-rank cache's
    `context` array at all, locally or over HTTP: with its shards corrupted, every sample still reads, its answer
    rows as they are, its compact rows absent. A reader that does use them fails on the same files."""
    from _http import serve

    ref = {s.id: s for s in open_cache(caches["lowrank"]).iter_samples()}
    broken = tmp_path / "broken"
    shutil.copytree(caches["lowrank"], broken)
    shards = [p for p in (broken / "features.zarr" / "context").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert shards
    for p in shards:  # same size (the manifest's size check passes), garbage bytes (the crc32c does not)
        p.write_bytes(b"\xff" * p.stat().st_size)
    with serve(broken) as (url, _):
        for where in (broken, url):
            for precision in ("float32", "stored"):
                got = list(open_cache(where).iter_samples(precision=precision, context=False))
                assert len(got) == len(ref)
                for s in got:
                    r = ref[s.id]
                    assert s.context is None and not (s.row_flags & FLAG_COMPACT).any()
                    np.testing.assert_array_equal(s.row_flags, r.row_flags & ~np.uint8(FLAG_COMPACT))
                    np.testing.assert_array_equal(s.hidden_tensor().float().numpy()[s.exact_rows],
                                                  r.hidden[r.exact_rows])
            with pytest.raises(CacheFormatError):
                list(open_cache(where).iter_samples(precision="stored"))


def test_steps_that_read_no_context_row_train_as_before_without_it(caches, student_dir):
    """The batches of a step that reads no context row (stage 3; stages 1-2 with --recal-context none or without
    the regularization pass) leave it out, and give the losses of batches that carry it, bit for bit."""
    from genrecal_train.batches import collate, make_example
    from genrecal_train.config import TrainConfig
    from genrecal_train.model import GenRecal

    adapter = adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    cache = open_cache(caches["lowrank"])
    samples = list(cache.iter_samples(precision="stored"))[:4]
    lean = list(cache.iter_samples(precision="stored", context=False))[:4]
    for kw, stage in (({"recal_context": "none"}, 2), ({"use_reg_pass": False}, 1), ({}, 3)):
        cfg = TrainConfig(cache=str(caches["lowrank"]), student=str(student_dir), out="unused", **kw)
        assert not cfg.reads_context(stage)
        losses = []
        for ss, context in ((samples, True), (lean, False)):
            batch = collate([make_example(s, adapter, processor, 2048, cache.teacher_tokenizer(), context)
                             for s in ss], processor.tokenizer.pad_token_id, 0)
            assert (batch.rows.teacher_question.shape[1] == 0) != context and bool(batch.rows.lowrank) == context
            torch.manual_seed(0)
            model = GenRecal(adapter.load_model(student_dir), adapter, cache.head(), cfg).eval()
            model.set_stage(stage)
            losses.append(model(batch, stage))
        assert losses[0].keys() == losses[1].keys()
        for k in losses[0]:
            assert torch.equal(losses[0][k], losses[1][k]), (kw, k)
    # the default's stages 1-2 read them: a batch made without them is refused, not trained on an empty prefix
    cfg = TrainConfig(cache=str(caches["lowrank"]), student=str(student_dir), out="unused")
    assert cfg.reads_context(1) and cfg.reads_context(2) and not cfg.reads_context(3)
    model = GenRecal(adapter.load_model(student_dir), adapter, cache.head(), cfg).eval()
    with pytest.raises(ValueError, match="reads the teacher's context rows"):
        model(batch, 2)
