"""GenRecal as one module: student + Recalibrator + frozen teacher head; `forward(batch, stage)` -> losses.

Which features go where (per sample; spans are answer-content token ranges, one per turn):
    teacher: answer token p is predicted by the state at p-1, so z_al = T[a-1 : b-1] for every span
             [a, b) (targets gt_l = ids[a:b]); z_ql = every other teacher state before the last one used
             that the cache stores (a role-aware cache may store context rows compactly, only the text
             rows, or none: then the regularization pass reads the answer rows alone; docs/cache-format.md).
    student: z_qs = the student's states outside its answer spans, before the end of its last span.
    main pass  r_al  = Rec([z_qs, answer rows]),  regularization pass r_al' = Rec([Proj-pre(z_ql), Proj-pre(z_al)])
The main pass's answer rows (`TrainConfig.main_pass_answer`):
    "student_aligned" (the default; better on the quality suite, docs/method.md): for each teacher answer token, the *student's* state that predicts the
        same text: the state after the student's last answer token ending at or before where the teacher
        token starts (character offsets, `student_answer_rows`), in student space (no Proj-pre). Every
        answer token's loss then reaches the student through its own answer states.
    "teacher" (the paper's formulation): Proj-pre(z_al), except the row predicting each span's first token,
        which is the student's last question state (`answer_start_rows`): T[a-1] already predicts the answer.
        Every later row T[p] already predicts token p+1, so the Recalibrator can read the rest of the
        answer off the teacher; the student's answer states get no gradient from L_ar/L_kl at all
        (docs/method.md, "How our default differs from the paper").
Multi-turn samples put all question tokens before all answer tokens (the paper has one turn).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from genrecal_cache.families import FamilyAdapter
from genrecal_cache.format.head import TeacherHead
from genrecal_train.config import TrainConfig
from genrecal_train.data import Batch, Example
from genrecal_train.losses import answer_losses, chunked_ce
from genrecal_train.preflight import load_teacher_tokenizer
from genrecal_train.recalibrator import Recalibrator
from genrecal_train.uld import uld_loss

__all__ = ["GenRecal", "answer_char_ends", "answer_start_rows", "student_answer_rows", "student_question_index",
           "teacher_rows"]


def _pad_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad a ragged list of [L_i, d] into [B, L, d] plus its bool validity mask."""
    x = pad_sequence(rows, batch_first=True)
    mask = pad_sequence([torch.ones(r.shape[0], dtype=torch.bool, device=r.device) for r in rows], batch_first=True)
    return x, mask


def teacher_rows(e: Example) -> tuple[Tensor, Tensor, Tensor]:
    """(question-state index, answer-state index, answer target ids) in the teacher's tokens."""
    ans = torch.cat([torch.arange(a - 1, b - 1) for a, b in e.teacher_spans])
    keep = e.teacher_rows[:int(ans.max()) + 1].clone()
    keep[ans] = False
    targets = torch.cat([e.teacher_ids[a:b] for a, b in e.teacher_spans])
    return keep.nonzero().squeeze(1), ans, targets


def answer_start_rows(e: Example) -> tuple[Tensor, Tensor]:
    """(index in z_al's layout of the row predicting each span's first answer token, index of the
    student state before that answer).

    In the main pass the question is the student's, so its first answer token is predicted from the
    student's last question state (in student space: Proj-pre is not applied), not from the teacher
    state T[a-1]: that state already predicts the answer, and reading it off lets the Recalibrator
    ignore the student (docs/benchmarks.md, quality, "How we got here", item 1)."""
    lengths = torch.tensor([b - a for a, b in e.teacher_spans])
    rows = torch.cumsum(lengths, 0) - lengths
    return rows, torch.tensor([a - 1 for a, _ in e.student_spans])


