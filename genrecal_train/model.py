"""GenRecal as one module: student + Recalibrator + frozen teacher head; `forward(batch, stage)` -> losses.

Which features go where (z_qs, z_al, z_ql, gt_l: genrecal_train/align.py):
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
`TrainConfig.recal_context="none"` drops both prefixes (z_qs and Proj-pre(z_ql)): each pass is then its answer rows
alone, and whatever the image and question tell must reach the Recalibrator through the student's own answer
states (docs/method.md, "What the Recalibrator attends to").

Every index above is computed once per example on the data thread (`Example.rows`, genrecal_train/align.py),
and padded per batch there too, with the teacher states gathered (`Batch.rows`): `forward` only gathers the
student's states and runs the tensors.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from genrecal_cache.families import FamilyAdapter
from genrecal_cache.format.head import TeacherHead
from genrecal_train.align import BatchRows
from genrecal_train.config import TrainConfig
from genrecal_train.batches import Batch
from genrecal_train.losses import answer_losses, chunked_ce
from genrecal_train.recalibrator import Recalibrator
from genrecal_train.uld import uld_loss

__all__ = ["GenRecal"]


class GenRecal(nn.Module):
    def __init__(self, student: nn.Module, adapter: FamilyAdapter, head: TeacherHead, cfg: TrainConfig):
        """The examples bring their own loss rows (`Example.rows`): for main_pass_answer='student_aligned' made
        with the teacher's tokenizer (`make_example(..., teacher_tokenizer=...)`)."""
        super().__init__()
        self.student, self.adapter, self.head, self.cfg = student, adapter, head.requires_grad_(False), cfg
        if cfg.main_pass_answer not in ("teacher", "student_aligned"):
            raise ValueError(f"main_pass_answer={cfg.main_pass_answer!r}: use 'student_aligned' or 'teacher'")
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
            rows, flat = batch.rows, hs.reshape(-1, hs.shape[-1])  # student index: into [B * Ls, d_s]
            if self.cfg.reads_context(stage) and not rows.context:  # else the reg pass would run on no prefix
                raise ValueError(f"stage {stage} reads the teacher's context rows (the regularization pass's "
                                 f"prefix), but the batch was made without them: make its examples with "
                                 f"context=True (`TrainConfig.reads_context`)")
            za = rows.teacher_states("answer", dev)  # bf16 as stored: widened here, low-rank rows rebuilt here
            a_mask = rows.answer_mask.to(dev)
            index, sm = rows.main_pass(self.cfg.main_pass_answer)
            if self.cfg.recal_context == "question":
                zqs, qs_mask = flat[rows.student_question.to(dev)], rows.student_question_mask.to(dev)
            else:  # "none", empty prefixes: the Recalibrator attends to answer rows only
                zqs, qs_mask = hs.new_zeros(hs.shape[0], 0, hs.shape[-1]), a_mask[:, :0]
            pl, l_mask = None, None
            if self.cfg.use_reg_pass:
                pl, l_mask = ((reg_prefix(rows, self.recalibrator, dev), rows.question_mask.to(dev))
                              if self.cfg.reads_context(stage) else (zqs, qs_mask))
            r_main, r_reg = self.recalibrator(za, a_mask, z_qs=zqs, qs_mask=qs_mask, p_ql=pl, ql_mask=l_mask,
                                              s_al=flat[index.to(dev)], s_mask=sm.to(dev))
            tgt = rows.targets.to(dev)
            passes = [r_main[a_mask]] + ([] if r_reg is None else [r_reg[a_mask]])
            terms = answer_losses(self.head, passes, za[a_mask], tgt, self.cfg.temperature, self.cfg.loss_chunk)
            for (ar, kl), (n_ar, n_kl) in zip(terms, [("l_ar", "l_kl"), ("reg_ar", "reg_kl")]):
                losses[n_ar], losses[n_kl] = ar, kl
                total = total + self.cfg.w_ar * ar + self.cfg.w_kl * kl
        losses["loss"] = total
        return losses


def reg_prefix(rows: BatchRows, rec: Recalibrator, device: torch.device) -> Tensor:
    """Proj-pre(z_ql) [B, Lq, d_s], the regularization pass's prefix. Rows a stored-precision read leaves as
    low-rank coefficients (`rows.lowrank`, most context rows of a default cache) go through the projection
    with the basis folded in (`Recalibrator.project_lowrank`): their d_t-wide states are never rebuilt, and
    projecting them costs r * d_s per row instead of d_t * d_s. Only the other valid rows are projected;
    without low-rank rows this is proj_pre(z_ql) over the whole batch, as before, bit for bit."""
    z = rows.teacher_question.to(device, non_blocking=True)  # bf16 as stored: widened below, the rows used only
    dtype = rec.proj_pre.weight.dtype
    if not any(lr.question.numel() for lr in rows.lowrank):
        return rec.proj_pre(z.float().to(dtype))
    B, L, d_t = z.shape
    flat = z.reshape(B * L, d_t)
    exact = rows.question_mask.to(device).reshape(-1).clone()
    out = torch.zeros(B * L, rec.d_student, dtype=dtype, device=device)
    for lr in rows.lowrank:
        index = lr.question.to(device, non_blocking=True)
        if index.numel():
            exact[index] = False
            out = out.index_put((index,), rec.project_lowrank(lr.question_coefficients.to(device, non_blocking=True),
                                                              *lr.basis.tensors(device)))
    exact = exact.nonzero().squeeze(1)
    out = out.index_put((exact,), rec.proj_pre(flat[exact].float().to(dtype)))
    return out.reshape(B, L, rec.d_student)
