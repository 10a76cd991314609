"""Chunked losses equal their unchunked references (values and gradients); KL of an identity path is 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genrecal_cache.format.head import HeadConfig, TeacherHead
from genrecal_train.config import TrainConfig
from genrecal_train.losses import answer_ce, answer_losses, chunked_ce, teacher_kl

D, V, T = 32, 1000, 23  # hidden size, vocab, tokens (23 is not a multiple of the chunk sizes)


def make_head(dtype: torch.dtype = torch.float64, norm_type: str = "rms", softcap: float | None = None) -> TeacherHead:
    g = torch.Generator().manual_seed(0)
    norm_w = 0.5 + torch.rand(D, generator=g)  # no zeros: z / w must be defined
    cfg = HeadConfig(hidden_size=D, vocab_size=V, norm_type=norm_type, logit_softcap=softcap)
    return TeacherHead(cfg, norm_w.to(dtype), torch.randn(V, D, generator=g).to(dtype) / D ** 0.5,
                       norm_bias=torch.randn(D, generator=g).to(dtype) if norm_type == "layer" else None)


def inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    r = (3 * torch.randn(T, D, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    targets[[2, 11]] = -100  # ignored rows
    return r, targets, torch.randn(T, D, generator=g).to(dtype)


def grad_of(loss: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("chunk", [1, 5, 8, 1024])
@pytest.mark.parametrize("head_kind", [("rms", None), ("layer", 30.0)])
def test_answer_ce_matches_reference(chunk: int, head_kind: tuple) -> None:
    head = make_head(norm_type=head_kind[0], softcap=head_kind[1])
    r, targets, _ = inputs()
    ref = F.cross_entropy(head.logits(r, post_norm=False), targets, ignore_index=-100)
    got = answer_ce(head, r, targets, chunk=chunk)
    assert abs(got.item() - ref.item()) < 1e-6
    torch.testing.assert_close(grad_of(got, r)[0], grad_of(ref, r)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_teacher_kl_matches_reference(chunk: int, temperature: float) -> None:
    head = make_head()
    r, _, x = inputs()
    z = head.final_norm(x)  # cached teacher states are post-norm
    t = F.log_softmax(head.logits(z, post_norm=True) / temperature, -1)
    s = F.log_softmax(head.logits(r, post_norm=False) / temperature, -1)
    ref = (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2
    got = teacher_kl(head, r, z, temperature, chunk=chunk)
    assert got.item() > 0 and abs(got.item() - ref.item()) < 1e-6
    torch.testing.assert_close(grad_of(got, r)[0], grad_of(ref, r)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_answer_losses_equal_the_separate_ones(temperature: float) -> None:
    head = make_head()
    r, targets, x = inputs()
    z = head.final_norm(x)
    [(ce, kl)] = answer_losses(head, [r], z, targets, temperature, chunk=4)
    keep = targets != -100
    assert abs(ce.item() - answer_ce(head, r, targets).item()) < 1e-6
    assert abs(kl.item() - teacher_kl(head, r[keep], z[keep], temperature).item()) < 1e-6
    g_fused = grad_of(ce + kl, r)[0]
    g_sep = grad_of(answer_ce(head, r, targets) + teacher_kl(head, r[keep], z[keep], temperature), r)[0]
    torch.testing.assert_close(g_fused, g_sep, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [4, 1024])  # checkpointed chunks; one chunk kept, not recomputed
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_passes_sharing_the_teacher_are_bit_identical_to_one_call_per_pass(chunk: int, temperature: float) -> None:
    """The main and the regularization pass in one call (the teacher's log-probabilities computed once per
    chunk) give exactly, bit for bit, the losses and gradients of one call per pass."""
    head = make_head(torch.float32)
    r, targets, x = inputs(torch.float32)
    r2 = (r.detach() * 0.7 + 0.1).requires_grad_()
    z = head.final_norm(x)
    both = answer_losses(head, [r, r2], z, targets, temperature, chunk=chunk)
    alone = [answer_losses(head, [p], z, targets, temperature, chunk=chunk)[0] for p in (r, r2)]
    for got, want in zip(both, alone):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    loss = lambda terms: sum(ar + 2 * kl for ar, kl in terms)  # noqa: E731
    for g_got, g_want in zip(grad_of(loss(both), r, r2), grad_of(loss(alone), r, r2)):
        assert torch.equal(g_got, g_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_is_zero_through_an_identity_path(dtype: torch.dtype) -> None:
    """Post-norm z = w * x / rms(x); z / w has rms 1, so final_norm(z / w) == z and the KL vanishes."""
    head = make_head(dtype)
    _, _, x = inputs(dtype)
    z = head.final_norm(x)
    r = (z / head.norm_weight).requires_grad_()
    assert teacher_kl(head, r, z, chunk=7).abs().item() < 1e-6
    assert teacher_kl(head, r, z, temperature=3.0, chunk=7).abs().item() < 1e-6


@pytest.mark.parametrize("chunk", [1, 6, 1024])
def test_chunked_student_ce_matches_reference_incl_lm_head_grads(chunk: int) -> None:
    r, targets, _ = inputs()
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    h = r.view(1, T, D)  # leading dims are flattened
    ref = F.cross_entropy(F.linear(r, w, b), targets)
    got = chunked_ce(h, w, targets.view(1, T), chunk=chunk, lm_head_bias=b)
    assert abs(got.item() - ref.item()) < 1e-6
    for g_got, g_ref in zip(grad_of(got, r, w, b), grad_of(ref, r, w, b)):
        torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=0)


def test_head_stays_frozen_and_bf16_head_works() -> None:
    head = make_head(torch.bfloat16)
    r, targets, x = inputs(torch.float32)
    z = head.final_norm(x.to(torch.bfloat16))
    [(ce, kl)] = answer_losses(head, [r], z, targets, chunk=8)
    (ce + kl).backward()
    assert r.grad is not None and r.grad.dtype == torch.float32 and torch.isfinite(r.grad).all()
    assert ce.dtype == torch.float32 and torch.isfinite(ce) and torch.isfinite(kl)
    assert not any(t.requires_grad for t in head.buffers())
    assert list(head.parameters()) == []


def test_no_grad_and_empty_inputs() -> None:
    head = make_head()
    r, targets, x = inputs()
    with torch.no_grad():
        assert abs(answer_ce(head, r, targets, chunk=4).item()
                   - F.cross_entropy(head.logits(r, post_norm=False), targets).item()) < 1e-6
    empty = r[:0]
    [(ce, kl)] = answer_losses(head, [empty], x[:0], targets[:0])
    assert ce.item() == 0 and kl.item() == 0
    (ce + kl).backward()  # still part of the graph: a step with no answer tokens does not crash


def test_loss_weights_default_to_paper_defaults() -> None:
    w = TrainConfig()  # the paper gives no weights: all 1 (docs/method.md)
    assert (w.w_ar, w.w_kl, w.w_student, w.temperature, w.use_reg_pass) == (1, 1, 1, 1, True)


def test_student_ce_runs_the_head_on_labelled_rows_only() -> None:
    """Image and question rows (target ignore_index) never reach the student's head: NaN there changes nothing,
    and loss and gradients are those of the labelled rows alone."""
    r, targets, _ = inputs()
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    ignored = torch.arange(T) % 3 != 0  # two rows of three are prompt rows
    h = r.detach().clone().masked_fill(ignored[:, None], float("nan")).requires_grad_()
    got = chunked_ce(h.view(1, T, D), w, targets.masked_fill(ignored, -100).view(1, T), chunk=2)
    ref = F.cross_entropy(F.linear(r[~ignored], w), targets[~ignored])
    assert abs(got.item() - ref.item()) < 1e-9
    g_h, g_w = torch.autograd.grad(got, (h, w))
    r_ref = r.detach().clone().requires_grad_()
    ref_h, ref_w = torch.autograd.grad(F.cross_entropy(F.linear(r_ref[~ignored], w), targets[~ignored]), (r_ref, w))
    torch.testing.assert_close(g_w, ref_w, atol=1e-9, rtol=0)
    torch.testing.assert_close(g_h, ref_h, atol=1e-9, rtol=0)  # zero at the ignored rows, not NaN
    none = chunked_ce(h.view(1, T, D), w, torch.full((1, T), -100))
    assert none.item() == 0 and none.requires_grad  # no labelled row: a 0 loss that still backpropagates
