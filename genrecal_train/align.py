"""Which state feeds which loss, per sample: index tensors computed once per example on the data thread.

Everything here is a function of one sample's token ids, answer spans and (for the student-aligned main
pass) both tokenizers, never of hidden states: `make_example` (genrecal_train/batches.py) computes it on the
prefetch thread and stores it on the `Example` as `Rows`; `GenRecal.forward` only gathers with it.

Which features go where (spans are answer-content token ranges, one per turn):
    teacher: answer token p is predicted by the state at p-1, so z_al = T[a-1 : b-1] for every span [a, b)
             (targets gt_l = ids[a:b]); z_ql = every other teacher state before the last one used that the
             cache stores (a role-aware cache may store context rows compactly, only the text rows, or none).
    student: z_qs = the student's states outside its answer spans, before the end of its last span.
The main pass's answer rows (`TrainConfig.main_pass_answer`; why: genrecal_train/model.py):
    "student_aligned": for each teacher answer token, the student state that predicts the same text
        (`student_answer_rows`, by character offsets: needs both tokenizers).
    "teacher": Proj-pre(z_al) but for the row predicting each span's first token, which is the student's
        last question state (`answer_start_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from genrecal_cache.format.roles import ContextBasis

__all__ = ["BatchLowRank", "BatchRows", "LowRankRows", "Rows", "StudentRows", "answer_char_ends",
           "answer_start_rows", "batch_rows", "example_rows", "student_answer_rows", "student_question_index",
           "teacher_rows", "uld_rows"]

Spans = list[tuple[int, int]]


@dataclass(frozen=True)
class StudentRows:
    """Student states placed into the main pass's answer rows: `rows[i]` (in z_al's layout) takes the
    student state `states[i]`; `mask` [n] marks the rows so filled (the others keep Proj-pre(z_al))."""
    rows: Tensor
    states: Tensor
    mask: Tensor


@dataclass(frozen=True)
class Rows:
    """One example's index tensors (int64 / bool, on the CPU)."""
    teacher_question: Tensor  # teacher states of z_ql
    teacher_answer: Tensor  # teacher states of z_al
    targets: Tensor  # gt_l, the teacher answer ids, one per z_al row
    student_question: Tensor  # student states of z_qs
    answer_start: StudentRows  # main_pass_answer="teacher"
    student_aligned: StudentRows | None  # main_pass_answer="student_aligned"; None when made without tokenizers
    uld_student: Tensor  # index-aligned answer states of the ULD baseline (genrecal_train/uld.py)
    uld_teacher: Tensor
    context: bool = True  # z_ql gathered; False: left out, for a step that reads no context row


@dataclass
class LowRankRows:
    """A sample's low-rank context rows as the cache stores them (`iter_samples(precision="stored")`): its
    teacher states are zero there, rebuilt on the model's device (`BatchRows.teacher_states`)."""
    rows: Tensor  # [n] int64: the rows (FLAG_COMPACT) in the sample's teacher tokens
    coefficients: Tensor  # [n, r] float32
    basis: ContextBasis


@dataclass(frozen=True)
class BatchLowRank:
    """The low-rank rows of a batch's gathered teacher states that share one basis: flat indices into z_al and
    z_ql viewed as [B * L, dt] and their coefficients (r floats per row instead of dt to copy to the device)."""
    basis: ContextBasis
    answer: Tensor  # [n_a] int64 into teacher_answer.reshape(-1, dt)
    answer_coefficients: Tensor  # [n_a, r]
    question: Tensor  # [n_q] int64 into teacher_question.reshape(-1, dt)
    question_coefficients: Tensor  # [n_q, r]

    def pin_memory(self) -> "BatchLowRank":
        """The same rows in page-locked memory."""
        return BatchLowRank(self.basis, *(getattr(self, f.name).pin_memory() for f in fields(self)[1:]))


