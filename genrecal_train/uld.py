"""Universal Logit Distillation (ULD), a cross-tokenizer logit-KD baseline.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
for LLMs" (arXiv 2402.12030). Teacher and student distributions live on different vocabularies,
so ULD compares them after sorting: the loss is the closed-form 1-D Wasserstein distance between
the two probability vectors sorted in decreasing order (the smaller vocabulary zero-padded),

    L_uld = sum_k | sort(p_s)_k - sort(p_t)_k |,

averaged over answer tokens aligned *by index* (token i of the student's answer with token i of
the teacher's, up to the shorter of the two), and added to the student's own CE:
    L = w_student * L_s + w_uld * L_uld.

The teacher distribution is recomputed exactly from the cached post-norm states and the cached
teacher head (no teacher body is loaded). Used by `bench/quality.py` as the "uld" arm.

Trainer hook: `train_uld(cfg, w_uld)` runs the ordinary trainer with `GenRecal` swapped for
`ULDGenRecal` (stage 3 gains the ULD term; stages 1-2 are unchanged). A first-class option would
be a `TrainConfig.w_uld` field read by `GenRecal.forward` in stage 3.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from genrecal_train.config import TrainConfig
from genrecal_train.data import Batch
from genrecal_train.losses import chunked_ce
from genrecal_train.model import GenRecal


def sorted_wasserstein(p_student: Tensor, p_teacher: Tensor) -> Tensor:
    """Per-row ULD distance between two probability matrices [n, Vs], [n, Vt] (any vocab sizes) -> [n]."""
    vs, vt = p_student.shape[-1], p_teacher.shape[-1]
    ps = torch.sort(p_student, dim=-1, descending=True).values
    pt = torch.sort(p_teacher, dim=-1, descending=True).values
    v = max(vs, vt)
    ps = F.pad(ps, (0, v - vs))
    pt = F.pad(pt, (0, v - vt))
    return (ps - pt).abs().sum(-1)


def uld_rows(e) -> tuple[Tensor, Tensor]:
    """(student state index, teacher state index) of index-aligned answer tokens of one example."""
    s_idx, t_idx = [], []
    for (sa, sb), (ta, tb) in zip(e.student_spans, e.teacher_spans):
        n = min(sb - sa, tb - ta)
        s_idx.append(torch.arange(sa - 1, sa - 1 + n))
        t_idx.append(torch.arange(ta - 1, ta - 1 + n))
    return torch.cat(s_idx), torch.cat(t_idx)


class ULDGenRecal(GenRecal):
    """GenRecal whose stage 3 adds the ULD loss to the student's CE."""

    w_uld: float = 1.0

    def forward(self, batch: Batch, stage: int | None = None) -> dict[str, Tensor]:
        stage = self.stage if stage is None else stage
        if stage != 3:
            return super().forward(batch, stage)
        dev = self.head.lm_head_weight.device
        hs = self.student_states({k: v.to(dev) for k, v in batch.student_inputs.items()})
        lm = self.adapter.lm_head(self.student)
        labels = batch.student_labels.to(dev)
        l_s = chunked_ce(hs[:, :-1], lm.weight, labels[:, 1:], chunk=self.cfg.loss_chunk, lm_head_bias=lm.bias)
        hs_rows, t_rows = [], []
        for i, e in enumerate(batch.examples):
            si, ti = uld_rows(e)
            hs_rows.append(hs[i, si.to(dev)])
            t_rows.append(e.teacher_hidden[ti].to(dev))
        h, z = torch.cat(hs_rows), torch.cat(t_rows)
        T = self.cfg.temperature
        p_s = F.softmax(F.linear(h, lm.weight, lm.bias).float() / T, dim=-1)
        with torch.no_grad():
            p_t = F.softmax(self.head.logits(z.to(self.head.lm_head_weight.dtype), post_norm=True).float() / T, dim=-1)
        l_uld = sorted_wasserstein(p_s, p_t).mean()
        return {"l_s": l_s, "l_uld": l_uld, "loss": self.cfg.w_student * l_s + self.w_uld * l_uld}


def train_uld(cfg: TrainConfig, w_uld: float = 1.0) -> Path:
    """`genrecal_train.trainer.train(cfg)` with the ULD term in stage 3 (use stages=[3])."""
    from genrecal_train import trainer

    cls = type("ULDGenRecalW", (ULDGenRecal,), {"w_uld": float(w_uld)})
    with _swap(trainer, "GenRecal", cls):
        return trainer.train(cfg)


@contextlib.contextmanager
def _swap(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
