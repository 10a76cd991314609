"""The teacher's tokenizer travels in the cache (`teacher_tokenizer/`): a cache is trained from with the
default main pass (student_aligned, which aligns answers by text) after the teacher folder is gone, over
HTTP, in parts and merged; verify checks its files; an older cache without it falls back to the
teacher the manifest records, and gives one clear error when that is gone too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _http import serve
from genrecal_cache.demo_data import write_demo_dataset
from genrecal_cache.extract import ExtractConfig, extract
from genrecal_cache.format.manifest import MANIFEST_NAME, TOKENIZER_DIR, CacheFormatError, Manifest
from genrecal_cache.format.tokenizer import tokenizer_sha256
from genrecal_cache.info import format_summary, summarize
from genrecal_cache.io.pull import pull
from genrecal_cache.merge import merge
from genrecal_cache import open_cache
from genrecal_cache.verify import verify
from genrecal_train.config import TrainConfig
from genrecal_train.preflight import load_teacher_tokenizer
from genrecal_train.trainer import train


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> dict[str, Path]:
    """Caches (single and in 2 parts) of a copy of the tiny teacher; the copy is then moved away."""
    root = tmp_path_factory.mktemp("cache_tokenizer")
    teacher = root / "teacher"
    shutil.copytree(teacher_dir, teacher)
    data = write_demo_dataset(root / "data", n=8, seed=3)
    for out, parts in (("cache", 1), ("parts", 2)):
        for i in range(parts):
            extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(root / out), backend="transformers",
                                  hidden_codec="float32", progress=False, num_shards=parts, shard_index=i))
    moved = teacher.rename(root / "teacher-moved")
    return {"cache": root / "cache", "parts": root / "parts", "teacher": teacher, "moved": moved}


def _old_style(cache: Path, out: Path) -> Path:
    """A copy of `cache` as genrecal wrote caches before it stored the tokenizer: no folder, no entries (and no
    file sizes, which came later)."""
    shutil.copytree(cache, out)
    shutil.rmtree(out / TOKENIZER_DIR)
    m = Manifest.from_json((out / MANIFEST_NAME).read_bytes())
    m.checksums = {rel: d for rel, d in m.checksums.items() if not rel.startswith(f"{TOKENIZER_DIR}/")}
    m.extra.pop("sizes")
    (out / MANIFEST_NAME).write_bytes(m.to_json().encode())
    return out


def _cfg(cache: Path | str, student_dir: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**(dict(cache=str(cache), student=str(student_dir), out=str(out), device="cpu", prefetch=2,
                               batch_size=4, checkpoint_every=1000) | kw))


def _teacher_tokenizer(cfg: TrainConfig):
    """What the trainer does: the teacher tokenizer of the cache it has open."""
    with open_cache(cfg.cache) as cache:
        return load_teacher_tokenizer(cfg, cache)


def test_extraction_stores_the_tokenizer_listed_with_checksums(made, teacher):
    cache = made["cache"]
    listed = {rel for rel in json.loads((cache / MANIFEST_NAME).read_text())["checksums"]
              if rel.startswith(f"{TOKENIZER_DIR}/")}
    assert {f"{TOKENIZER_DIR}/tokenizer.json", f"{TOKENIZER_DIR}/tokenizer_config.json",
            f"{TOKENIZER_DIR}/chat_template.jinja"} <= listed
    assert listed == {p.relative_to(cache).as_posix() for p in (cache / TOKENIZER_DIR).rglob("*") if p.is_file()}
    assert verify(cache) == []
    with open_cache(cache) as tc:
        assert f"stored in {TOKENIZER_DIR}/ (chat_template.jinja, tokenizer.json" in format_summary(summarize(tc))
        tok = tc.teacher_tokenizer()
        assert tokenizer_sha256(tok) == tc.manifest.tokenizer_sha256 == tokenizer_sha256(teacher.processor.tokenizer)
        assert tok.chat_template == teacher.processor.chat_template  # the template that rendered the cache
        ids = teacher.processor.tokenizer("there are three red squares")["input_ids"]
        assert tok.decode(ids) == teacher.processor.tokenizer.decode(ids)


def test_student_aligned_trains_without_the_teacher_folder(made, student_dir, tmp_path):
    assert not made["teacher"].exists()
    final = train(_cfg(made["cache"], student_dir, tmp_path / "run", stages=[1, 2], max_steps=2,
                       main_pass_answer="student_aligned"))
    assert (final / "config.json").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_old_cache_without_the_teacher_is_one_clear_error(made, student_dir, tmp_path):
    old = _old_style(made["cache"], tmp_path / "old")
    assert verify(old) == []  # consistent: an older cache is a sound cache
    with open_cache(old) as tc:
        assert tc.tokenizer_files() == {} and tc.teacher_tokenizer() is None
        assert "not stored (an older cache" in format_summary(summarize(tc))
    with pytest.raises(ValueError) as e:
        train(_cfg(old, student_dir, tmp_path / "run", stages=[1], max_steps=1))
    msg = str(e.value)
    assert f"cache {old} holds no teacher tokenizer" in msg and str(made["teacher"]) in msg
    assert "--main-pass-answer teacher" in msg and "--teacher-tokenizer" in msg and "re-extract" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # the fix: the teacher's tokenizer from elsewhere (checked against the cache's hash), or the paper's rows
    tok = _teacher_tokenizer(_cfg(old, student_dir, tmp_path / "x", teacher_tokenizer=str(made["moved"])))
    assert tokenizer_sha256(tok) == Manifest.from_json((old / MANIFEST_NAME).read_bytes()).tokenizer_sha256
    train(_cfg(old, student_dir, tmp_path / "teacher-rows", stages=[1], max_steps=1, main_pass_answer="teacher"))


def test_old_cache_falls_back_to_the_recorded_teacher(made, student_dir, tmp_path):
    old = _old_style(made["cache"], tmp_path / "old")
    made["moved"].rename(made["teacher"])  # the teacher is back where the manifest says
    try:
        tok = _teacher_tokenizer(_cfg(old, student_dir, tmp_path / "run"))
    finally:
        made["teacher"].rename(made["moved"])
    assert tokenizer_sha256(tok) == Manifest.from_json((old / MANIFEST_NAME).read_bytes()).tokenizer_sha256


def test_verify_and_the_trainer_refuse_a_tampered_tokenizer_file(made, student_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(made["cache"], bad)
    path = bad / TOKENIZER_DIR / "tokenizer.json"
    path.write_bytes(path.read_bytes().replace(b'"', b' "', 1))  # one byte more: the same JSON, another file
    assert any(f.startswith(f"{TOKENIZER_DIR}/tokenizer.json: size mismatch") for f in verify(bad)), verify(bad)
    with pytest.raises(CacheFormatError, match=f"{TOKENIZER_DIR}/tokenizer.json: size mismatch"):
        _teacher_tokenizer(_cfg(bad, student_dir, tmp_path / "run"))
    # a stray file in the folder is reported too
    shutil.copytree(made["cache"], tmp_path / "stray")
    (tmp_path / "stray" / TOKENIZER_DIR / "added_tokens.json").write_text("{}")
    assert any(f.startswith(f"{TOKENIZER_DIR}/added_tokens.json: stored but not listed") for f in verify(tmp_path / "stray"))


def test_parts_merge_pull_and_http_carry_the_tokenizer(made, tmp_path):
    with open_cache(made["cache"]) as tc:
        want = tc.tokenizer_files()
    with open_cache(made["parts"]) as parts:
        assert len(parts.names) == 2 and parts.tokenizer_files() == want
        assert summarize(parts)["tokenizer_files"] == sorted(want)
        assert tokenizer_sha256(parts.teacher_tokenizer()) == parts.manifest.tokenizer_sha256
    assert verify(made["parts"]) == []
    merged = tmp_path / "merged"
    merge(made["parts"], merged)
    assert verify(merged) == []
    with open_cache(merged) as tc:
        assert tc.tokenizer_files() == want
    with serve(made["cache"]) as (url, _):
        with open_cache(url, local_cache=tmp_path / "lc") as remote:  # the head's read-through mirror
            assert remote.tokenizer_files() == want
            assert tokenizer_sha256(remote.teacher_tokenizer()) == remote.manifest.tokenizer_sha256
        mirrored = list((tmp_path / "lc").rglob(f"{TOKENIZER_DIR}/tokenizer.json"))
        assert len(mirrored) == 1 and mirrored[0].read_bytes() == want["tokenizer.json"]
        with open_cache(url) as remote:  # no local copy: read over HTTP, checked by sha256
            assert remote.tokenizer_files() == want
        report = pull(url, tmp_path / "pulled")
    assert (tmp_path / "pulled" / TOKENIZER_DIR / "tokenizer.json").read_bytes() == want["tokenizer.json"]
    assert report.files == len(json.loads((made["cache"] / MANIFEST_NAME).read_text())["checksums"])
    assert verify(tmp_path / "pulled") == []
