"""`genrecal-cache plan`: the size of a cache before extracting it, with compression measured through
the format's own arrays and codec chains (format/layout.py) on synthetic LLM-like features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from .fidelity import synthetic_post_norm_states, synthetic_topk
from .format.codecs import DEFAULT_HIDDEN_CODEC, hidden_codec as get_hidden_codec
from .format.layout import Layout, create_feature_arrays, plan_layout
from .format.manifest import ARRAY_NAMES

__all__ = ["SizeEstimate", "estimate_cache_size", "sync_get"]


@dataclass
class SizeEstimate:
    """What a cache of `tokens` tokens would take on disk (see `estimate_cache_size`)."""
    tokens: int
    samples: int
    hidden_size: int
    vocab_size: int
    topk: int
    hidden_codec: str
    layout: Layout
    arrays: dict[str, dict[str, float]]  # per array: raw/stored bytes per token, ratio, bytes, shards
    head_bytes: int
    samples_bytes: int                   # samples.parquet
    metadata_bytes: int                  # zarr.json files + manifest
    files: int

    @property
    def features_bytes(self) -> int:
        return int(sum(a["bytes"] for a in self.arrays.values()))

    @property
    def total_bytes(self) -> int:
        return self.features_bytes + self.head_bytes + self.samples_bytes + self.metadata_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "samples": self.samples, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "topk": self.topk, "hidden_codec": self.hidden_codec,
                "shard_tokens": self.layout.shard_tokens, "chunk_tokens": self.layout.chunk_tokens,
                "arrays": self.arrays, "features_bytes": self.features_bytes, "head_bytes": self.head_bytes,
                "samples_bytes": self.samples_bytes, "metadata_bytes": self.metadata_bytes, "files": self.files,
                "total_bytes": self.total_bytes}

    def format(self) -> str:
        def gib(n: float) -> str:
            for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
                if n >= scale:
                    return f"{n / scale:,.2f} {unit}"
            return f"{n / 2**10:,.2f} KiB"
        codec = get_hidden_codec(self.hidden_codec)
        h = self.arrays["hidden"]
        lines = [
            f"plan         {self.tokens:,} tokens, {self.samples:,} samples; hidden {self.hidden_size}, vocab "
            f"{self.vocab_size:,}, top-k {self.topk}",
            f"hidden codec {codec.name}: {codec.description}",
            f"layout       shards of {self.layout.shard_tokens} tokens, hidden chunks of "
            f"{self.layout.chunk_tokens['hidden']}; {self.files:,} files",
            "arrays       name            raw B/tok  est. ratio  est. B/tok  est. size",
        ]
        for name, a in self.arrays.items():
            lines.append(f"             {name:<15} {a['raw_bytes_per_token']:>9,.1f}  {a['ratio']:>9.2f}x  "
                         f"{a['bytes_per_token']:>10,.1f}  {gib(a['bytes'])}")
        per_tok = self.features_bytes / max(self.tokens, 1)
        lines += [
            f"hidden       {h['bytes_per_token'] / (2 * self.hidden_size):.3f}x of raw bf16 "
            f"({2 * self.hidden_size:,} B/token)",
            f"features     {gib(self.features_bytes)} ({per_tok:,.1f} B/token)",
            f"head         {gib(self.head_bytes)} (lm_head {self.vocab_size:,} x {self.hidden_size} + norm)",
            f"samples      {gib(self.samples_bytes)} (samples.parquet: text and embedded images as given)",
            f"total        {gib(self.total_bytes)}",
            "note         compression ratios were measured just now on synthetic LLM-like data (heavy-tailed "
            "post-norm states with outlier channels, Gaussian-logit top-k, uniform token ids); real "
            "activations compress differently (bf16 typically 1.3-1.5x), so treat sizes as +-15%.",
        ]
        return "\n".join(lines)


def estimate_cache_size(tokens: int, hidden_size: int, vocab_size: int, topk: int,
                        hidden_codec: str = DEFAULT_HIDDEN_CODEC, samples: int | None = None, *,
                        text_bytes_per_sample: int = 600, image_bytes_per_sample: int = 0,
                        head_dtype: str = "bfloat16", shard_tokens: int | None = None,
                        chunk_tokens: int | None = None, seed: int = 0) -> SizeEstimate:
    """Size of a cache before extracting it: the writer's layout (`plan_layout`), its arrays and
    codec chains (`create_feature_arrays`), and compression ratios measured by writing one chunk
    of synthetic LLM-like features through those very arrays (in memory). `samples` defaults to
    tokens / 512; samples.parquet is estimated from the text and image bytes per sample."""
    if min(tokens, hidden_size, vocab_size, topk) < 1:
        raise ValueError(f"tokens, hidden_size, vocab_size and topk must be >= 1 (got {tokens}, {hidden_size}, "
                         f"{vocab_size}, {topk})")
    if topk > vocab_size:
        raise ValueError(f"topk ({topk}) cannot exceed vocab_size ({vocab_size})")
    codec = get_hidden_codec(hidden_codec)
    samples = max(1, tokens // 512) if samples is None else samples
    layout = plan_layout(hidden_size, topk, codec.name, shard_tokens=shard_tokens, chunk_tokens=chunk_tokens)

    # measure: one full inner chunk of each array, of synthetic LLM-like data, written through the
    # writer's own array definitions (in memory): blosc/zstd ratios depend on the chunk size too
    def synthetic(name: str, n: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if name == "token_ids":
            return rng.integers(0, vocab_size, n).astype(np.int32)
        if name == "answer_mask":  # alternating question/answer spans of random lengths (mean 96 / 32 tokens)
            lengths = np.stack([rng.geometric(1 / 96, n), rng.geometric(1 / 32, n)], axis=1).reshape(-1)
            return (np.repeat(np.arange(lengths.size) % 2, lengths)[:n]).astype(bool)
        if name == "hidden":
            return codec.to_stored(synthetic_post_norm_states(n, hidden_size, seed=seed))
        ids, lps = synthetic_topk(n, vocab_size, topk, seed=seed)
        return ids if name == "topk_ids" else lps

    measured: dict[str, float] = {}
    raw_rows: dict[str, float] = {}
    for name in ARRAY_NAMES:
        n = max(1, min(layout.chunk_tokens[name], 1 << 16))
        store = MemoryStore()
        probe = Layout(shard_tokens=n, chunk_tokens={a: n for a in ARRAY_NAMES})
        a = create_feature_arrays(zarr.open_group(store, mode="w", zarr_format=3), probe, codec, hidden_size,
                                  topk)[0][name]
        data = synthetic(name, n)
        a.resize((n, *a.shape[1:]))
        a[:] = data
        key = f"{name}/c/0" + ("/0" if a.ndim == 2 else "")
        measured[name] = (len(sync_get(store, key)) - 16 - 4 - 4) / n  # minus the index, its crc32c and the chunk's
        raw_rows[name] = codec.row_bytes(hidden_size) if name == "hidden" else data[0].nbytes

    S = layout.shard_tokens
    shards = -(-tokens // S)
    out: dict[str, dict[str, float]] = {}
    for name in ARRAY_NAMES:
        index = shards * (16 * (S // layout.chunk_tokens[name]) + 4)
        nbytes = measured[name] * tokens + index
        out[name] = {"raw_bytes_per_token": float(raw_rows[name]), "ratio": raw_rows[name] / measured[name],
                     "bytes_per_token": nbytes / tokens, "bytes": float(nbytes), "shards": shards}
    itemsize = 2 if head_dtype in ("bfloat16", "float16") else 4
    head_bytes = (vocab_size + 1) * hidden_size * itemsize + 512
    samples_bytes = samples * (text_bytes_per_sample + image_bytes_per_sample + 64) + 4096
    metadata_bytes = len(ARRAY_NAMES) * 1200 + 600 + 100 * (len(ARRAY_NAMES) * shards + 3)
    files = len(ARRAY_NAMES) * (shards + 1) + 4  # shards + zarr.json per array, group zarr.json, 3 files
    return SizeEstimate(tokens=tokens, samples=samples, hidden_size=hidden_size, vocab_size=vocab_size, topk=topk,
                        hidden_codec=codec.name, layout=layout, arrays=out, head_bytes=head_bytes,
                        samples_bytes=samples_bytes, metadata_bytes=metadata_bytes, files=files)


def sync_get(store: Any, key: str) -> bytes:
    """Bytes of `key` in a zarr store (synchronously)."""
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        raise KeyError(key)
    return buf.to_bytes()
