"""Loss rows off the step (issue 24): `make_example` computes every index of a sample once, on the data
thread; `GenRecal` opens no cache and its forward only gathers with `Example.rows`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genrecal_cache import open_cache
from genrecal_cache.families import adapter_for
from genrecal_train.align import student_answer_rows, student_question_index, teacher_rows
from genrecal_train.config import TrainConfig
from genrecal_train.data import CacheStream, collate, make_example
from genrecal_train.model import GenRecal


def _examples(cache_dir: Path, student_dir: Path, n: int, aligned: bool = True):
    cache, adapter = open_cache(cache_dir), adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    tok = cache.teacher_tokenizer() if aligned else None
    return [make_example(cache[i], adapter, processor, 2048, tok) for i in range(n)], processor


@torch.no_grad()
def test_genrecal_opens_no_cache_and_reads_rows_made_on_the_data_thread(student_dir: Path, train_cache: Path):
    examples, processor = _examples(train_cache, student_dir, 4)
    cfg = TrainConfig(cache="/nonexistent/cache", student=str(student_dir), out="unused")  # never opened
    adapter = adapter_for(student_dir)
    torch.manual_seed(0)
    model = GenRecal(adapter.load_model(student_dir), adapter, open_cache(train_cache).head(), cfg).eval()
    batch = collate(examples, processor.tokenizer.pad_token_id, 0)
    for stage in (1, 2):
        out = model(batch, stage)
        assert torch.isfinite(out["loss"]) and out["l_ar"] > 0
    # the rows are those of the per-sample functions (the path forward took before)
    s_tok = processor.tokenizer
    t_tok = open_cache(train_cache).teacher_tokenizer()
    for e in examples:
        q, a, tgt = teacher_rows(e.teacher_rows, e.teacher_ids, e.teacher_spans)
        assert torch.equal(e.rows.teacher_question, q) and torch.equal(e.rows.teacher_answer, a)
        assert torch.equal(e.rows.targets, tgt)
        assert torch.equal(e.rows.student_question, student_question_index(e.student_spans))
        want = student_answer_rows(e.student.input_ids, e.student_spans, e.teacher_ids, e.teacher_spans, s_tok, t_tok)
        assert torch.equal(e.rows.student_aligned.states, want)
    # examples made without the teacher's tokenizer serve the paper's main pass only
    bare, _ = _examples(train_cache, student_dir, 2, aligned=False)
    with pytest.raises(ValueError, match=r"make_example\(\.\.\., teacher_tokenizer=\.\.\.\)"):
        model(collate(bare, processor.tokenizer.pad_token_id, 0), 1)
    model.cfg.main_pass_answer = "teacher"
    assert torch.isfinite(model(collate(bare, processor.tokenizer.pad_token_id, 0), 1)["loss"])


def test_stream_examples_carry_the_rows_of_make_example(student_dir: Path, train_cache: Path):
    cache, adapter = open_cache(train_cache), adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    tok = cache.teacher_tokenizer()
    stream = CacheStream(cache, adapter, processor, batch_size=2, max_len=2048, prefetch=2, teacher_tokenizer=tok)
    try:
        batch = next(stream.batches())
    finally:
        stream.close()
    for e in batch.examples:
        ref = make_example(cache[e.index], adapter, processor, 2048, tok).rows
        assert torch.equal(e.rows.student_aligned.states, ref.student_aligned.states)
        assert torch.equal(e.rows.answer_start.mask, ref.answer_start.mask)
