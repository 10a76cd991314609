"""A cache rewritten sample by sample through CacheWriter with one change (tests that need a subtly wrong cache)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from genrecal_cache import open_cache
from genrecal_cache.reader import CachedSample
from genrecal_cache.writer import CacheWriter, SampleArrays, SampleRecord


def rewrite_cache(src: Path, out: Path, arrays: Callable[[CachedSample], SampleArrays], topk: int | None = None
                  ) -> Path:
    """`src` written again to `out`: the same samples, teacher, head and storage, each sample's features as
    `arrays(sample)` returns them (`topk`: the rewritten cache's k, default the source's)."""
    cache = open_cache(src)
    m = cache.manifest
    writer = CacheWriter(out, hidden_size=m.hidden_size, vocab_size=m.vocab_size, topk=topk or m.topk,
                         hidden_codec=m.hidden_codec, teacher=m.teacher, tokenizer_sha256=m.tokenizer_sha256,
                         chat_template_sha256=m.chat_template_sha256, head=cache.head(), command="test",
                         storage=m.roles, context_basis=cache.context_basis())
    for i in range(len(cache)):
        s = cache[i]
        writer.add(SampleRecord(id=s.id, messages=s.messages, images=s.images), arrays(s))
    writer.close()
    return out