@dataclass(frozen=True)
class BatchRows:
    """A batch's loss rows, padded to [B, L] with bool validity masks, made by `batch_rows` on the data thread.

    The teacher side is gathered already (z_al, z_ql in the cache's stored precision, zero-padded: the model
    only widens them on its device, and rebuilds there the low-rank rows a stored-precision read leaves as
    coefficients, `lowrank`). The student side is flat indices into the student's states viewed as
    [B * Ls, d_s] (`hs.reshape(-1, d_s)`, Ls the padded student length); padded entries point at row 0 and
    are masked out."""
    teacher_answer: Tensor  # [B, La, dt] z_al
    answer_mask: Tensor  # [B, La]
    teacher_question: Tensor  # [B, Lq, dt] z_ql
    question_mask: Tensor  # [B, Lq]
    targets: Tensor  # [n] gt_l of the valid answer rows, in `answer_mask` order
    student_question: Tensor  # [B, Lqs] z_qs
    student_question_mask: Tensor  # [B, Lqs]
    answer_start: tuple[Tensor, Tensor]  # main_pass_answer="teacher": (index [B, La], where it applies [B, La])
    student_aligned: tuple[Tensor, Tensor] | None  # main_pass_answer="student_aligned"; None without tokenizers
    lowrank: tuple[BatchLowRank, ...] = ()  # one per context basis in the batch; () for float32 reads
    context: bool = True  # z_ql gathered (`Rows.context` of every example)

    def teacher_states(self, which: str, device: torch.device) -> Tensor:
        """z_al (`which="answer"`) or z_ql (`"question"`) as float32 on `device`: widened there (bf16 as stored),
        the low-rank rows reconstructed there (`ContextBasis.decode_tensor`)."""
        z = getattr(self, f"teacher_{which}").to(device, non_blocking=True).float()
        for lr in self.lowrank:
            index = getattr(lr, which).to(device, non_blocking=True)
            if index.numel():
                rebuilt = lr.basis.decode_tensor(getattr(lr, f"{which}_coefficients").to(device, non_blocking=True))
                # not in place: on the CPU in float32, z is the batch's own tensor
                z = z.reshape(-1, z.shape[-1]).index_put((index,), rebuilt).reshape(z.shape)
        return z

    def main_pass(self, mode: str) -> tuple[Tensor, Tensor]:
        """(flat student index [B, La], bool [B, La] rows it replaces Proj-pre(z_al) in) of main pass `mode`
        ("teacher" or "student_aligned")."""
        if mode == "teacher":
            return self.answer_start
        if self.student_aligned is None:
            raise ValueError("main_pass_answer='student_aligned' needs rows aligned by text: make the examples with "
                             "make_example(..., teacher_tokenizer=...) (or train with --main-pass-answer teacher)")
        return self.student_aligned

    def pin_memory(self) -> "BatchRows":
        """The same rows in page-locked memory (fast, asynchronous copies to a GPU)."""
        pin = lambda t: t if t is None or isinstance(t, bool) else (  # noqa: E731
            tuple(x.pin_memory() for x in t) if isinstance(t, tuple) else t.pin_memory())  # BatchLowRank's in the tuple
        return BatchRows(**{f.name: pin(getattr(self, f.name)) for f in fields(self)})