def answer_char_ends(tokenizer: Any, ids: Tensor) -> list[int]:
    """Where each token of one answer span ends, in characters of the decoded span (leading space dropped):
    for token k, the length of the text that decoding ids[:k+1] gives, so exact for any tokenizer, including
    byte-level BPE pieces of one character and tokenizers that glue a space onto the next word.

    Linear in the span: token k's text is read off the decoding of [token k-1, token k] past the decoding
    of token k-1 alone (one token of context keeps first-token effects, such as a stripped leading space,
    out of it), both decoded for the whole span in one batch. Decoders join bytes across tokens, so the
    window reaches back while a character is incomplete (U+FFFD) or the token before decodes to part of
    one: to the start of the character in byte-level BPE, of the run of byte tokens with byte fallback
    (sentencepiece-style tokenizers decode such a run as one unit)."""
    ids = ids.tolist()
    n = len(ids)
    if n == 0:
        return []
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    alone = tokenizer.batch_decode([[i] for i in ids], **kw)
    pairs = tokenizer.batch_decode([ids[k - 1:k + 1] for k in range(1, n)], **kw) if n > 1 else []
    ends, done, start = [], 0, 0  # `done` characters end before token `start`, where the open window begins
    for k in range(n):
        ctx = alone[start - 1] if start > 0 else ""
        if start == k:
            text = pairs[k - 1] if k > 0 else alone[0]
        else:
            text = tokenizer.decode(ids[max(start - 1, 0):k + 1], **kw)
        if not text.startswith(ctx):  # a decoder that rewrites the context: read the whole prefix instead
            text, ctx, done, start = tokenizer.decode(ids[:k + 1], **kw), "", 0, 0
        ends.append(done + len(text) - len(ctx))
        if "\ufffd" not in alone[k] and not text.endswith("\ufffd"):  # nothing pending: close the window
            done, start = ends[-1], k + 1
    text = tokenizer.decode(ids, **kw)
    lead = len(text) - len(text.lstrip())
    return [max(0, e - lead) for e in ends]


def student_answer_rows(e: Example, student_tokenizer: Any, teacher_tokenizer: Any) -> Tensor:
    """Index of the student state that predicts each teacher answer token, in z_al's layout.

    Teacher token j of a span starts at character c_j of the answer; the student state that predicts the
    text from c_j on is the one after the student's last answer token ending at or before c_j (its last
    question state when there is none). A teacher token inside a longer student token thus shares the
    state before that student token: the Recalibrator tells them apart by position."""
    rows = []
    for (ta, tb), (sa, sb) in zip(e.teacher_spans, e.student_spans):
        t_ends = answer_char_ends(teacher_tokenizer, e.teacher_ids[ta:tb])
        s_ends = torch.tensor(answer_char_ends(student_tokenizer, e.student.input_ids[sa:sb]))
        rows += [sa - 1 + int((s_ends <= c).sum()) for c in [0] + t_ends[:-1]]
    return torch.tensor(rows, dtype=torch.long)


def student_question_index(e: Example) -> Tensor:
    end = e.student_spans[-1][1]
    keep = torch.ones(end, dtype=torch.bool)
    for a, b in e.student_spans:
        keep[a:b] = False
    return keep.nonzero().squeeze(1)


