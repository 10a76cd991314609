"""Issue 14, training: a non-finite loss stops the run (last good checkpoint kept), no usable sample is
an error (not an endless loop of warnings), data threads are joined, a restart logs every step once,
a mid-stage resume with another batch size or seed is refused, and a refused cache is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _caches import rewrite_cache

from genrecal_cache.io.prefetch import prefetch
from genrecal_cache.writer import SampleArrays
from genrecal_train.config import TrainConfig
from genrecal_train.errors import TrainError
from genrecal_train.trainer import train

REPO = Path(__file__).resolve().parents[1]


def _cfg(cache: Path, student: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), student=str(student), out=str(out), device="cpu", prefetch=2, batch_size=4,
                checkpoint_every=1000, stages=[1], max_steps=2)
    return TrainConfig(**(base | kw))


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "cli.train_cli", *args, "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    return line


@contextmanager
def _no_hang(seconds: int = 300):
    """Turn an endless loop (the behaviour being fixed) into a failure instead of a stuck suite."""
    def fail(*_):
        raise AssertionError(f"still running after {seconds} s: the run loops instead of failing")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- a non-finite loss --------------------------------------------------------------------------

def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, train_cache, student_dir):
    """An absurd learning rate blows the Recalibrator up after its first step: the run must stop at the
    first non-finite loss, non-zero, with the step-1 checkpoint as the latest one and no NaN logged."""
    out = tmp_path / "run"
    r = _train_cli("--cache", str(train_cache), "--student", str(student_dir), "--out", str(out), "--stages", "1",
                   "--max-steps", "6", "--batch-size", "4", "--checkpoint-every", "1", "--lr", "1e30",
                   "--lr-end", "1e30")
    assert r.returncode == 1, (r.stdout, r.stderr[-3000:])
    line = _error_line(r)
    assert "not finite" in line and "stopped before the optimizer step" in line, line
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(rec["loss"]) for rec in records)
    last_step = records[-1]["step"]
    assert f"stage 1 step {last_step + 1}: not finite" in line
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"stage1-step{last_step:07d}" and latest in line
    state = json.loads((out / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] == last_step and not (out / "final").exists()


# ---- no usable sample -----------------------------------------------------------------------------

def _cache_without_answers(src: Path, out: Path) -> Path:
    """The same samples and features, every answer mask empty (as a careless converter might write)."""
    return rewrite_cache(src, out, lambda s: SampleArrays(
        token_ids=s.token_ids, answer_mask=np.zeros_like(s.answer_mask), hidden=s.hidden, topk_ids=s.topk_ids,
        topk_logprobs=s.topk_logprobs))


def _student_dropping_answers(src: Path, out: Path) -> Path:
    """A student whose chat template leaves the assistant turns out: no answer can be located."""
    shutil.copytree(src, out)
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>{% endif %}{% endfor %}\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    (out / "chat_template.jinja").write_text(template)
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = out / name
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg.pop("chat_template", None)
            path.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("case", ["max-len-below-every-sample", "empty-answer-masks", "student-template-fails"])
def test_no_usable_sample_is_an_error_not_an_endless_loop(case, tmp_path, train_cache, student_dir):
    cache, student, kw, words = train_cache, student_dir, {}, ""
    if case == "max-len-below-every-sample":
        kw, words = {"max_len": 8}, "exceed max_len=8"
    elif case == "empty-answer-masks":
        cache, words = _cache_without_answers(train_cache, tmp_path / "cache"), "answer mask is empty"
    else:
        student, words = _student_dropping_answers(student_dir, tmp_path / "student"), "chat template"
    out = tmp_path / "run"
    with _no_hang(), pytest.raises(TrainError, match="none of the 32 'ok' samples of rank 0 can be used") as e:
        train(_cfg(cache, student, out, **kw))
    assert words in str(e.value), str(e.value)
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("genrecal-encode", "genrecal-readahead"))]


# ---- threads --------------------------------------------------------------------------------------

def test_closing_a_prefetch_joins_its_thread_and_closes_its_source():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = prefetch(endless(), 2)
    assert next(it) == 0
    it.close()
    # deterministic, no waiting: close() returned only after the producer finished and closed its source
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "genrecal-encode"]


def test_full_three_stage_run_with_vision_exits_cleanly(tmp_path, train_cache, student_dir):
    """The shape of run that aborted after "final student" (exit 134): stages 1,2,3, --train-vision,
    batch 16. Every data thread is joined before the interpreter exits."""
    out = tmp_path / "run"
    r = _train_cli("--cache", str(train_cache), "--student", str(student_dir), "--out", str(out), "--stages", "1,2,3",
                   "--max-steps", "2", "--batch-size", "16", "--train-vision")
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "terminate called" not in r.stderr and "final student" in r.stdout


# ---- restarts -------------------------------------------------------------------------------------

def test_a_restart_before_the_first_checkpoint_logs_every_step_once(tmp_path, train_cache, student_dir):
    out = tmp_path / "run"
    train(_cfg(train_cache, student_dir, out, max_steps=3))
    # what a kill before the first checkpoint leaves: metrics lines, config.json, no checkpoint
    shutil.rmtree(out / "checkpoints")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    train(_cfg(train_cache, student_dir, out, max_steps=3, resume=True))
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == [(1, 1), (1, 2), (1, 3)]


@pytest.mark.parametrize("change", [{"batch_size": 2}, {"seed": 7}])
def test_resuming_mid_stage_with_another_batch_size_or_seed_is_refused(change, tmp_path, train_cache, student_dir):
    out = tmp_path / "run"
    train(_cfg(train_cache, student_dir, out, max_steps=3, checkpoint_every=2))
    # the state after a kill between steps 2 and 3: `latest` names the mid-stage checkpoint
    (out / "checkpoints" / "latest").write_text("stage1-step0000002")
    flag = next(iter(change))
    with pytest.raises(TrainError, match=rf"stage1-step0000002 is stage 1 step 2 of a run with "
                                         rf"--{flag.replace('_', '-')} \d+ \(this run: {change[flag]}\)"):
        train(_cfg(train_cache, student_dir, out, max_steps=3, resume=True, **change))
    train(_cfg(train_cache, student_dir, out, max_steps=3, resume=True))  # the same settings continue it
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == [(1, 1), (1, 2), (1, 3)]


# ---- CLI ------------------------------------------------------------------------------------------

def test_train_cli_on_a_refused_cache_prints_one_line_and_exits_2(tmp_path, train_cache, student_dir):
    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)
    (cache / "manifest.json").unlink()  # an extraction running (or interrupted) here: a journal, no manifest
    (cache / "_progress.json").write_text("{}")
    r = _train_cli("--cache", str(cache), "--student", str(student_dir), "--out", str(tmp_path / "run"),
                   "--max-steps", "1")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "extraction is running here or was interrupted" in _error_line(r)