def _pad(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad a ragged list of [L_i, ...] into [B, L, ...] plus its bool validity mask [B, L]."""
    mask = pad_sequence([torch.ones(r.shape[0], dtype=torch.bool) for r in rows], batch_first=True)
    return pad_sequence(rows, batch_first=True), mask


def _placed_index(placed: list[StudentRows], student_len: int, n_rows: int) -> tuple[Tensor, Tensor]:
    index = torch.zeros(len(placed), n_rows, dtype=torch.long)
    for i, p in enumerate(placed):
        index[i, p.rows] = p.states + i * student_len
    return index, _pad([p.mask for p in placed])[0]


def _batch_lowrank(rows: list[Rows], teacher_hidden: list[Tensor], lowrank: list[LowRankRows | None],
                   n_answer: int, n_question: int) -> tuple[BatchLowRank, ...]:
    """Where the low-rank rows of each example land in the padded z_al [B, n_answer] and z_ql [B, n_question],
    with their coefficients, grouped by basis (the parts of a multi-part cache each have their own)."""
    groups: dict[int, tuple[ContextBasis, list[list[Tensor]]]] = {}
    for i, (r, h, lr) in enumerate(zip(rows, teacher_hidden, lowrank)):
        if lr is None:
            continue
        slot = torch.full((h.shape[0],), -1, dtype=torch.long)  # teacher row -> its line in lr.coefficients
        slot[lr.rows] = torch.arange(lr.rows.shape[0])
        parts = groups.setdefault(id(lr.basis), (lr.basis, [[], [], [], []]))[1]
        for k, (index, width) in enumerate([(r.teacher_answer, n_answer), (r.teacher_question, n_question)]):
            line = slot[index]
            at = torch.nonzero(line >= 0).flatten()
            parts[2 * k].append(at + i * width)
            parts[2 * k + 1].append(lr.coefficients[line[at]])
    return tuple(BatchLowRank(basis, *(torch.cat(p) for p in parts)) for basis, parts in groups.values())


def batch_rows(rows: list[Rows], teacher_hidden: list[Tensor], student_len: int,
               lowrank: list[LowRankRows | None] | None = None) -> BatchRows:
    """The `BatchRows` of a batch of examples: their `Rows`, cached teacher states [Lt_i, dt], the padded
    student length (the student states' dim 1) and, read in stored precision, their low-rank rows."""
    za, a_mask = _pad([h[r.teacher_answer] for r, h in zip(rows, teacher_hidden)])
    zl, l_mask = _pad([h[r.teacher_question] for r, h in zip(rows, teacher_hidden)])
    zq, q_mask = _pad([r.student_question + i * student_len for i, r in enumerate(rows)])
    n_rows = za.shape[1]
    aligned = None
    if all(r.student_aligned is not None for r in rows):
        aligned = _placed_index([r.student_aligned for r in rows], student_len, n_rows)
    lr = () if lowrank is None else _batch_lowrank(rows, teacher_hidden, lowrank, n_rows, zl.shape[1])
    return BatchRows(za, a_mask, zl, l_mask, torch.cat([r.targets for r in rows]), zq, q_mask,
                     _placed_index([r.answer_start for r in rows], student_len, n_rows), aligned, lr,
                     all(r.context for r in rows))


def teacher_rows(hidden_rows: Tensor, teacher_ids: Tensor, spans: Spans) -> tuple[Tensor, Tensor, Tensor]:
    """(question-state index, answer-state index, answer target ids) in the teacher's tokens; `hidden_rows`
    [Lt] bool marks the rows the cache stores a state for."""
    ans = torch.cat([torch.arange(a - 1, b - 1) for a, b in spans])
    keep = hidden_rows[:int(ans.max()) + 1].clone()
    keep[ans] = False
    targets = torch.cat([teacher_ids[a:b] for a, b in spans])
    return keep.nonzero().squeeze(1), ans, targets


def answer_start_rows(teacher_spans: Spans, student_spans: Spans) -> tuple[Tensor, Tensor]:
    """(index in z_al's layout of the row predicting each span's first answer token, index of the
    student state before that answer).

    In the main pass the question is the student's, so its first answer token is predicted from the
    student's last question state (in student space: Proj-pre is not applied), not from the teacher
    state T[a-1]: that state already predicts the answer, and reading it off lets the Recalibrator
    ignore the student (docs/benchmarks.md, quality, "How we got here", item 1)."""
    lengths = torch.tensor([b - a for a, b in teacher_spans])
    rows = torch.cumsum(lengths, 0) - lengths
    return rows, torch.tensor([a - 1 for a, _ in student_spans])


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


def student_answer_rows(student_ids: Tensor, student_spans: Spans, teacher_ids: Tensor, teacher_spans: Spans,
                        student_tokenizer: Any, teacher_tokenizer: Any) -> Tensor:
    """Index of the student state that predicts each teacher answer token, in z_al's layout.

    Teacher token j of a span starts at character c_j of the answer; the student state that predicts the
    text from c_j on is the one after the student's last answer token ending at or before c_j (its last
    question state when there is none). A teacher token inside a longer student token thus shares the
    state before that student token: the Recalibrator tells them apart by position."""
    rows = []
    for (ta, tb), (sa, sb) in zip(teacher_spans, student_spans):
        t_ends = answer_char_ends(teacher_tokenizer, teacher_ids[ta:tb])
        s_ends = torch.tensor(answer_char_ends(student_tokenizer, student_ids[sa:sb]))
        rows += [sa - 1 + int((s_ends <= c).sum()) for c in [0] + t_ends[:-1]]
    return torch.tensor(rows, dtype=torch.long)


def student_question_index(student_spans: Spans) -> Tensor:
    end = student_spans[-1][1]
    keep = torch.ones(end, dtype=torch.bool)
    for a, b in student_spans:
        keep[a:b] = False
    return keep.nonzero().squeeze(1)


def uld_rows(student_spans: Spans, teacher_spans: Spans) -> tuple[Tensor, Tensor]:
    """(student state index, teacher state index) of index-aligned answer tokens (the ULD baseline)."""
    s_idx, t_idx = [], []
    for (sa, sb), (ta, tb) in zip(student_spans, teacher_spans):
        n = min(sb - sa, tb - ta)
        s_idx.append(torch.arange(sa - 1, sa - 1 + n))
        t_idx.append(torch.arange(ta - 1, ta - 1 + n))
    return torch.cat(s_idx), torch.cat(t_idx)


def _placed(rows: Tensor, states: Tensor, n: int) -> StudentRows:
    return StudentRows(rows, states, torch.zeros(n, dtype=torch.bool).index_fill(0, rows, True))


def example_rows(student_ids: Tensor, student_spans: Spans, hidden_rows: Tensor, teacher_ids: Tensor,
                 teacher_spans: Spans, tokenizers: tuple[Any, Any] | None = None, context: bool = True) -> Rows:
    """Every index tensor of one example; `tokenizers` (student's, teacher's) add the student-aligned rows;
    `context=False` leaves z_ql empty (a step that reads no teacher context row)."""
    q, a, targets = teacher_rows(hidden_rows, teacher_ids, teacher_spans)
    q = q if context else q[:0]
    n = len(targets)
    aligned = None
    if tokenizers is not None:
        states = student_answer_rows(student_ids, student_spans, teacher_ids, teacher_spans, *tokenizers)
        aligned = StudentRows(torch.arange(n), states, torch.ones(n, dtype=torch.bool))
    us, ut = uld_rows(student_spans, teacher_spans)
    return Rows(q, a, targets, student_question_index(student_spans),
                _placed(*answer_start_rows(teacher_spans, student_spans), n), aligned, us, ut, context)
