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
from genrecal_train.batches import CacheStream, collate, make_example
from genrecal_train.losses import chunked_ce
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


def _reference_forward(model: GenRecal, batch, stage: int) -> dict[str, torch.Tensor]:
    """Stages 1-2 as GenRecal computed them before the step was made lean (main at 87c5cf8): gathers and pads
    per example in `forward`, one answer-loss call per pass (the teacher's log-probabilities computed by each),
    every loss chunk checkpointed. The reference the lean step must equal bit for bit."""
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence
    from torch.utils.checkpoint import checkpoint

    head_logits = lambda head, x, post_norm: head.logits(x, post_norm=post_norm).float()  # noqa: E731 (fp32 head)
    log_probs = lambda logits, T=1.0: F.log_softmax(logits if T == 1.0 else logits / T, dim=-1)  # noqa: E731

    def pad(rows):
        mask = pad_sequence([torch.ones(r.shape[0], dtype=torch.bool) for r in rows], batch_first=True)
        return pad_sequence(rows, batch_first=True), mask

    def answer_losses(head, r, z, tgt, T, chunk):
        def fn(r, z, t):
            logits = head_logits(head, r, False)
            logp = log_probs(logits)
            ce = F.nll_loss(logp, t, ignore_index=-100, reduction="sum")
            s = logp if T == 1.0 else log_probs(logits, T)
            kl = F.kl_div(s, log_probs(head_logits(head, z, True), T), log_target=True, reduction="none").sum(-1)
            return torch.stack([ce, (kl * (t != -100)).sum()])
        total = None
        for s in range(0, max(r.shape[0], 1), chunk):
            out = checkpoint(fn, r[s:s + chunk], z[s:s + chunk].detach(), tgt[s:s + chunk], use_reentrant=False)
            total = out if total is None else total + out
        n = (tgt != -100).sum().clamp(min=1)
        return total[0] / n, total[1] * T ** 2 / n

    cfg = model.cfg
    hs = model.student_states(dict(batch.student_inputs))
    losses, total = {}, hs.new_zeros(())
    if stage == 2:
        lm = model.adapter.lm_head(model.student)
        losses["l_s"] = chunked_ce(hs[:, :-1], lm.weight, batch.student_labels[:, 1:], chunk=cfg.loss_chunk,
                                   lm_head_bias=lm.bias)
        total = total + cfg.w_student * losses["l_s"]
    z_qs, z_al, z_ql, targets, s_al, s_rows = [], [], [], [], [], []
    for i, e in enumerate(batch.examples):
        r, th = e.rows, e.teacher_hidden.float()
        z_qs.append(hs[i, r.student_question])
        z_al.append(th[r.teacher_answer])
        z_ql.append(th[r.teacher_question])
        targets.append(r.targets)
        placed = r.answer_start if cfg.main_pass_answer == "teacher" else r.student_aligned
        n = placed.mask.shape[0]
        s_al.append(hs.new_zeros(n, hs.shape[-1]).index_copy(0, placed.rows, hs[i][placed.states]))
        s_rows.append(placed.mask)
    za, a_mask = pad(z_al)
    zq, q_mask = pad(z_qs)
    zl, l_mask = pad(z_ql) if cfg.use_reg_pass else (None, None)
    r_main, r_reg = model.recalibrator(za, a_mask, z_qs=zq, qs_mask=q_mask, z_ql=zl, ql_mask=l_mask,
                                       s_al=pad(s_al)[0], s_mask=pad(s_rows)[0])
    tgt, z_t = torch.cat(targets), za[a_mask]
    T, chunk = cfg.temperature, cfg.loss_chunk
    losses["l_ar"], losses["l_kl"] = answer_losses(model.head, r_main[a_mask], z_t, tgt, T, chunk)
    total = total + cfg.w_ar * losses["l_ar"] + cfg.w_kl * losses["l_kl"]
    if r_reg is not None:
        losses["reg_ar"], losses["reg_kl"] = answer_losses(model.head, r_reg[a_mask], z_t, tgt, T, chunk)
        total = total + cfg.w_ar * losses["reg_ar"] + cfg.w_kl * losses["reg_kl"]
    losses["loss"] = total
    return losses


@pytest.mark.parametrize("mode,reg,chunk,temperature", [("student_aligned", True, 512, 1.0),
                                                        ("teacher", True, 7, 2.0),
                                                        ("student_aligned", False, 7, 1.0)])
