"""`genrecal-cache audit`: is a cache received from elsewhere faithful to the teacher it names?

N random ok samples are recomputed here with the transformers backend (the reference) from the
samples the cache stores (messages and images), and compared with the cache:

- token ids and answer mask: the teacher's own tokenization of the sample, exactly;
- hidden states: |cached - recomputed| per value within what the cache's codec allows
  (`HiddenCodec.error_bound`, format/codecs.py) plus `tolerance` x the token's RMS for the
  recomputation's own rounding (another GPU, dtype or kernel); max and mean error are reported with
  the codec's allowance beside them;
- the head: the cache's final norm and lm_head against the ones exported from the teacher (within bf16
  rounding), and top-1 agreement of head(hidden): the cache's head on the cached states against the
  teacher's own head on the recomputed ones, and the stored top-k's first id against the same;
  the KL between the two (genrecal_cache/fidelity.py) is reported.

Each check is one line with its figures; the audit passes when all do. It catches a cache extracted
from another revision of the teacher, a wrongly exported head, wrong masks, or an engine whose "final"
states are not the model's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .backends.hf import HFBackend
from .config import AuditConfig
from .data import Sample, decode_image
from .dtypes import torch_dtype
from .extract import resolve_max_len
from .families import adapter_for, model_config
from .fidelity import fidelity
from .format.codecs import hidden_codec
from .format.roles import CONTEXT_CODEC, FLAG_COMPACT, ContextBasis
from .format.head import TeacherHead
from .parts import open_cache

__all__ = ["AuditReport", "Check", "audit"]


HEAD_RTOL = 2.0 ** -7  # a head exported in bf16 differs from the float32 one by at most this, relatively


@dataclass
class Check:
    name: str
    ok: bool
    figures: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.figures}"


@dataclass
class AuditReport:
    cache: str
    teacher: str
    samples: list[str]  # ids of the samples recomputed
    tokens: int
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def format(self) -> str:
        lines = [f"audit of {self.cache} against {self.teacher}: {len(self.samples)} samples, {self.tokens} tokens "
                 f"recomputed with the transformers backend", *map(str, self.checks)]
        failed = [c.name for c in self.checks if not c.ok]
        lines.append("PASS" if not failed else f"FAIL ({', '.join(failed)})")
        return "\n".join(lines)


def audit(cache: str | os.PathLike, teacher: str, samples: int = AuditConfig.samples, seed: int = AuditConfig.seed,
          device: str = AuditConfig.device, dtype: str = AuditConfig.dtype, tolerance: float = AuditConfig.tolerance,
          min_top1: float | None = AuditConfig.min_top1,
          storage_options: dict[str, Any] | None = None) -> AuditReport:
    """Recompute `samples` random ok samples of `cache` with `teacher` and compare (see the module doc).
    `min_top1`: least top-1 agreement [default: 0.99 for lossless codecs, 0.95 for fp8/ecq]."""
    with open_cache(cache, storage_options) as tc:
        m = tc.manifest
        ok = np.flatnonzero(np.asarray(tc.index.column("status").to_pylist()) == "ok")
        chosen = sorted(np.random.default_rng(seed).choice(ok, size=min(samples, len(ok)), replace=False).tolist())
        cached = [tc[i] for i in chosen]
        cache_head = tc.head()
        basis = tc.context_basis()  # None but for a single-part low-rank cache (parts: each has its own)
    config = model_config(teacher, "--teacher")
    adapter = adapter_for(config)
    processor = adapter.load_processor(teacher)
    max_len = (m.extra.get("extract") or {}).get("max_len") or resolve_max_len(None, config)
    pad_id = processor.tokenizer.pad_token_id or 0
    backend = HFBackend(adapter, teacher, torch_dtype(dtype), device, pad_id)
    try:
        encoded = [adapter.encode(processor, Sample(id=s.id, messages=s.messages, images=s.images, image_refs=[],
                                                    extra=s.extra), [decode_image(b) for b in s.images], max_len)
                   for s in cached]
        same = [(s, e) for s, e in zip(cached, encoded) if np.array_equal(e.input_ids.numpy(), s.token_ids)]
        exact = [backend.hidden_states([e])[0].float().cpu().numpy() for _, e in same]
        teacher_head = backend.head.to("cpu")
    finally:
        backend.close()
    codec = hidden_codec(m.hidden_codec)
    floor = min_top1 if min_top1 is not None else (0.99 if codec.name in ("bf16", "fp32") else 0.95)
    checks = [_sequence_check("token ids", cached, [e.input_ids.numpy() for e in encoded], "token_ids"),
              _sequence_check("answer mask", cached, [e.answer_mask.numpy() for e in encoded], "answer_mask"),
              _head_check(cache_head, teacher_head)]
    if same:
        # role-aware caches (docs/cache-format.md, row roles): the exact checks hold at the rows stored at the
        # codec; the top-k is compared where it is stored; low-rank context rows get their own check
        rows = [s.exact_rows & s.topk_rows for s, _ in same]
        ex = [x[s.exact_rows] for x, (s, _) in zip(exact, same)]
        states = [s.hidden[s.exact_rows] for s, _ in same]
        checks += [_hidden_check(codec, ex, states, tolerance),
                   *_top1_checks(cache_head, teacher_head, [x[r] for x, r in zip(exact, rows)],
                                 [s.hidden[r] for (s, _), r in zip(same, rows)],
                                 [s.topk_ids[r] for (s, _), r in zip(same, rows)], floor)]
        if basis is not None:
            checks.append(_context_check(basis, [x[s.row_flags & FLAG_COMPACT > 0] for x, (s, _) in zip(exact, same)],
                                         [s.hidden[s.row_flags & FLAG_COMPACT > 0] for s, _ in same], tolerance))
    else:
        checks.append(Check("hidden states", False, "not compared: no sample tokenizes as the cache says"))
    return AuditReport(str(cache), teacher, [s.id for s in cached], sum(len(s.token_ids) for s in cached), checks)


def _sequence_check(name: str, cached: list[Any], recomputed: list[np.ndarray], field: str) -> Check:
    bad = []
    for s, r in zip(cached, recomputed):
        c = getattr(s, field)
        if c.shape != r.shape or not np.array_equal(c.astype(r.dtype), r):
            where = (f"{len(c)} tokens cached, {len(r)} recomputed" if c.shape != r.shape
                     else f"first at token {int(np.flatnonzero(c.astype(r.dtype) != r)[0])}")
            bad.append(f"{s.id!r} ({where})")
    if not bad:
        return Check(name, True, f"equal in all {len(cached)} samples")
    return Check(name, False, f"differ in {len(bad)} of {len(cached)} samples, e.g. {bad[0]}")


def _head_check(cache_head: TeacherHead, teacher_head: TeacherHead) -> Check:
    def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
        if a is None or b is None:
            return 0.0 if a is None and b is None else float("inf")
        if a.shape != b.shape:
            return float("inf")
        a, b = a.float(), b.float()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    d_lm = rel(cache_head.lm_head_weight, teacher_head.lm_head_weight)
    d_norm = max(rel(cache_head.norm_weight, teacher_head.norm_weight),
                 rel(cache_head.norm_bias, teacher_head.norm_bias))
    ok = d_lm <= HEAD_RTOL and d_norm <= HEAD_RTOL and cache_head.config == teacher_head.config
    figures = (f"lm_head max |diff| {d_lm:.3g}, final norm {d_norm:.3g} of the teacher's largest value "
               f"(bf16 export allows {HEAD_RTOL:.3g})")
    if cache_head.config != teacher_head.config:
        figures += f"; head config {cache_head.config} vs the teacher's {teacher_head.config}"
    return Check("head", ok, figures)


def _hidden_check(codec: Any, exact: list[np.ndarray], cached: list[np.ndarray], tolerance: float) -> Check:
    n = beyond = 0
    max_err = max_allowed = sum_err = sum_bound = 0.0
    for x, c in zip(exact, cached):
        err, bound = np.abs(c.astype(np.float64) - x), codec.error_bound(x).astype(np.float64)
        rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=1, keepdims=True))
        allowed = bound + tolerance * rms
        beyond += int((err > allowed).sum())
        if err.size:  # the largest error, beside what is allowed there
            worst = np.unravel_index(int(np.argmax(err)), err.shape)
            if err[worst] >= max_err:
                max_err, max_allowed = float(err[worst]), float(allowed[worst])
        sum_err, sum_bound, n = sum_err + float(err.sum()), sum_bound + float(bound.sum()), n + err.size
    figures = (f"max |err| {max_err:.3g} where {max_allowed:.3g} is allowed, mean |err| {sum_err / max(n, 1):.3g} "
               f"(codec {codec.name} allows mean {sum_bound / max(n, 1):.3g}, + {tolerance} x token RMS for "
               f"recomputation); {beyond} of {n} values beyond")
    return Check("hidden states", beyond == 0, figures)


def _context_check(basis: ContextBasis, exact: list[np.ndarray], cached: list[np.ndarray], tolerance: float) -> Check:
    """Low-rank context rows: the cached coefficients are the recomputed states' coefficients on the cache's
    basis, within fp8 (the context codec) plus `tolerance` x their RMS; and the share of the states' variance
    the basis keeps (a figure: how much the regularization pass sees of the context)."""
    x, c = np.concatenate(exact) if exact else np.zeros((0, basis.mean.shape[0])), np.concatenate(cached) \
        if cached else np.zeros((0, basis.mean.shape[0]))
    if not len(x):
        return Check("context rows (low-rank)", True, "no low-rank row in the audited samples")
    want, got = basis.encode(x).astype(np.float64), basis.encode(c).astype(np.float64)
    rms = np.sqrt(np.mean(np.square(want), axis=1, keepdims=True))
    allowed = CONTEXT_CODEC.error_bound(want.astype(np.float32)).astype(np.float64) + tolerance * rms
    beyond = int((np.abs(got - want) > allowed).sum())
    centred = x - basis.mean
    kept = 1 - float(np.square(centred - want @ basis.basis).sum() / max(np.square(centred).sum(), 1e-30))
    return Check("context rows (low-rank)", beyond == 0,
                 f"{beyond} of {want.size} coefficients beyond fp8 + {tolerance} x RMS of the recomputed ones; "
                 f"the rank-{basis.rank} basis keeps {100 * kept:.1f}% of the context states' variance")


@torch.no_grad()
def _top1_checks(cache_head: TeacherHead, teacher_head: TeacherHead, exact: list[np.ndarray],
                 cached: list[np.ndarray], topk_ids: list[np.ndarray], floor: float) -> list[Check]:
    x, c = np.concatenate(exact), np.concatenate(cached).astype(np.float32)
    want = teacher_head.logits(torch.from_numpy(x)).argmax(-1).numpy()
    got = cache_head.logits(torch.from_numpy(c)).argmax(-1).numpy()
    stored = np.concatenate(topk_ids)[:, 0]
    kl = fidelity(teacher_head, x, c).mean_kl
    head_agree, stored_agree = float((got == want).mean()), float((stored == want).mean())
    return [Check("top-1 of head(hidden)", head_agree >= floor,
                  f"{head_agree:.4f} of {len(want)} tokens agree (the cache's head on its states vs the teacher's "
                  f"head on recomputed states; at least {floor} needed); teacher-head KL {kl:.3g} nats/token"),
            Check("stored top-k", stored_agree >= floor,
                  f"first stored id is the teacher's top-1 on {stored_agree:.4f} of the tokens (at least {floor})")]
