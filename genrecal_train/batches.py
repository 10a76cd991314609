"""Streaming training data: cached teacher features + the student's own encoding of the same sample.

The student's inputs are rebuilt from the conversation and images stored in the cache with the
student's processor and chat template; the teacher side comes straight from the cache. A
background thread prepares batches ahead (bounded queue), so the trainer rarely waits.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from genrecal_cache.data import Sample, decode_image
from genrecal_cache.families import EncodeError, Encoded, FamilyAdapter
from genrecal_cache.families import collate as collate_inputs
from genrecal_cache.format.manifest import answer_spans
from genrecal_cache.format.roles import FLAG_COMPACT, answer_rows
from genrecal_cache.io.prefetch import prefetch
from genrecal_cache.parts import MultiPartCache
from genrecal_cache.reader import CachedSample, Precision, TeacherCache
from genrecal_train.align import BatchRows, LowRankRows, Rows, batch_rows, example_rows
from genrecal_train.errors import TrainError

__all__ = ["Batch", "CacheStream", "Example", "collate", "make_example"]


@dataclass
class Example:
    index: int  # sample index in the cache
    student: Encoded
    student_labels: torch.Tensor  # [Ls] int64: answer tokens and the token closing each answer; -100 elsewhere
    student_spans: list[tuple[int, int]]  # answer content spans in student tokens, one per assistant turn
    teacher_hidden: torch.Tensor  # [Lt, dt] post-norm, float32 (or bfloat16 as a bf16 cache stores it: the model widens)
    teacher_rows: torch.Tensor  # [Lt] bool: rows the cache stores a state for (role-aware caches leave some out)
    teacher_ids: torch.Tensor  # [Lt] int64
    teacher_spans: list[tuple[int, int]]  # answer spans in teacher tokens, same turns as student_spans
    rows: Rows  # which state feeds which loss (genrecal_train/align.py), computed here, once per example
    teacher_lowrank: LowRankRows | None = None  # read in stored precision: low-rank rows, rebuilt on the device


@dataclass
class Batch:
    examples: list[Example]
    student_inputs: dict[str, torch.Tensor]  # padded ids, attention mask, pixel values...
    student_labels: torch.Tensor  # [B, Ls] padded with -100
    position: int  # samples of this stream consumed once this batch is done (resume point)
    rows: BatchRows  # the examples' loss rows, padded, teacher states gathered (stages 1 and 2)

    @property
    def num_tokens(self) -> int:
        return int(self.student_inputs["attention_mask"].sum()) + sum(int(e.teacher_ids.shape[0]) for e in self.examples)


def make_example(s: CachedSample, adapter: FamilyAdapter, processor, max_len: int,
                 teacher_tokenizer: Any = None, context: bool = True) -> Example:
    """Encode one cached sample for the student, with its loss rows (`Example.rows`). `teacher_tokenizer`
    (the cache's, `preflight.load_teacher_tokenizer`) adds the rows of main_pass_answer='student_aligned';
    `context=False` leaves the regularization pass's input z_ql out (no teacher context row is gathered for a
    step that reads none). Raises EncodeError/ValueError for unusable samples."""
    sample = Sample(id=s.id, messages=s.messages, images=s.images, image_refs=[])
    enc = adapter.encode(processor, sample, [decode_image(b) for b in s.images], max_len)
    s_spans, t_spans = answer_spans(enc.answer_mask), answer_spans(s.answer_mask)
    if not t_spans:
        raise EncodeError(f"sample {s.id!r}: its cached answer mask is empty: no answer token to distil")
    if len(s_spans) != len(t_spans):
        raise EncodeError(f"sample {s.id!r}: {len(t_spans)} answer turns in the teacher tokens but "
                          f"{len(s_spans)} in the student's: the chat templates disagree on the answers")
    if t_spans and t_spans[0][0] == 0:
        raise EncodeError(f"sample {s.id!r}: the teacher answer starts at token 0, nothing predicts it")
    if not s.exact_rows[answer_rows(s.answer_mask)].all():
        raise EncodeError(f"sample {s.id!r}: the cache does not store every answer row's state (row_flags); "
                          f"the cache is corrupt: run `genrecal-cache verify`")
    labels = torch.full_like(enc.input_ids, -100)
    n = enc.input_ids.shape[0]
    for a, b in s_spans:
        end = min(b + 1, n)  # the token that closes the answer teaches the student to stop
        labels[a:end] = enc.input_ids[a:end]
    hidden_rows = torch.from_numpy(s.hidden_rows)
    teacher_ids = torch.from_numpy(np.asarray(s.token_ids, dtype=np.int64))
    tokenizers = None if teacher_tokenizer is None else (processor.tokenizer, teacher_tokenizer)
    rows = example_rows(enc.input_ids, s_spans, hidden_rows, teacher_ids, t_spans, tokenizers, context)
    lowrank = None
    if s.context is not None and context:
        compact = np.flatnonzero(s.row_flags & FLAG_COMPACT)
        lowrank = LowRankRows(torch.from_numpy(compact), torch.from_numpy(s.context[compact]), s.context_basis)
    return Example(index=s.index, student=enc, student_labels=labels, student_spans=s_spans,
                   teacher_hidden=s.hidden_tensor(),
                   teacher_rows=hidden_rows, teacher_ids=teacher_ids, teacher_spans=t_spans, rows=rows,
                   teacher_lowrank=lowrank)


def collate(examples: list[Example], pad_id: int, position: int) -> Batch:
    inputs = collate_inputs([e.student for e in examples], pad_id)
    labels = torch.full(inputs["input_ids"].shape, -100, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, : e.student_labels.shape[0]] = e.student_labels
    rows = batch_rows([e.rows for e in examples], [e.teacher_hidden for e in examples], labels.shape[1],
                      [e.teacher_lowrank for e in examples])
    return Batch(examples, inputs, labels, position, rows)


class CacheStream:
    """Deterministic, resumable, rank-sharded stream of batches over a cache, prefetched in a thread.

    The order is a function of (seed, epoch, rank, world_size) only; `position` counts samples of
    this rank's stream (across epochs), so a restarted run that starts at a checkpoint's position
    sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, cache: TeacherCache | MultiPartCache, adapter: FamilyAdapter, processor, *, batch_size: int,
                 max_len: int, seed: int = 0, rank: int = 0, world_size: int = 1, prefetch: int = 8,
                 teacher_tokenizer: Any = None, precision: Precision = "float32", pin_memory: bool = False,
                 context: bool = True):
        """`teacher_tokenizer`: given, every example carries its student-aligned rows (`make_example`).
        `precision="stored"`: teacher states as the cache stores them (bf16 stays bf16: half the bytes to move,
        widened on the device by the model; low-rank context rows stay coefficients, reconstructed there);
        `pin_memory`: in page-locked memory (fast copies to a GPU); `context=False`: for a step that reads no
        teacher context row (`TrainConfig.reads_context`): they are neither read (`iter_samples(context=False)`)
        nor gathered."""
        self.cache, self.adapter, self.processor, self.context = cache, adapter, processor, context
        self.teacher_tokenizer, self.precision, self.pin_memory = teacher_tokenizer, precision, pin_memory
        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.per_epoch = sum(len(p) for p in cache.plan(rank=rank, world_size=world_size))
        if self.per_epoch == 0:
            raise ValueError(f"cache {cache.url}: no usable ('ok') samples for rank {rank} of {world_size}")
        self.skipped = 0
        self.wait_s = 0.0  # time the consumer spent waiting for data
        self._warned: set[int] = set()  # samples already reported as skipped (once per run, not per epoch)
        self._open: list = []  # batch iterators handed out, closed by close()

    def _examples(self, position: int) -> Iterator[tuple[int, Example | None]]:
        epoch, offset = divmod(position, self.per_epoch)
        n_unusable, reasons = 0, []  # samples skipped since the last usable one, why the first ones were
        while True:
            it = self.cache.iter_samples(order="shuffled", seed=self.seed + epoch, rank=self.rank,
                                         world_size=self.world_size, start=offset, precision=self.precision,
                                         context=self.context)
            for s in it:
                position += 1
                try:
                    example = make_example(s, self.adapter, self.processor, self.max_len, self.teacher_tokenizer,
                                           self.context)
                except (EncodeError, ValueError) as e:
                    self.skipped += 1
                    n_unusable += 1
                    if len(reasons) < 3:
                        reasons.append(f"{s.index} ({s.id!r}): {e}")
                    if n_unusable >= self.per_epoch:  # a whole epoch without one: it would loop for ever
                        raise self._no_usable_sample(reasons) from None
                    if s.index not in self._warned:
                        self._warned.add(s.index)
                        warnings.warn(f"skipping cached sample {s.index} ({s.id!r}): {e}", stacklevel=2)
                    yield position, None
                    continue
                n_unusable, reasons = 0, []
                yield position, example
            epoch, offset = epoch + 1, 0

    def _no_usable_sample(self, reasons: list[str]) -> TrainError:
        shown = "; ".join(r[:300] for r in reasons)
        return TrainError(
            f"cache {self.cache.url}: none of the {self.per_epoch} 'ok' samples of rank {self.rank} can be used for "
            f"the student (max_len={self.max_len}); e.g. {shown}. Usual fixes: raise --max-len when the samples are "
            f"longer, use a student whose chat template can render these conversations, or re-extract a cache "
            f"whose answers are marked")

    def _collated(self, position: int) -> Iterator[Batch]:
        group: list[Example] = []
        for pos, ex in self._examples(position):
            if ex is not None:
                group.append(ex)
            if len(group) == self.batch_size:
                batch = collate(group, self.pad_id, pos)
                if self.pin_memory:  # what the model copies to the GPU: the gathered teacher states
                    batch.rows = batch.rows.pin_memory()
                yield batch
                group = []

    def batches(self, position: int = 0) -> Iterator[Batch]:
        """Endless batches starting at `position`, prepared `prefetch` ahead in a background thread
        (stopped and joined by closing the iterator, or `close()`)."""
        it = self._timed(prefetch(self._collated(position), self.prefetch))
        self._open.append(it)
        return it

    def close(self) -> None:
        """Stop every batch iterator of this stream and join their threads."""
        while self._open:
            self._open.pop().close()

    def _timed(self, ready: Iterator[Batch]) -> Iterator[Batch]:
        try:
            while True:
                t0 = time.perf_counter()
                item = next(ready)
                self.wait_s += time.perf_counter() - t0
                yield item
        finally:
            ready.close()
