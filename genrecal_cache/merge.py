"""`genrecal-cache merge`: a cache written in parts (or any cache) rewritten as one single-part cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .format.manifest import MANIFEST_NAME, Manifest
from .journal import CacheWriteError, DirLock
from .parts import open_cache
from .stops import Position, command_line, stopped_runs
from .writer import CacheWriter, SampleArrays, SampleRecord

__all__ = ["merge"]


def merge(src: str | os.PathLike, out: str | os.PathLike, storage_options: dict[str, Any] | None = None,
          command: str | None = None) -> Manifest:
    """Write the cache at `src` (multi-part, or single) as one single-part cache at `out`: the same rows in
    the same order (the global index), the same features. Hidden states are re-encoded with the same
    codec: bit-exact for bf16 and fp32 (their decoded values are exactly representable). Role-aware storage is
    kept: the same policy and, for low-rank context, the same basis (the coefficients are re-coded from the
    states it reconstructs: equal to float32 rounding).

    One merge at a time writes `out` (its folder lock); a merge that was stopped (killed, interrupted, a
    full disk) is resumed from its last commit by running it again, as an extraction is."""
    command = command or command_line()
    with stopped_runs(out, "merge", command) as position, \
            DirLock(out, what="merge", advice="wait for it to finish (re-running then resumes it or finds the "
                                              "cache complete) or choose another --out"):
        if (Path(out) / MANIFEST_NAME).exists():
            raise CacheWriteError(f"{out} already holds a complete cache; choose a new --out or delete it first")
        return _merge_locked(src, Path(out), storage_options, command, position)


def _merge_locked(src: str | os.PathLike, out: Path, storage_options: dict[str, Any] | None, command: str,
                  position: Position) -> Manifest:
    cache = open_cache(src, storage_options)
    m = cache.manifest
    spec = m.arrays["hidden"]
    extra = {k: v for k, v in m.extra.items() if k not in ("parts", "extract")}
    extra["merged_from"] = list(getattr(cache, "names", [os.fspath(src)]))
    refs = cache.index.column("image_refs").to_pylist()
    try:
        w = CacheWriter(out, hidden_size=m.hidden_size, vocab_size=m.vocab_size, topk=m.topk,
                        hidden_codec=m.hidden_codec, teacher=dict(m.teacher), tokenizer_sha256=m.tokenizer_sha256,
                        chat_template_sha256=m.chat_template_sha256, head=cache.head("cpu"), command=command,
                        shard_tokens=spec["shard_tokens"], chunk_tokens=spec["chunk_tokens"], extra=extra,
                        tokenizer_files=cache.tokenizer_files(), resume=True, storage=m.roles,
                        context_basis=cache.context_basis())
    except BaseException:
        cache.close()
        raise
    done = len(w.committed_ids)  # a resumed merge: its first rows are in place already
    position.samples = done
    try:
        if w.committed_ids != cache.index.column("id").to_pylist()[:done]:
            raise CacheWriteError(f"{out}: cannot resume: the stopped merge wrote other samples than the first "
                                  f"{done} of {src}; delete {out} and run `{command}` again")
        for s in cache.iter_samples("ordered", status="all", start=done):
            position.samples += 1
            row = SampleRecord(id=s.id, messages=s.messages, images=s.images, image_refs=refs[s.index],
                               status=s.status, error=s.error, extra=s.extra)  # type: ignore[arg-type]
            arrays = None if s.status == "error" else SampleArrays(
                token_ids=s.token_ids, answer_mask=s.answer_mask, hidden=s.hidden, topk_ids=s.topk_ids,
                topk_logprobs=s.topk_logprobs)
            w.add(row, arrays)
        return w.close()
    except BaseException:
        w.abort()
        raise
    finally:
        cache.close()
