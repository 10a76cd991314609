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

Used by `GenRecal.forward` in stage 3 when `TrainConfig.w_uld > 0` (stages 1-2 are unchanged):
`--stages 3` with `w_uld: 1` in the `--config` file is the ULD baseline of bench/quality.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sorted_wasserstein", "uld_loss"]


def sorted_wasserstein(p_student: Tensor, p_teacher: Tensor) -> Tensor:
    """Per-row ULD distance between two probability matrices [n, Vs], [n, Vt] (any vocab sizes) -> [n]."""
    vs, vt = p_student.shape[-1], p_teacher.shape[-1]
    ps = torch.sort(p_student, dim=-1, descending=True).values
    pt = torch.sort(p_teacher, dim=-1, descending=True).values
    v = max(vs, vt)
    ps = F.pad(ps, (0, v - vs))
    pt = F.pad(pt, (0, v - vt))
    return (ps - pt).abs().sum(-1)


def uld_loss(hs: Tensor, lm_head: torch.nn.Module, head, examples, temperature: float = 1.0) -> Tensor:
    """L_uld of a batch: student post-norm states `hs` [B, L, d_s] with its lm_head, the cached
    teacher states of `examples` read out by the teacher head; mean over index-aligned answer tokens
    (`Example.rows.uld_student`/`uld_teacher`, genrecal_train/align.py `uld_rows`)."""
    dev = hs.device
    hs_rows, t_rows = [], []
    for i, e in enumerate(examples):
        hs_rows.append(hs[i, e.rows.uld_student.to(dev)])
        t_rows.append(e.teacher_hidden[e.rows.uld_teacher].to(dev).float())
    h, z = torch.cat(hs_rows), torch.cat(t_rows)
    p_s = F.softmax(F.linear(h, lm_head.weight, lm_head.bias).float() / temperature, dim=-1)
    with torch.no_grad():
        p_t = F.softmax(head.logits(z.to(head.lm_head_weight.dtype), post_norm=True).float() / temperature, dim=-1)
    return sorted_wasserstein(p_s, p_t).mean()