class GenRecal(nn.Module):
    def __init__(self, student: nn.Module, adapter: FamilyAdapter, head: TeacherHead, cfg: TrainConfig,
                 tokenizers: tuple[Any, Any] | None = None):
        """`tokenizers`: (student's, teacher's), used by main_pass_answer='student_aligned'; loaded from
        cfg.student and the cache's teacher (`load_teacher_tokenizer`) when not given and stage 1 or 2 runs."""
        super().__init__()
        self.student, self.adapter, self.head, self.cfg = student, adapter, head.requires_grad_(False), cfg
        if cfg.main_pass_answer not in ("teacher", "student_aligned"):
            raise ValueError(f"main_pass_answer={cfg.main_pass_answer!r}: use 'student_aligned' or 'teacher'")
        self.tokenizers = tokenizers
        if cfg.main_pass_answer == "student_aligned" and tokenizers is None and {1, 2} & set(cfg.stages):
            self.tokenizers = (adapter.load_processor(cfg.student).tokenizer, load_teacher_tokenizer(cfg))
        # Built where the student is: on the meta device too for an FSDP rank that gets its weights from rank 0
        on_meta = next(student.parameters()).is_meta
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            self.recalibrator = Recalibrator.from_student(
                student, d_teacher=head.hidden_size, num_layers=cfg.recal_layers,
                decoder_layer_cls=adapter.decoder_layer_class(student), text_config=adapter.text_config(student),
                rotary_factory=adapter.rotary_factory(student))
        if cfg.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        self.stage = 1

    def set_stage(self, stage: int) -> list[nn.Parameter]:
        """Freeze/unfreeze for a stage and return the trainable parameters (in a fixed order)."""
        self.stage = stage
        self.requires_grad_(False)
        if stage in (1, 2) and not (stage == 2 and self.cfg.freeze_recalibrator_in_stage2):
            self.recalibrator.requires_grad_(True)
        if stage in (2, 3):
            vision = () if self.cfg.train_vision else tuple(self.adapter.vision_parameter_prefixes(self.student))
            for name, p in self.student.named_parameters():
                p.requires_grad_(not name.startswith(vision))
        return [p for p in self.parameters() if p.requires_grad]

    def student_states(self, inputs: dict[str, Tensor]) -> Tensor:
        """Post-norm last hidden states of the student body [B, Ls, ds] (no graph in stage 1)."""
        inputs = dict(inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.student.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage != 1):
            return self.student.model(**inputs, use_cache=False).last_hidden_state

    def forward(self, batch: Batch, stage: int | None = None) -> dict[str, Tensor]:
        stage = self.stage if stage is None else stage
        dev = self.head.lm_head_weight.device
        hs = self.student_states({k: v.to(dev) for k, v in batch.student_inputs.items()})
        losses: dict[str, Tensor] = {}
        total = hs.new_zeros(())
        if stage in (2, 3):
            labels = batch.student_labels.to(dev)
            lm = self.adapter.lm_head(self.student)
            losses["l_s"] = chunked_ce(hs[:, :-1], lm.weight, labels[:, 1:], chunk=self.cfg.loss_chunk,
                                       lm_head_bias=lm.bias)
            total = total + self.cfg.w_student * losses["l_s"]
        if stage == 3 and self.cfg.w_uld:
            losses["l_uld"] = uld_loss(hs, lm, self.head, batch.examples, self.cfg.temperature)
            total = total + self.cfg.w_uld * losses["l_uld"]
        if stage in (1, 2):
            z_qs, z_al, z_ql, targets, s_al, s_rows = [], [], [], [], [], []
            for i, e in enumerate(batch.examples):
                q_idx, a_idx, tgt = teacher_rows(e)
                th = e.teacher_hidden.to(dev)
                z_qs.append(hs[i, student_question_index(e).to(dev)])
                z_al.append(th[a_idx.to(dev)])
                z_ql.append(th[q_idx.to(dev)])
                targets.append(tgt.to(dev))
                s, sm = self._student_answer_rows(e, hs[i], len(tgt))
                s_al.append(s)
                s_rows.append(sm)
            za, a_mask = _pad_rows(z_al)
            zq, q_mask = _pad_rows(z_qs)
            sa, _ = _pad_rows(s_al)
            sm, _ = _pad_rows(s_rows)
            zl, l_mask = _pad_rows(z_ql) if self.cfg.use_reg_pass else (None, None)
            r_main, r_reg = self.recalibrator(za, a_mask, z_qs=zq, qs_mask=q_mask, z_ql=zl, ql_mask=l_mask,
                                              s_al=sa, s_mask=sm)
            tgt = torch.cat(targets)
            z_t = za[a_mask]
            T, chunk = self.cfg.temperature, self.cfg.loss_chunk
            losses["l_ar"], losses["l_kl"] = answer_losses(self.head, r_main[a_mask], z_t, tgt, T, chunk)
            total = total + self.cfg.w_ar * losses["l_ar"] + self.cfg.w_kl * losses["l_kl"]
            if r_reg is not None:
                losses["reg_ar"], losses["reg_kl"] = answer_losses(self.head, r_reg[a_mask], z_t, tgt, T, chunk)
                total = total + self.cfg.w_ar * losses["reg_ar"] + self.cfg.w_kl * losses["reg_kl"]
        losses["loss"] = total
        return losses

    def _student_answer_rows(self, e: Example, hs: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """(student-space rows [n, d_s], bool [n] where they replace Proj-pre(z_al)) of one sample's main pass."""
        dev = hs.device
        if self.cfg.main_pass_answer == "student_aligned":
            return hs[student_answer_rows(e, *self.tokenizers).to(dev)], torch.ones(n, dtype=torch.bool, device=dev)
        rows, before = answer_start_rows(e)
        s = hs.new_zeros(n, hs.shape[-1]).index_copy(0, rows.to(dev), hs[before.to(dev)])
        return s, torch.zeros(n, dtype=torch.bool, device=dev).index_fill(0, rows.to(dev), True)
