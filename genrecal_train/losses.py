"""GenRecal losses, chunked over tokens so a [T, V] logits tensor (V ~ 152k) never exists whole.

When the rows span several chunks, every chunk runs under non-reentrant activation checkpointing: the
forward keeps one scalar per chunk, and the backward recomputes one chunk's logits at a time. Peak memory
is a single chunk's logits in both directions (as torchtune's chunked CE/KD losses, with the recompute
bounding the backward as well). Rows that fit one chunk keep that chunk's tensors for the backward
instead of recomputing them: the same peak, the same values.

Inputs are token rows: any leading shape is flattened, so select the answer rows first
(`r_al[a_mask]`, `z_al[a_mask]`, targets likewise) or mark padded rows with `ignore_index`.
The teacher head is frozen (its tensors are buffers) but gradients flow through it to `r`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from genrecal_cache.format.head import TeacherHead
from genrecal_train.config import LOSS_CHUNK

__all__ = ["answer_ce", "answer_losses", "chunked_ce", "teacher_kl"]


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _f32(x: Tensor) -> Tensor:
    """Softmax precision: at least float32 (bf16 logits are upcast, float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _head_logits(head: TeacherHead, x: Tensor, post_norm: bool) -> Tensor:
    # Run the matmul in the head's dtype: casting x is cheap, casting a [V, d] weight per chunk is not.
    return _f32(head.logits(x.to(head.lm_head_weight.dtype), post_norm=post_norm))


def _log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _kl_rows(teacher_logp: Tensor, logp: Tensor) -> Tensor:
    """Per-row KL(teacher || student) from log-probabilities, shape [n]."""
    return F.kl_div(logp, teacher_logp, log_target=True, reduction="none").sum(-1)


def _chunked_sum(fn: Callable[..., Tensor], rows: list[Tensor], chunk: int) -> Tensor:
    """sum over chunks c of fn(*(t[c] for t in rows)); each chunk checkpointed when grads are on and there
    is more than one (one chunk's tensors are the peak either way: a lone chunk is not recomputed)."""
    n, total = rows[0].shape[0], None
    recompute = torch.is_grad_enabled() and n > chunk
    for s in range(0, max(n, 1), chunk):  # an empty input still runs once: a 0 loss with a graph
        part = [t[s:s + chunk] for t in rows]
        out = checkpoint(fn, *part, use_reentrant=False) if recompute else fn(*part)
        total = out if total is None else total + out
    return total


def answer_ce(head: TeacherHead, r: Tensor, target_ids: Tensor, post_norm: bool = False,
              chunk: int = LOSS_CHUNK, ignore_index: int = -100) -> Tensor:
    """L_ar = CE(Head_l(r), gt_l), mean over answer tokens (rows whose target is not ignore_index).

    `post_norm=False` for Recalibrator outputs (final norm applied), True for cached teacher states.
    """
    r, tgt = _rows(r), target_ids.reshape(-1)
    fn = lambda r, t: F.cross_entropy(_head_logits(head, r, post_norm), t, ignore_index=ignore_index,
                                      reduction="sum")
    return _chunked_sum(fn, [r, tgt], chunk) / (tgt != ignore_index).sum().clamp(min=1)


def teacher_kl(head: TeacherHead, r: Tensor, z_teacher: Tensor, temperature: float = 1.0,
               chunk: int = LOSS_CHUNK) -> Tensor:
    """L_kl = KL(softmax(lm_head(z)/T) || softmax(Head_l(r)/T)) * T^2, mean over tokens.

    `z_teacher` are the cached post-norm teacher states of the same tokens, so the target is the
    teacher's exact distribution. The T^2 factor (Hinton et al.) keeps gradient magnitudes
    independent of T, so weights tuned at T=1 still fit.
    """
    r, z = _rows(r), _rows(z_teacher).detach()
    fn = lambda r, z: _kl_rows(_log_probs(_head_logits(head, z, True), temperature),
                               _log_probs(_head_logits(head, r, False), temperature)).sum()
    return _chunked_sum(fn, [r, z], chunk) * temperature ** 2 / max(r.shape[0], 1)


def answer_losses(head: TeacherHead, passes: Sequence[Tensor], z_teacher: Tensor, target_ids: Tensor,
                  temperature: float = 1.0, chunk: int = LOSS_CHUNK,
                  ignore_index: int = -100) -> list[tuple[Tensor, Tensor]]:
    """(L_ar, L_kl) of each Recalibrator pass in `passes` (rows r [n, d] each, the same answer rows), with one
    Head_l(r) per pass and chunk for both terms and the teacher's distribution computed once per chunk for
    all passes (the main and the regularization pass share their targets).

    Each pair has the values of `answer_ce(head, r, target_ids)` and `teacher_kl(head, r, z_teacher, T)`
    over the rows whose target is not ignore_index (those rows are left out of both)."""
    z, tgt = _rows(z_teacher).detach(), target_ids.reshape(-1)

    def fn(z: Tensor, t: Tensor, *rs: Tensor) -> Tensor:
        teacher = _log_probs(_head_logits(head, z, True), temperature)
        out = []
        for r in rs:
            logits = _head_logits(head, r, False)
            logp = _log_probs(logits)
            ce = F.nll_loss(logp, t, ignore_index=ignore_index, reduction="sum")
            s = logp if temperature == 1.0 else _log_probs(logits, temperature)  # T=1: share the softmax
            out += [ce, (_kl_rows(teacher, s) * (t != ignore_index)).sum()]
        return torch.stack(out)

    sums = _chunked_sum(fn, [z, tgt, *(_rows(r) for r in passes)], chunk)
    n = (tgt != ignore_index).sum().clamp(min=1)
    return [(sums[2 * k] / n, sums[2 * k + 1] * temperature ** 2 / n) for k in range(len(passes))]


def chunked_ce(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, ignore_index: int = -100,
               chunk: int = LOSS_CHUNK, lm_head_bias: Tensor | None = None) -> Tensor:
    """CE(hidden @ W^T (+ b), targets), mean over non-ignored rows: L_s with the student's own
    lm_head (`hidden` = the student's post-norm last hidden states). Gradients reach W too.

    Only the labelled rows go through the head: an ignored row adds nothing to the loss or any gradient, and
    most rows of a VLM sample are image and question tokens (the head is [V, d] per row: V ~ 152k)."""
    h, tgt = _rows(hidden), targets.reshape(-1)
    keep = (tgt != ignore_index).nonzero().squeeze(1)
    h, tgt = h[keep], tgt[keep]
    fn = lambda h, t: F.cross_entropy(_f32(F.linear(h, lm_head_weight, lm_head_bias)), t,
                                      ignore_index=ignore_index, reduction="sum")
    return _chunked_sum(fn, [h, tgt], chunk) / max(tgt.shape[0], 1)