def test_lean_step_is_bit_identical_to_the_reference(mode: str, reg: bool, chunk: int, temperature: float,
                                                     student_dir: Path, train_cache: Path):
    """Rows padded on the data thread, both passes' answer losses in one call sharing the teacher's
    log-probabilities, a lone chunk not recomputed: losses, gradients and the parameters after two AdamW steps
    equal those of the per-example reference exactly (torch.equal: the quality suite's numbers cannot move)."""
    examples, processor = _examples(train_cache, student_dir, 6)
    batches = [collate(examples[j:j + 3], processor.tokenizer.pad_token_id, 0) for j in (0, 3)]
    cfg = TrainConfig(cache=str(train_cache), student=str(student_dir), out="unused", main_pass_answer=mode,
                      use_reg_pass=reg, loss_chunk=chunk, temperature=temperature)
    adapter = adapter_for(student_dir)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(GenRecal(adapter.load_model(student_dir), adapter, open_cache(train_cache).head(), cfg).train())
    lean, ref = models
    for stage in (1, 2):
        opts = [torch.optim.AdamW(m.set_stage(stage), lr=1e-3) for m in models]
        for batch in batches:
            got, want = lean(batch, stage), _reference_forward(ref, batch, stage)
            assert got.keys() == want.keys()
            for k in got:
                assert torch.equal(got[k], want[k]), (stage, k, got[k], want[k])
            got["loss"].backward()
            want["loss"].backward()
            for (name, p), q in zip(lean.named_parameters(), ref.parameters()):
                assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
    for (name, p), q in zip(lean.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


@torch.no_grad()
def test_recal_context_none_recalibrates_the_answer_rows_alone(student_dir: Path, train_cache: Path):
    """recal_context='none': each pass is its answer rows alone (the main pass's student-aligned rows, the
    regularization pass's Proj-pre(z_al)), so L_ar of both passes equals the Recalibrator's blocks run on each
    sample's answer rows by themselves, positions 0..n-1; the default's losses differ (it attends to the question)."""
    examples, processor = _examples(train_cache, student_dir, 3)
    batch = collate(examples, processor.tokenizer.pad_token_id, 0)
    adapter = adapter_for(student_dir)
    got = {}
    for context in ("none", "question"):
        torch.manual_seed(0)
        cfg = TrainConfig(cache=str(train_cache), student=str(student_dir), out="unused", recal_context=context)
        model = GenRecal(adapter.load_model(student_dir), adapter, open_cache(train_cache).head(), cfg).eval()
        got[context] = model(batch, 1)
    rec, head = model.recalibrator, model.head  # the same weights in both (same seed)
    hs = model.student_states(dict(batch.student_inputs))
    ce = {"l_ar": 0.0, "reg_ar": 0.0}
    n = 0
    for i, e in enumerate(batch.examples):
        r, placed = e.rows, e.rows.student_aligned
        answer = rec.proj_pre(e.teacher_hidden.float()[r.teacher_answer])
        student = answer.new_zeros(answer.shape).index_copy(0, placed.rows, hs[i][placed.states])
        main = torch.where(placed.mask[:, None], student, answer)
        for name, x in (("l_ar", main), ("reg_ar", answer)):
            out = rec.norm(rec.proj_post(rec.blocks(x[None])[0]))
            logits = head.logits(out, post_norm=False).float()
            ce[name] += torch.nn.functional.cross_entropy(logits, r.targets, ignore_index=-100, reduction="sum")
        n += int((r.targets != -100).sum())
    for name in ce:
        torch.testing.assert_close(got["none"][name], ce[name] / n, rtol=1e-5, atol=1e-6)
        assert abs(float(got["question"][name] - got["none"][name])) > 1e-4, name
    # stage 2 trains through it: the student's answer states carry L_ar/L_kl's gradient to its body
    model.cfg.recal_context = "none"
    model.set_stage(2)
    with torch.enable_grad():
        out = model(batch, 2)
        (out["l_ar"] + out["l_kl"]).backward()
    body = [p.grad for n, p in model.student.named_parameters() if p.requires_grad and "layers" in n]
    assert body and all(g is not None and torch.isfinite(g).all() for g in body)
    assert any(g.abs().sum() > 0 for g in body)
