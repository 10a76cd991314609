"""Pieces of the quality benchmark (bench/quality.py) that are cheap to check: the ULD loss, the
main pass predicting each answer's first token from the student, and the report built from
(real) per-run results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from genrecal_cache.families import adapter_for
from genrecal_cache.reader import TeacherCache
from genrecal_train.config import TrainConfig
from genrecal_train.data import collate, make_example
from genrecal_train.model import GenRecal
from genrecal_train.uld import sorted_wasserstein

REPO = Path(__file__).resolve().parents[1]


def test_sorted_wasserstein_is_vocab_order_free():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 7), -1)
    perm = p[:, torch.randperm(7)]
    assert torch.allclose(sorted_wasserstein(p, perm), torch.zeros(3), atol=1e-6)
    # another vocabulary size: the smaller side is zero-padded
    q = torch.cat([perm, torch.zeros(3, 5)], -1)
    assert torch.allclose(sorted_wasserstein(p, q), torch.zeros(3), atol=1e-6)
    one_hot, uniform = torch.eye(4)[:1], torch.full((1, 4), 0.25)
    assert torch.allclose(sorted_wasserstein(one_hot, uniform), torch.tensor([1.5]))


def _setup(student_dir: Path, cache_dir: Path, cls, **kw):
    cfg = TrainConfig(cache=str(cache_dir), student=str(student_dir), out="unused", **kw)
    adapter = adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    cache = TeacherCache.open(cache_dir)
    torch.manual_seed(0)
    model = cls(adapter.load_model(student_dir), adapter, cache.head(), cfg).eval()
    examples = [make_example(cache[i], adapter, processor, 2048) for i in range(4)]
    return model, examples, processor.tokenizer.pad_token_id


@torch.no_grad()
def test_main_pass_predicts_the_first_answer_token_from_the_student(student_dir, train_cache):
    """The teacher state before an answer already predicts it: the main pass must not read it (the
    Recalibrator would ignore the student), the regularization pass must (it is teacher-only)."""
    model, examples, pad = _setup(student_dir, train_cache, GenRecal)
    base = model(collate(examples, pad, 0), 1)
    for e in examples:  # scramble the teacher state before each answer span
        for a, _ in e.teacher_spans:
            e.teacher_hidden[a - 1] = torch.randn_like(e.teacher_hidden[a - 1]) * 10
    changed = model(collate(examples, pad, 0), 1)
    # l_kl's target (the teacher's own distribution) is read from that state, so compare l_ar only
    assert torch.allclose(base["l_ar"], changed["l_ar"], atol=1e-6)
    assert not torch.allclose(base["reg_ar"], changed["reg_ar"], atol=1e-3)
    # ... and the student's state before its answer does reach the main pass's first-token row
    model.student.get_input_embeddings().weight.mul_(3.0)
    assert not torch.allclose(model(collate(examples, pad, 0), 1)["l_ar"], base["l_ar"], atol=1e-3)


@torch.no_grad()
def test_uld_stage3_adds_its_term(student_dir, train_cache):
    model, examples, pad = _setup(student_dir, train_cache, GenRecal, w_uld=0.5)
    model.set_stage(3)
    out = model(collate(examples, pad, 0), 3)
    assert set(out) == {"l_s", "l_uld", "loss"}
    assert 0 < float(out["l_uld"]) < 2 and torch.isclose(out["loss"], out["l_s"] + 0.5 * out["l_uld"])
    model.cfg.w_uld = 0.0  # off by default: plain SFT
    assert set(model(collate(examples, pad, 0), 3)) == {"l_s", "loss"}


def _quality_module():
    """bench/quality.py, imported from its file (bench/ is not a package)."""
    if "quality_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quality_bench", REPO / "bench" / "quality.py")
        q = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = q  # dataclasses look their module up while the class is built
        spec.loader.exec_module(q)
    return sys.modules["quality_bench"]


def test_report_from_run_results(tmp_path):
    """summarize/plots turn per-run eval reports (+ metrics.jsonl) into the table and two PNGs."""
    q = _quality_module()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"stage": st, "step": i + 1, "l_s": 1.0 / (i + 1), "l_ar": 2.0})
                                 for st in (1, 3) for i in range(3)))
    per = lambda a: {"digit": {"n": 10, "correct": int(10 * a), "accuracy": a}}  # noqa: E731
    results = {"setup": {"arms": ["sft", "genrecal"], "steps": 6, "batch_size": 2, "seeds": [0, 1]},
               "teacher": {"eval": {"accuracy": 0.9, "per_type": per(0.9)}},
               "same_data_student": {"eval": {"accuracy": 0.8, "per_type": per(0.8)}},
               "runs": [{"arm": arm, "seed": s, "accuracy": acc, "per_type": per(acc), "metrics": str(metrics)}
                        for arm, accs in (("sft", (0.4, 0.5)), ("genrecal", (0.6, 0.7))) for s, acc in zip((0, 1), accs)]}
    table, summary = q.summarize(results)
    assert "| student SFT only | 45.0 ± 7.1 | 2 | 45.0 ± 7.1 |" in table
    assert "| student trained like the teacher, on its data | 80.0 | 1 | 80.0 |" in table
    assert summary["genrecal"]["mean"] == pytest.approx(0.65)
    pngs = q.plots(results, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in pngs)


def test_an_out_folder_keeps_its_data_and_model_settings(tmp_path):
    """Splits, inits and the cache in --out are reused as they are: other data/model settings are refused,
    other arm settings are not (those runs are redone)."""
    q = _quality_module()
    q.check_inputs(tmp_path, q.Setup())
    q.check_inputs(tmp_path, q.Setup(steps=10, warmup=0.0, seeds=[4]))  # arm knobs: fine
    with pytest.raises(SystemExit, match=r"teacher_steps: 1600 -> 800.*fresh --out"):
        q.check_inputs(tmp_path, q.Setup(teacher_steps=800))
    with pytest.raises(SystemExit, match="n_digits_train"):
        q.check_inputs(tmp_path, q.Setup(n_digits_train=5))
