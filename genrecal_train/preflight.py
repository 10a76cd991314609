"""Checks before the first training step: the cache, its teacher head and the teacher we are told about
must agree (a wrong head or another teacher's cache would train silently on the wrong targets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from transformers import AutoTokenizer

from genrecal_cache.families import adapter_for, model_config
from genrecal_cache.format.head import TeacherHead
from genrecal_cache.format.manifest import TOKENIZER_DIR, CacheFormatError
from genrecal_cache.format.tokenizer import tokenizer_sha256
from genrecal_train.config import TrainConfig

__all__ = ["check_cache_matches", "check_head_reproduces_topk", "load_teacher_tokenizer"]


def check_cache_matches(cache, head: TeacherHead, cfg: TrainConfig) -> None:
    """Refuse, before any step, a cache whose head or teacher does not match what we are told."""
    m = cache.manifest
    where = f"cache {cfg.cache}"
    if (head.hidden_size, head.vocab_size) != (m.hidden_size, m.vocab_size):
        raise ValueError(f"{where}: teacher_head.safetensors is [{head.vocab_size} x {head.hidden_size}] but the "
                         f"manifest says vocab {m.vocab_size}, hidden {m.hidden_size}: the head belongs to another "
                         "teacher; re-extract or restore the right teacher_head.safetensors")
    check_head_reproduces_topk(cache, head, where)
    if not cfg.expect_teacher:
        return
    if not Path(cfg.expect_teacher).is_dir():
        if cfg.expect_teacher != m.teacher.get("id"):
            raise ValueError(f"{where} was extracted from teacher {m.teacher.get('id')!r}, not {cfg.expect_teacher!r}")
        return
    tcfg = model_config(cfg.expect_teacher, "--expect-teacher")
    t_adapter = adapter_for(tcfg)
    tok = t_adapter.load_processor(cfg.expect_teacher).tokenizer
    if tokenizer_sha256(tok) != m.tokenizer_sha256:
        raise ValueError(f"{where}: its teacher tokenizer differs from {cfg.expect_teacher}'s (sha256 mismatch): "
                         "the token ids in the cache would mean other words; use the cache made with this teacher")
    text = tcfg.get_text_config()
    if (text.hidden_size, text.vocab_size) != (head.hidden_size, head.vocab_size):
        raise ValueError(f"{where}: teacher head is [{head.vocab_size} x {head.hidden_size}] but "
                         f"{cfg.expect_teacher} has vocab {text.vocab_size}, hidden {text.hidden_size}")
    # Same tokenizer and shapes can still be another checkpoint (another seed, size or fine-tune):
    # compare a few rows of its lm_head with the cached head (read by slice, not the whole matrix).
    names = t_adapter.head_tensor_names["embed_tokens.weight" if t_adapter.tied_head(tcfg) else "lm_head.weight"]
    rows = _checkpoint_lm_head_rows(Path(cfg.expect_teacher), head.vocab_size, names)
    if rows is not None:
        idx, got = rows
        ref = head.lm_head_weight[idx].detach().float().cpu()
        rel = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
        if rel > 2e-2:  # bf16 rounding is ~4e-3; another checkpoint is ~1
            raise ValueError(f"{where}: its teacher head is not {cfg.expect_teacher}'s lm_head (relative difference "
                             f"{rel:.3g} on {len(idx)} rows): the cache was extracted from another checkpoint of "
                             "this architecture; use the cache made with this teacher")


def check_head_reproduces_topk(cache, head: TeacherHead, where: str, max_tokens: int = 16) -> None:
    """The head must give back the top-k stored with the first usable sample (cheap: a few tokens).

    Catches a teacher_head.safetensors of the right shape from another teacher (or a corrupted one)."""
    first = next((i for group in cache.plan() for i in group), None)
    if first is None:
        return
    s = cache[first]
    rows = (s.topk_rows & s.exact_rows).nonzero()[0][:max_tokens]  # role-aware caches: top-k at answer rows
    n = len(rows)
    if n == 0:
        return
    k = s.topk_ids.shape[1]
    dev = head.lm_head_weight.device
    ids, _ = head.topk_logprobs(torch.from_numpy(s.hidden[rows]).to(dev), k)
    cached = torch.from_numpy(s.topk_ids[rows].astype("int64"))
    ids = ids.long().cpu()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, cached)) / (n * k)
    if overlap < 0.5:  # the right head agrees up to near-ties (~1.0); another head agrees by chance (~k/V)
        raise CacheFormatError(f"{where}: teacher_head.safetensors does not reproduce the cached top-{k} of sample "
                         f"{s.id!r} (overlap {overlap:.2f}): the head belongs to another teacher or is corrupt; "
                         "run `genrecal-cache verify`, re-download or re-extract the cache")


def _checkpoint_lm_head_rows(folder: Path, vocab: int, names: tuple[str, ...]) -> tuple[Tensor, Tensor] | None:
    """(row indices, float32 rows) of the lm_head in a safetensors checkpoint folder, under the first of the
    family's tensor `names` present (genrecal_cache/families); None if not found."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        weight_map = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                weight_map.update({k: f.name for k in fh.keys()})
    name = next((n for n in names if n in weight_map), None)
    if name is None:
        return None
    n = min(32, vocab)
    with safe_open(str(folder / weight_map[name]), framework="pt") as fh:
        sl = fh.get_slice(name)
        if sl.get_shape()[0] != vocab:
            return None  # shapes were compared above; a differently laid-out checkpoint is not judged here
        mid = vocab // 2
        parts = [sl[0:n], sl[mid:min(vocab, mid + n)]]
    idx = torch.cat([torch.arange(0, n), torch.arange(mid, min(vocab, mid + n))])
    return idx, torch.cat(parts).float()


def load_teacher_tokenizer(cfg: TrainConfig, cache) -> Any:
    """The teacher's tokenizer of the open `cache` (for `align.student_answer_rows`), always the one the cache
    was made with (its hash): `cfg.teacher_tokenizer` when given, else the copy stored in the cache
    (`teacher_tokenizer/`, fetched like the head for a remote cache), else, for caches written before genrecal
    stored it, `cfg.expect_teacher` or the teacher folder/hub id the manifest records."""
    m = cache.manifest
    stored = None if cfg.teacher_tokenizer else cache.teacher_tokenizer()
    if stored is not None:
        return stored
    src = cfg.teacher_tokenizer or cfg.expect_teacher or m.teacher.get("id")
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        where = (f"the tokenizer at --teacher-tokenizer {src!r} could not be loaded" if cfg.teacher_tokenizer else
                 f"cache {cfg.cache} holds no teacher tokenizer (written before genrecal stored one in "
                 f"{TOKENIZER_DIR}/) and the teacher it records, {src!r}, is not available")
        raise ValueError(f"{where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                         "main_pass_answer='student_aligned' (the default) aligns answers by their text and needs the "
                         "teacher's tokenizer. Fix: pass --teacher-tokenizer with the teacher's tokenizer (a folder or "
                         "hub id), or re-extract the cache with this genrecal (it stores the tokenizer), or train with "
                         "--main-pass-answer teacher") from e
    if tokenizer_sha256(tok) != m.tokenizer_sha256:
        raise ValueError(f"cache {cfg.cache}: the tokenizer at {src!r} is not the one its teacher used (sha256 "
                         "mismatch), so answer tokens would be aligned wrongly; pass --teacher-tokenizer with the "
                         "teacher's own tokenizer")
    return tok
