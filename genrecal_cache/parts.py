"""Caches written in parts by independent jobs (`extract --num-shards N --shard-index i`), read as one.

Layout (docs/cache-format.md, "Parts")::

    OUT/part-00000-of-00004/   a complete cache (manifest, head, features.zarr, samples.parquet)
    OUT/part-00001-of-00004/
    ...

Job i takes the input samples with index % N == i (index = position in the data file). `OUT` itself
has no manifest. `open_cache(OUT)` returns a `MultiPartCache`: the parts, opened in place (no
copy), as one dataset whose global index is the concatenation of the parts in part order. Parts must
come from the same teacher (config, head), tokenizer, chat template, hidden codec and top-k; a part
that differs is refused, naming it. Finding the parts: io/locate.py; checking them: verify.py;
`genrecal-cache merge` (one single-part cache with the same rows in the same order): merge.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from .format.manifest import SIZES_KEY, CacheFormatError, Manifest, identity, identity_diff
from .io.prefetch import read_ahead
from .reader import Precision, TeacherCache, find_cache, split_plan

__all__ = ["MultiPartCache", "check_same_identity", "combined_manifest", "open_cache"]


def open_cache(path_or_url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
               local_cache: str | os.PathLike | None = None) -> TeacherCache | MultiPartCache:
    """Open a cache, local or remote (any fsspec URL): one cache -> `TeacherCache`; a folder of parts
    (`extract --num-shards`) -> `MultiPartCache`, the same API over the parts as one dataset.
    `storage_options` go to fsspec (genrecal_cache.io.retry); `local_cache` keeps a verified copy of
    every remote file read (one sub-folder per part)."""
    fs, root, url, found = find_cache(path_or_url, storage_options)
    if not isinstance(found, list):
        return TeacherCache.from_manifest(fs, root, url, found, storage_options, local_cache)
    parts = [TeacherCache.open(f"{url}/{n}", storage_options,
                               None if local_cache is None else os.path.join(os.fspath(local_cache), n)) for n in found]
    check_same_identity(url, found, [p.manifest for p in parts])
    return MultiPartCache(url, found, parts)


def check_same_identity(url: str, names: list[str], manifests: list[Manifest]) -> None:
    ref = identity(manifests[0])
    for name, m in zip(names[1:], manifests[1:]):
        diff = [f"{k}: {v!r:.80} vs {r!r:.80}" for k, r, v in identity_diff(ref, identity(m))]
        if diff:
            raise CacheFormatError(f"{url}/{name}: written with a different teacher/tokenizer/codec/top-k than "
                                   f"{names[0]} ({'; '.join(diff)}); all parts must come from the same extraction "
                                   f"settings: re-extract {name} or move it away")


def combined_manifest(names: list[str], manifests: list[Manifest]) -> Manifest:
    """One manifest describing all parts: counts summed, checksums and sizes with the part directory prefixed."""
    counts = {k: sum(m.counts[k] for m in manifests) for k in manifests[0].counts}  # type: ignore[literal-required]
    checksums = {f"{n}/{rel}": d for n, m in zip(names, manifests) for rel, d in m.checksums.items()}
    sizes = {f"{n}/{rel}": b for n, m in zip(names, manifests) for rel, b in m.sizes.items()}
    extra = {**{k: v for k, v in manifests[0].extra.items() if k != SIZES_KEY}, "parts": list(names)}
    if sizes:
        extra[SIZES_KEY] = sizes
    return dataclasses.replace(manifests[0], counts=counts, checksums=checksums,  # type: ignore[arg-type]
                               created=max(m.created for m in manifests), extra=extra)


class MultiPartCache:
    """Several part caches as one dataset (see the module doc). Same API as TeacherCache."""

    def __init__(self, url: str, names: list[str], parts: list[TeacherCache]) -> None:
        self.url, self.names, self.parts = url, names, parts
        self.fs, self.root = parts[0].fs, parts[0].root.rsplit("/", 1)[0]
        self.storage_options = parts[0].storage_options
        self.hidden_codec = parts[0].hidden_codec
        self.manifest = combined_manifest(names, [p.manifest for p in parts])
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        tables = []
        for p, start in zip(parts, self.starts):
            t = p.index
            tables.append(t.set_column(t.schema.get_field_index("index"), "index",
                                       pa.array(np.arange(start, start + t.num_rows), pa.int64())))
        self.index: pa.Table = pa.concat_tables(tables)
        self._by_id: dict[str, int] | None = None
        self._head = None

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def __enter__(self) -> MultiPartCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _locate(self, i: int) -> tuple[int, int]:
        p = int(np.searchsorted(self.starts, i, side="right")) - 1
        return p, i - int(self.starts[p])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Any:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for a cache of {n} samples ({self.url})")
        i %= n
        p, j = self._locate(i)
        s = self.parts[p][j]
        s.index = i
        return s

    def by_id(self, sample_id: str) -> Any:
        if self._by_id is None:
            self._by_id = {sid: j for j, sid in enumerate(self.index.column("id").to_pylist())}
        if sample_id not in self._by_id:
            raise KeyError(f"sample id {sample_id!r} is not in the cache at {self.url}")
        return self[self._by_id[sample_id]]

    def head(self, device: str | torch.device = "cpu") -> Any:
        return self.parts[0].head(device)  # identical in every part (checked by its sha256 at open)

    def context_basis(self) -> Any:
        """None: each part fits its own low-rank basis (reads reconstruct through the part's); a merge of parts
        with low-rank context refits one basis (MultiPartCache has no single basis)."""
        return None

    def tokenizer_files(self) -> dict[str, bytes]:
        # every part stores the same tokenizer (its hash is part of the identity checked at open)
        return next((files for p in self.parts if (files := p.tokenizer_files())), {})

    def teacher_tokenizer(self) -> Any | None:
        return next((tok for p in self.parts if (tok := p.teacher_tokenizer()) is not None), None)

    def teacher_logits(self, i: int) -> torch.Tensor:
        return self.parts[0].sample_logits(self[i])  # one head in memory: it is the same in every part

    def plan(self, order: Literal["ordered", "shuffled"] = "ordered", seed: int = 0, rank: int = 0,
             world_size: int = 1, start: int = 0, status: Literal["ok", "error", "all"] = "ok") -> list[list[int]]:
        """As TeacherCache.plan, over the read groups of all parts (a group never spans two parts)."""
        if order not in ("ordered", "shuffled"):
            raise ValueError(f"order must be 'ordered' or 'shuffled', got {order!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        groups = [[int(off) + i for i in g] for p, off in zip(self.parts, self.starts) for g in p.plan(status=status)]
        return split_plan(groups, order, seed, rank, world_size, start)

    def iter_samples(self, order: Literal["ordered", "shuffled"] = "ordered", seed: int = 0, rank: int = 0,
                     world_size: int = 1, start: int = 0, status: Literal["ok", "error", "all"] = "ok",
                     readahead: int = 1, precision: Precision = "float32", context: bool = True) -> Iterator[Any]:
        """As TeacherCache.iter_samples: each read group lies in one part and is read by that part (the
        next `readahead` groups on a background thread)."""
        pieces = []
        for piece in self.plan(order, seed, rank, world_size, start, status):
            p, _ = self._locate(piece[0])
            off = int(self.starts[p])
            pieces.append((self.parts[p], off, [i - off for i in piece]))

        read = lambda it: it[0].read_group(it[2], precision=precision, context=context)  # noqa: E731
        for (part, off, local), group in read_ahead(read, pieces, readahead):
            for s in part.group_samples(local, group):
                s.index += off
                yield s

    def __repr__(self) -> str:
        c = self.manifest.counts
        return (f"MultiPartCache({self.url!r}, parts={len(self.parts)}, teacher={self.manifest.teacher['id']!r}, "
                f"samples={c['samples']} (ok {c['ok']}, error {c['error']}), tokens={c['tokens']})")
