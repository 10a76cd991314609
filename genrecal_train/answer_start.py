"""GenRecal variant: the main pass predicts each answer's FIRST token from the student, not the teacher.

Why. `GenRecal` feeds the main pass `[z_qs, Proj-pre(z_al)]` with z_al = T[a-1 : b-1] (see
model.py): its first row per answer span is the teacher's state at the last *question/template*
token, i.e. exactly the state from which the teacher predicts the answer's first token. The
Recalibrator can therefore read the answer off the teacher row (the regularization pass trains
precisely that readout) and has little reason to use the student's features z_qs, so stage 2
sends almost no teacher knowledge into the student. For the short answers of the quality
benchmark (one word / one number, usually one or two tokens) that row carries nearly all of the
answer.

What changes. In the main pass only, the first row of every answer span is replaced by the
student's own state at the token before its answer (the state the student predicts its first
answer token from, in student space, so Proj-pre is not applied to it). L_ar/L_kl of that row
now require the *student* to carry the teacher's answer distribution, read out through the
teacher's head. The other rows, the regularization pass and all losses are unchanged.

In the paper's notation z_ql (the teacher's question states, last one included) is replaced by
z_qs in the main pass, so this reading is arguably closer to the paper than model.py's.

Trainer hook: `train_answer_start(cfg)` runs the ordinary trainer with `GenRecal` swapped for
`AnswerStartGenRecal`. A first-class option would be a `TrainConfig` flag read by
`GenRecal.forward` (the ~10 lines marked below).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from genrecal_train.config import TrainConfig
from genrecal_train.data import Batch
from genrecal_train.losses import answer_losses, chunked_ce
from genrecal_train.model import GenRecal, _gather, student_question_index, teacher_parts


class AnswerStartGenRecal(GenRecal):
    def forward(self, batch: Batch, stage: int | None = None) -> dict[str, Tensor]:
        stage = self.stage if stage is None else stage
        if stage == 3:
            return super().forward(batch, stage)
        dev = self.head.lm_head_weight.device
        hs = self.student_states({k: v.to(dev) for k, v in batch.student_inputs.items()})
        losses: dict[str, Tensor] = {}
        total = hs.new_zeros(())
        if stage == 2:
            labels = batch.student_labels.to(dev)
            lm = self.adapter.lm_head(self.student)
            losses["l_s"] = chunked_ce(hs[:, :-1], lm.weight, labels[:, 1:], chunk=self.cfg.loss_chunk,
                                       lm_head_bias=lm.bias)
            total = total + self.cfg.w_student * losses["l_s"]
        z_qs, z_al, z_ql, targets, starts, start_rows = [], [], [], [], [], []
        for i, e in enumerate(batch.examples):
            q_idx, a_idx, tgt = teacher_parts(e)
            th = e.teacher_hidden.to(dev)
            z_qs.append(hs[i, student_question_index(e).to(dev)])
            z_al.append(th[a_idx.to(dev)])
            z_ql.append(th[q_idx.to(dev)])
            targets.append(tgt.to(dev))
            # --- the change: row of each span's first answer token <- the student's state before its answer
            row, rows = 0, []
            for a, b in e.teacher_spans:
                rows.append(row)
                row += b - a
            starts.append(hs[i, torch.tensor([sa - 1 for sa, _ in e.student_spans], device=dev)])
            start_rows.append(torch.tensor(rows, device=dev))
        za, a_mask = _gather(z_al)
        zq, q_mask = _gather(z_qs)
        rec = self.recalibrator
        answer = rec.proj_pre(za.to(rec.proj_pre.weight.dtype))
        main_answer = answer.clone()
        for i, (rows, st) in enumerate(zip(start_rows, starts)):
            main_answer[i, rows] = st.to(main_answer.dtype)
        r_main = rec.recalibrate(zq.to(answer.dtype), q_mask, main_answer, a_mask)
        # ---
        tgt = torch.cat(targets)
        z_t = za[a_mask]
        T, chunk = self.cfg.temperature, self.cfg.loss_chunk
        losses["l_ar"], losses["l_kl"] = answer_losses(self.head, r_main[a_mask], z_t, tgt, T, chunk)
        total = total + self.cfg.w_ar * losses["l_ar"] + self.cfg.w_kl * losses["l_kl"]
        if self.cfg.use_reg_pass:
            zl, l_mask = _gather(z_ql)
            r_reg = rec.recalibrate(rec.proj_pre(zl.to(answer.dtype)), l_mask, answer, a_mask)
            losses["reg_ar"], losses["reg_kl"] = answer_losses(self.head, r_reg[a_mask], z_t, tgt, T, chunk)
            total = total + self.cfg.w_ar * losses["reg_ar"] + self.cfg.w_kl * losses["reg_kl"]
        losses["loss"] = total
        return losses


def train_answer_start(cfg: TrainConfig) -> Path:
    """`genrecal_train.trainer.train(cfg)` with `AnswerStartGenRecal`."""
    from genrecal_train import trainer
    from genrecal_train.uld import _swap

    with _swap(trainer, "GenRecal", AnswerStartGenRecal):
        return trainer.train(cfg)
