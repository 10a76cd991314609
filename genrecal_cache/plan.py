"""`genrecal-cache plan`: the size of a cache before extracting it, with compression measured through
the format's own arrays and codec chains (format/layout.py) on synthetic LLM-like features, per row role
(format/roles.py): answer rows, text context rows and image context rows are stored differently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from .config import CachePlanConfig
from .fidelity import synthetic_post_norm_states, synthetic_topk
from .format.codecs import DEFAULT_HIDDEN_CODEC, HiddenCodec, hidden_codec as get_hidden_codec
from .format.layout import Layout, array_names, create_feature_arrays, plan_layout
from .format.roles import (
    CONTEXT_CODEC, FLAG_COMPACT, FLAG_EXACT, FLAG_TOPK, ContextBasis, Storage, answer_rows, row_flags,
)

__all__ = ["SizeEstimate", "estimate_cache_size", "estimate_like", "sample_rows", "sync_get"]


@dataclass
class SizeEstimate:
    """What a cache of `tokens` tokens would take on disk (see `estimate_cache_size`)."""
    tokens: int
    samples: int
    hidden_size: int
    vocab_size: int
    topk: int
    hidden_codec: str
    storage: Storage
    answer_fraction: float               # share of rows that predict an answer token
    image_fraction: float                # share of rows that are image tokens
    layout: Layout
    arrays: dict[str, dict[str, float]]  # per array: raw/stored bytes per token, ratio, bytes, shards
    roles: dict[str, float]              # bytes of the feature arrays by row role: answer, text, image, index
    head_bytes: int
    samples_bytes: int                   # samples.parquet
    metadata_bytes: int                  # zarr.json files + manifest
    files: int
    pilot: bool = False                  # compression measured on a pilot cache's real rows (`sample`)

    @property
    def features_bytes(self) -> int:
        return int(sum(a["bytes"] for a in self.arrays.values()))

    @property
    def basis_bytes(self) -> int:
        """context_basis.safetensors: mean [d] + basis [r, d] float32 (low-rank context only)."""
        return 4 * (self.storage.rank + 1) * self.hidden_size + 256 if self.storage.context == "lowrank" else 0

    @property
    def total_bytes(self) -> int:
        return self.features_bytes + self.head_bytes + self.samples_bytes + self.metadata_bytes + self.basis_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "samples": self.samples, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "topk": self.topk, "hidden_codec": self.hidden_codec,
                "storage": self.storage.as_dict(), "answer_fraction": self.answer_fraction,
                "image_fraction": self.image_fraction, "roles": self.roles, "basis_bytes": self.basis_bytes,
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
            f"storage      context rows {self.storage.context}"
            + (f" (rank {self.storage.rank}, fp8)" if self.storage.rank else "")
            + f", top-k at {self.storage.topk_rows} rows; rows: {self.answer_fraction:.0%} answer, "
              f"{self.image_fraction:.0%} image, {1 - self.answer_fraction - self.image_fraction:.0%} other text",
            f"layout       shards of {self.layout.shard_tokens} tokens, hidden chunks of "
            f"{self.layout.chunk_tokens['hidden']}; {self.files:,} files",
            "arrays       name            raw B/tok  est. ratio  est. B/tok  est. size",
        ]
        for name, a in self.arrays.items():
            lines.append(f"             {name:<15} {a['raw_bytes_per_token']:>9,.1f}  {a['ratio']:>9.2f}x  "
                         f"{a['bytes_per_token']:>10,.1f}  {gib(a['bytes'])}")
        per_tok = self.features_bytes / max(self.tokens, 1)
        shares = {"answer": self.answer_fraction, "text": 1 - self.answer_fraction - self.image_fraction,
                  "image": self.image_fraction}
        lines.append("roles        rows            share      B/row  est. size")
        for role, nbytes in self.roles.items():
            n = shares.get(role, 1.0) * self.tokens
            lines.append(f"             {role:<15} "
                         f"{shares.get(role, 1.0):>5.0%} {nbytes / max(n, 1):>10,.1f}  {gib(nbytes)}")
        lines += [
            f"hidden       {h['bytes_per_token'] / (2 * self.hidden_size):.3f}x of raw bf16 over all rows "
            f"({2 * self.hidden_size:,} B/token)",
            f"features     {gib(self.features_bytes)} ({per_tok:,.1f} B/token)",
            f"head         {gib(self.head_bytes)} (lm_head {self.vocab_size:,} x {self.hidden_size} + norm)"
            + (f"; context basis {gib(self.basis_bytes)}" if self.basis_bytes else ""),
            f"samples      {gib(self.samples_bytes)} (samples.parquet: text and embedded images as given)",
            f"total        {gib(self.total_bytes)}",
            "note         compression measured just now on the pilot cache's real rows (where it has a role's rows; "
            "synthetic ones elsewhere)" if self.pilot else
            "note         compression ratios were measured just now on synthetic LLM-like data (heavy-tailed "
            "post-norm states with outlier channels, Gaussian-logit top-k, uniform token ids); real "
            "activations compress differently (a tiny trained teacher's: 20-55% smaller), so treat sizes as an "
            "upper estimate, or measure on a pilot extraction with --sample (within 4% there).",
        ]
        return "\n".join(lines)


ROLES = ("answer", "text", "image")
INDEX_ARRAYS = ("token_ids", "answer_mask", "row_flags")  # per-token bookkeeping, whatever the role


def estimate_cache_size(tokens: int, hidden_size: int, vocab_size: int, topk: int,
                        hidden_codec: HiddenCodec | str = DEFAULT_HIDDEN_CODEC, samples: int | None = None, *,
                        storage: Storage = Storage(), answer_fraction: float = CachePlanConfig.answer_fraction,
                        image_fraction: float = CachePlanConfig.image_fraction,
                        text_bytes_per_sample: int = CachePlanConfig.text_bytes,
                        image_bytes_per_sample: int = CachePlanConfig.image_bytes,
                        head_dtype: str = CachePlanConfig.head_dtype, shard_tokens: int | None = None,
                        chunk_tokens: int | None = None, seed: int = 0,
                        sample: dict[str, dict[str, np.ndarray]] | None = None) -> SizeEstimate:
    """Size of a cache before extracting it: the writer's layout (`plan_layout`), its arrays and
    codec chains (`create_feature_arrays`), and compression ratios measured by writing one chunk
    of synthetic LLM-like features through those very arrays (in memory), once per row role: answer rows,
    text context rows and image context rows (`answer_fraction`, `image_fraction` of the rows), each stored
    as `storage` says (rows it leaves out are zeros, which compress to almost nothing). `samples` defaults to
    tokens / 512; samples.parquet is estimated from the text and image bytes per sample. `sample`
    (`sample_rows` of a pilot cache of the same teacher and data): its real rows replace the synthetic ones
    wherever the pilot has them (per role: token ids, states, top-k)."""
    if min(tokens, hidden_size, vocab_size, topk) < 1:
        raise ValueError(f"tokens, hidden_size, vocab_size and topk must be >= 1 (got {tokens}, {hidden_size}, "
                         f"{vocab_size}, {topk})")
    if topk > vocab_size:
        raise ValueError(f"topk ({topk}) cannot exceed vocab_size ({vocab_size})")
    if not (0 < answer_fraction <= 1 and 0 <= image_fraction and answer_fraction + image_fraction <= 1):
        raise ValueError(f"answer fraction ({answer_fraction}) and image fraction ({image_fraction}) must be shares of "
                         f"the rows: answer in (0, 1], image >= 0, together <= 1")
    codec = get_hidden_codec(hidden_codec)
    samples = max(1, tokens // 512) if samples is None else samples
    layout = plan_layout(hidden_size, topk, codec, shard_tokens=shard_tokens, chunk_tokens=chunk_tokens,
                         storage=storage)
    names = array_names(storage)
    image_id = vocab_size - 1  # synthetic token ids: the image token is the last id, text ids below it
    role_storage = storage if storage.context != "text" else Storage("text", None, storage.topk_rows, [image_id])

    real = sample or {}
    basis = None
    if storage.context == "lowrank" and any("states" in real.get(r, {}) for r in ("text", "image")):
        basis = ContextBasis.fit(np.concatenate([real[r]["states"] for r in ("text", "image")
                                                 if "states" in real.get(r, {})])[:4096], storage.rank)

    def synthetic(name: str, role: str, n: int) -> np.ndarray:
        """One chunk of array `name` where every row has `role`, stored as the storage stores that role: the
        pilot's real rows where `sample` has them (then as many as it has, up to n), else synthetic ones."""
        rows = real.get(role, {})
        source = {"hidden": "states", "context": "states"}.get(name, name)
        if source in rows and len(rows[source]):
            n = min(n, len(rows[source]))
        rng = np.random.default_rng(seed)
        ids = (np.full(n, image_id) if role == "image" else rng.integers(0, vocab_size - 1, n)).astype(np.int32)
        mask = np.zeros(n, dtype=bool)
        if role == "answer":  # answer rows: the next token is an answer token; one run of answer tokens
            mask[1:] = True
        flags = row_flags(ids, mask, role_storage) if storage.context != "full" or storage.topk_rows != "all" else \
            np.full(n, FLAG_EXACT | FLAG_TOPK, np.uint8)
        if role == "answer":
            flags[-1] = flags[0]  # the chunk's last row predicts the next chunk's (answer) token
        if name == "token_ids":
            return rows["token_ids"][:n].astype(np.int32) if "token_ids" in rows else ids
        if name == "answer_mask":
            return mask
        if name == "row_flags":
            return flags
        if name == "context":
            coeffs = (basis.encode(rows["states"][:n]) if basis is not None and "states" in rows else
                      rng.standard_normal((n, storage.rank)).astype(np.float32) / np.sqrt(1 + np.arange(storage.rank)))
            return np.where(((flags & FLAG_COMPACT) > 0)[:, None], coeffs, 0).astype(np.float32)
        if name == "hidden":
            h = rows["states"][:n].copy() if "states" in rows else synthetic_post_norm_states(n, hidden_size, seed=seed)
            h[(flags & FLAG_EXACT) == 0] = 0
            return codec.to_stored(h)
        tids, lps = synthetic_topk(n, vocab_size, topk, seed=seed)
        out = (rows[name][:n].copy() if name in rows and len(rows[name]) >= n else
               tids if name == "topk_ids" else lps)
        out[(flags & FLAG_TOPK) == 0] = 0
        return out

    def measure(name: str, role: str) -> float:
        """Stored bytes per row of array `name` for rows of `role` (one full inner chunk, or as many rows as the
        pilot has, minus the shard index)."""
        data = synthetic(name, role, max(1, min(layout.chunk_tokens[name], 1 << 16)))
        n = len(data)
        store = MemoryStore()
        probe = Layout(shard_tokens=n, chunk_tokens={a: n for a in names})
        a = create_feature_arrays(zarr.open_group(store, mode="w", zarr_format=3), probe, codec, hidden_size,
                                  topk, storage)[0][name]
        a.resize((n, *a.shape[1:]))
        a[:] = data
        key = f"{name}/c/0" + ("/0" if a.ndim == 2 else "")
        return (len(sync_get(store, key)) - 16 - 4 - 4) / n  # minus the index, its crc32c and the chunk's

    share = {"answer": answer_fraction, "text": 1 - answer_fraction - image_fraction, "image": image_fraction}
    S = layout.shard_tokens
    shards = -(-tokens // S)
    out: dict[str, dict[str, float]] = {}
    roles = dict.fromkeys((*ROLES, "index"), 0.0)
    for name in names:
        per_role = {role: measure(name, role) for role in ROLES if share[role] > 0}
        stored = sum(share[r] * b for r, b in per_role.items())
        index = shards * (16 * (S // layout.chunk_tokens[name]) + 4)
        nbytes = stored * tokens + index
        for role, b in per_role.items():
            roles["index" if name in INDEX_ARRAYS else role] += share[role] * b * tokens
        roles["index"] += index
        raw = (CONTEXT_CODEC.row_bytes(storage.rank) if name == "context" else codec.row_bytes(hidden_size)
               if name == "hidden" else synthetic(name, "answer", 1)[0].nbytes)
        out[name] = {"raw_bytes_per_token": float(raw), "ratio": raw / max(stored, 1e-9),
                     "bytes_per_token": nbytes / tokens, "bytes": float(nbytes), "shards": shards}
    itemsize = 2 if head_dtype in ("bfloat16", "float16") else 4
    head_bytes = (vocab_size + 1) * hidden_size * itemsize + 512
    samples_bytes = samples * (text_bytes_per_sample + image_bytes_per_sample + 64) + 4096
    metadata_bytes = len(names) * 1200 + 600 + 100 * (len(names) * shards + 3)
    files = len(names) * (shards + 1) + 4 + (storage.context == "lowrank")  # shards + zarr.json per array, 3 files
    return SizeEstimate(tokens=tokens, samples=samples, hidden_size=hidden_size, vocab_size=vocab_size, topk=topk,
                        hidden_codec=codec.name, storage=storage, answer_fraction=answer_fraction,
                        image_fraction=image_fraction, layout=layout, arrays=out, roles=roles,
                        head_bytes=head_bytes, samples_bytes=samples_bytes, metadata_bytes=metadata_bytes, files=files,
                        pilot=bool(sample))


def sample_rows(cache: Any, image_token_ids: list[int], max_rows: int = 1 << 16) -> dict[str, dict[str, np.ndarray]]:
    """Real rows of a pilot cache by role ("answer", "text", "image"), for `estimate_cache_size(sample=...)`:
    token ids; states where the pilot stores them exactly (or, for context rows, low-rank); top-k where stored.
    At most `max_rows` rows per role, in the cache's order."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {r: {} for r in ROLES}
    count = dict.fromkeys(ROLES, 0)
    for s in cache.iter_samples():
        ans = answer_rows(s.answer_mask)
        image = np.isin(s.token_ids, image_token_ids) & ~ans
        for role, rows in (("answer", ans), ("image", image), ("text", ~ans & ~image)):
            rows = rows & (count[role] + np.cumsum(rows) <= max_rows)
            if not rows.any():
                continue
            count[role] += int(rows.sum())
            p = parts[role]
            p.setdefault("token_ids", []).append(s.token_ids[rows])
            if s.hidden_rows[rows].all():
                p.setdefault("states", []).append(np.asarray(s.hidden[rows], dtype=np.float32))
            if s.topk_rows[rows].all():
                p.setdefault("topk_ids", []).append(s.topk_ids[rows])
                p.setdefault("topk_logprobs", []).append(s.topk_logprobs[rows])
        if min(count.values()) >= max_rows or sum(count.values()) >= 3 * max_rows:  # a role may be absent
            break
    n = {r: {k: sum(len(x) for x in v) for k, v in p.items()} for r, p in parts.items()}
    # an array is usable for a role only if every collected row had it (else rows and ids would not line up)
    return {r: {k: np.concatenate(v) for k, v in p.items() if n[r][k] == count[r] and count[r]}
            for r, p in parts.items()}


def estimate_like(cache: Any, image_token_ids: list[int], sample: dict[str, dict[str, np.ndarray]] | None = None
                  ) -> SizeEstimate:
    """What `estimate_cache_size` gives for an existing cache: its counts, codec, storage and layout, and the
    answer / image shares of its rows (how plan is checked against real caches)."""
    m = cache.manifest
    n_ans = n_img = 0
    for s in cache.iter_samples():
        n_ans += int(answer_rows(s.answer_mask).sum())
        n_img += int(np.isin(s.token_ids, image_token_ids).sum())
    T = m.counts["tokens"]
    return estimate_cache_size(T, m.hidden_size, m.vocab_size, m.topk, m.hidden_codec, m.counts["samples"],
                               storage=m.roles, answer_fraction=n_ans / T, image_fraction=n_img / T,
                               shard_tokens=m.arrays["hidden"]["shard_tokens"],
                               chunk_tokens=m.arrays["hidden"]["chunk_tokens"], sample=sample)


def sync_get(store: Any, key: str) -> bytes:
    """Bytes of `key` in a zarr store (synchronously)."""
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        raise KeyError(key)
    return buf.to_bytes()
