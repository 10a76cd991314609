"""Read a teacher cache from a local directory or any fsspec URL (http(s)://, s3://, gs://, file://).

All locations go through one code path: an fsspec filesystem for the small files (manifest,
parquet index, head) and a Zarr store on top of it for the feature arrays (zarr's LocalStore when
the filesystem is local, its FsspecStore otherwise). Iteration reads whole token ranges: one read
per array for each group of samples that start in the same shard, so a remote cache is fetched
shard by shard, not sample by sample.

Long because `TeacherCache` is one class (open, index, read plan, grouped and fast local reads,
images, head); finding a cache and opening its files is io/locate.py. `TeacherCache.open` opens one
cache; `open_cache` (parts.py) opens anything: one cache, or a cache in parts as one dataset.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.core.sync import sync

from .format import safety
from .format.codecs import describe_chain, hidden_codec
from .format.head import TeacherHead
from .format.manifest import (
    BASIS_NAME, FEATURES_NAME, HEAD_NAME, MANIFEST_NAME, PROGRESS_NAME, SAMPLES_NAME, TOKENIZER_DIR, CacheFormatError,
    Manifest, sha256_bytes,
)
from .format.roles import FLAG_COMPACT, FLAG_EXACT, FLAG_TOPK, ContextBasis
from .format.tokenizer import load_tokenizer
from .io.fastread import BufferPool, NonFiniteError, ShardedArrayReader, bound_zarr_decoding, read_ranges
from .io.locate import local_file, locate, open_fs, open_parquet, zarr_store
from .io.prefetch import read_ahead
from .io.mirror import MirrorFileSystem, read_through
from .io.remote import download_capped, read_capped
from .io.retry import RemoteReadError, gather_cancelling

__all__ = ["CachedSample", "INDEX_COLUMNS", "MAX_CHUNKS_PER_SHARD", "MAX_CHUNK_BYTES", "Precision", "ReadGroup",
           "TeacherCache", "find_cache",
           "load_head", "load_tokenizer_files", "open_feature_arrays", "split_plan"]

MAX_CHUNK_BYTES = 4 << 30  # one shard (file) of one array; the writer's default is 128 MiB
MAX_CHUNKS_PER_SHARD = 1 << 16  # the writer's default is at most 64
Precision = Literal["float32", "stored"]  # `hidden` as read: float32, or a bf16 cache's bits as stored
ReadGroup = tuple[int, dict[str, np.ndarray], dict[int, list[bytes]]]  # (first token, arrays, images by sample)
INDEX_COLUMNS = ["index", "id", "status", "error", "token_offset", "num_tokens", "answer_spans",
                 "messages", "image_refs", "extra"]  # everything but the (large) images column


@dataclass
class CachedSample:
    index: int
    id: str
    status: str                  # "ok" | "error"
    error: str | None
    messages: list[dict]
    images: list[bytes]
    extra: dict[str, Any]
    token_ids: np.ndarray        # [L] int32, teacher tokenization
    answer_mask: np.ndarray      # [L] bool, True on answer content tokens
    hidden: np.ndarray           # [L, d] float32, post-final-norm, decoded (any hidden codec); position t predicts t+1;
                                 # uint16 bf16 bits when read with precision="stored" from a bf16 cache (`hidden_tensor`)
    topk_ids: np.ndarray         # [L, k] int32
    topk_logprobs: np.ndarray    # [L, k] float32
    row_flags: np.ndarray        # [L] uint8: what is stored per row (format/roles.py FLAG_*); zero rows are absent
    context: np.ndarray | None = None  # [L, r] float32 low-rank coefficients of the FLAG_COMPACT rows (zero elsewhere),
                                       # read with precision="stored" from a low-rank cache; `hidden` is zero there
    context_basis: ContextBasis | None = None  # the basis `context` is on (`ContextBasis.decode_tensor`)

    def hidden_tensor(self) -> torch.Tensor:
        """`hidden` as a tensor sharing its memory: float32, or torch.bfloat16 for bf16 bits (precision="stored")."""
        h = torch.from_numpy(self.hidden)
        return h.view(torch.bfloat16) if self.hidden.dtype == np.uint16 else h

    @property
    def hidden_rows(self) -> np.ndarray:
        """bool [L]: rows whose `hidden` is the teacher's state (exact at the codec, or low-rank); the other
        rows of a role-aware cache are zero (not stored)."""
        return (self.row_flags & (FLAG_EXACT | FLAG_COMPACT)) > 0

    @property
    def exact_rows(self) -> np.ndarray:
        """bool [L]: rows whose `hidden` is stored at the answer codec (every row of a version 1-2 cache)."""
        return (self.row_flags & FLAG_EXACT) > 0

    @property
    def topk_rows(self) -> np.ndarray:
        """bool [L]: rows that hold the top-k (answer rows only, by default, in a version-3 cache)."""
        return (self.row_flags & FLAG_TOPK) > 0


class TeacherCache:
    """A read-only view of one cache. Cheap to pickle (DataLoader workers reopen lazily per process)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest,
                 storage_options: dict[str, Any] | None) -> None:
        self.fs, self.root, self.url, self.manifest = fs, root, url, manifest
        self.storage_options = storage_options
        self.hidden_codec = hidden_codec(manifest.hidden_codec)
        self._pid: int | None = None
        self._zarr: dict[str, zarr.Array] | None = None
        self._pf: pq.ParquetFile | None = None
        self._head: TeacherHead | None = None
        self._basis: ContextBasis | None = None
        self._images_rg: tuple[int, list[list[bytes]]] | None = None
        self._file_sizes = self._check_local_files()
        self._load_index()

    @classmethod
    def open(cls, path_or_url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
             local_cache: str | os.PathLike | None = None) -> TeacherCache:
        """One cache (a folder with a manifest). `storage_options` go to fsspec (credentials, client
        settings; genrecal_retries...: see genrecal_cache.io.retry). `local_cache`: a folder that keeps a
        verified copy of every remote file read, so later epochs and runs read it from disk (ignored for
        local caches). A cache written in parts is refused: `open_cache` opens either kind."""
        fs, root, url, found = find_cache(path_or_url, storage_options)
        if isinstance(found, list):
            raise CacheFormatError(f"{url}: a cache written in parts ({len(found)} parts: {', '.join(found[:3])}"
                                   f"{', ...' if len(found) > 3 else ''}); TeacherCache.open opens one cache: use "
                                   f"genrecal_cache.open_cache, which reads the parts as one dataset")
        return cls.from_manifest(fs, root, url, found, storage_options, local_cache)

    @classmethod
    def from_manifest(cls, fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest,
                      storage_options: dict[str, Any] | None = None,
                      local_cache: str | os.PathLike | None = None) -> TeacherCache:
        """The cache `find_cache` found at `url` (its manifest read and checked once)."""
        if local_cache is not None:
            fs, root = read_through(fs, root, url, manifest, local_cache)
        cache = cls(fs, root, url, manifest, storage_options)
        cache._features()  # fail at open, not at the first sample, if arrays are missing
        return cache

    def close(self) -> None:
        """Release network sessions and file handles (also done when the object is collected)."""
        if self._zarr is not None:
            next(iter(self._zarr.values())).store.close()
        if isinstance(self.fs, MirrorFileSystem):  # downloads still running (a failed read's siblings) stop
            self.fs.mirror.close()
        self._zarr, self._pf, self._images_rg = None, None, None

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- files ---------------------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _reset_if_forked(self) -> None:
        if self._pid != os.getpid():  # zarr/aiohttp/file handles do not survive a fork
            self._pid, self._zarr, self._pf, self._images_rg = os.getpid(), None, None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _zarr=None, _pf=None, _images_rg=None, _fast=None)
        return state

    def _check_local_files(self) -> dict[str, int] | None:
        """For a local cache: every file it will open is a regular file inside it (no link out of the
        cache, FIFO or device), and every shard the token count implies is listed. Their sizes."""
        where = f"{self.url}/{MANIFEST_NAME}"
        shards = safety.shard_files(self.manifest, where)
        unlisted = next((rel for rel, _, _ in shards if rel not in self.manifest.checksums), None)
        if unlisted is not None:
            raise CacheFormatError(f"{where}: shard {unlisted} is not listed in 'checksums'; the manifest is "
                                   f"incomplete, run `genrecal-cache verify` and re-download or re-extract the cache")
        if type(self.fs) is not LocalFileSystem:  # remote, or a mirror that fetches and verifies each file itself
            return None
        fixed = [SAMPLES_NAME, HEAD_NAME, f"{FEATURES_NAME}/zarr.json",
                 *(f"{FEATURES_NAME}/{n}/zarr.json" for n in self.manifest.array_names),
                 *([BASIS_NAME] if BASIS_NAME in self.manifest.checksums else [])]
        return safety.check_local_files(self.root, dict.fromkeys([*fixed, *self.manifest.checksums]), self.url)

    def _features(self) -> dict[str, zarr.Array]:
        self._reset_if_forked()
        if self._zarr is None:
            store = zarr_store(self.fs, self._path(FEATURES_NAME), self.storage_options, f"{self.url}/{FEATURES_NAME}",
                               self.manifest)
            self._zarr = open_feature_arrays(store, self.manifest, self.url)
        return self._zarr

    def _parquet(self) -> pq.ParquetFile:
        self._reset_if_forked()
        if self._pf is None:
            self._pf = open_parquet(self.fs, self._path(SAMPLES_NAME), self.manifest.sizes.get(SAMPLES_NAME))
        return self._pf

    def _load_index(self) -> None:
        where = f"{self.url}/{SAMPLES_NAME}"
        try:
            if self._parquet().metadata.num_rows != self.manifest.counts["samples"]:
                raise CacheFormatError(f"{where}: {self._parquet().metadata.num_rows} rows but the manifest counts "
                                       f"{self.manifest.counts['samples']} samples; the cache is inconsistent, run "
                                       f"`genrecal-cache verify` and re-download or re-extract it")
            safety.check_schema(self._parquet().schema_arrow, where)  # before any value is used (safe loading)
            table = safety.read_index(self._parquet(), INDEX_COLUMNS, where)
        except FileNotFoundError as e:
            raise CacheFormatError(f"{where}: missing; the cache is incomplete, re-download or re-extract it") from e
        except CacheFormatError:
            raise
        except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: e.g. undecodable metadata
            raise CacheFormatError(f"{where}: unreadable ({e}); the file is truncated or corrupt, re-download or "
                                   f"re-extract it") from e
        safety.check_index(table, self.manifest, where)
        stored = safety.listed_feature_bytes(self.manifest) if self._file_sizes is None else sum(
            n for rel, n in self._file_sizes.items() if rel.startswith(f"{FEATURES_NAME}/"))
        safety.check_read_budget(self.manifest, table.column("id").to_pylist(),
                                 table.column("num_tokens").to_numpy(), stored, where)
        self.index: pa.Table = table
        self._ids: list[str] = table.column("id").to_pylist()
        self._status: list[str] = table.column("status").to_pylist()
        self._offsets = table.column("token_offset").to_numpy()
        self._lengths = table.column("num_tokens").to_numpy()
        self._by_id: dict[str, int] | None = None
        md = self._parquet().metadata
        self._rg_starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])

    # ---- random access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> CachedSample:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for a cache of {n} samples ({self.url})")
        i %= n
        arrays = self._decoded(self._read_tokens(int(self._offsets[i]), int(self._offsets[i] + self._lengths[i])))
        return self._sample(i, arrays, int(self._offsets[i]), self._read_images([i])[i])

    def by_id(self, sample_id: str) -> CachedSample:
        if self._by_id is None:
            self._by_id = {sid: j for j, sid in enumerate(self._ids)}
        if sample_id not in self._by_id:
            raise KeyError(f"sample id {sample_id!r} is not in the cache at {self.url}")
        return self[self._by_id[sample_id]]

    def head(self, device: str | torch.device = "cpu") -> TeacherHead:
        """The teacher's final norm + lm_head (safetensors only, no code runs on load; finite values)."""
        return load_head(self.fs, self.root, self.url, self.manifest, device)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher tokenizer's files stored in the cache (name inside `teacher_tokenizer/` -> bytes, each
        checked against its sha256); {} for a cache written before genrecal stored them."""
        return load_tokenizer_files(self.fs, self.root, self.url, self.manifest)

    def teacher_tokenizer(self) -> Any | None:
        """The teacher's tokenizer from the cache's own files (checked against `tokenizer_sha256`), or None
        when the cache has none (written before genrecal stored it)."""
        files = self.tokenizer_files()
        return load_tokenizer(files, self.manifest.tokenizer_sha256, f"{self.url}/{TOKENIZER_DIR}") if files else None

    def teacher_logits(self, i: int) -> torch.Tensor:
        """Full-vocabulary teacher logits [L, V] for sample i: lm_head of the cached post-norm states."""
        return self.sample_logits(self[i])

    def sample_logits(self, s: CachedSample) -> torch.Tensor:
        """Teacher logits [L, V] of a sample read from this cache (or from a part with the same head)."""
        if self._head is None:
            self._head = self.head("cpu")
        with torch.no_grad():
            return self._head.logits(torch.from_numpy(s.hidden), post_norm=True)

    # ---- streaming -----------------------------------------------------------------------------
    def plan(self, order: Literal["ordered", "shuffled"] = "ordered", seed: int = 0, rank: int = 0,
             world_size: int = 1, start: int = 0, status: Literal["ok", "error", "all"] = "ok") -> list[list[int]]:
        """The sample indices `iter_samples` yields for these arguments, as read groups.

        Groups are the selected samples starting in the same shard (a group is read at once).
        `shuffled` permutes the groups, then the samples within each group (numpy PCG64 seeded by
        `seed`). The resulting sequence is cut into `world_size` contiguous, near-equal slices
        (sizes differ by at most 1, so ranks stay in step); `rank` takes its slice and skips its
        first `start` samples (for resuming).
        """
        if order not in ("ordered", "shuffled"):
            raise ValueError(f"order must be 'ordered' or 'shuffled', got {order!r}")
        if status not in ("ok", "error", "all"):
            raise ValueError(f"status must be 'ok', 'error' or 'all', got {status!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        S = self.manifest.arrays["hidden"]["shard_tokens"]
        groups: list[list[int]] = []
        key, group_key = -1, None
        for i, st in enumerate(self._status):
            if st == "ok":
                key = int(self._offsets[i]) // S  # error rows stay in the group of their predecessor
            if status != "all" and st != status:
                continue
            if not groups or group_key != key:
                groups.append([])
                group_key = key
            groups[-1].append(i)
        return split_plan(groups, order, seed, rank, world_size, start)

    def iter_samples(self, order: Literal["ordered", "shuffled"] = "ordered", seed: int = 0, rank: int = 0,
                     world_size: int = 1, start: int = 0, status: Literal["ok", "error", "all"] = "ok",
                     readahead: int = 1, precision: Precision = "float32", context: bool = True
                     ) -> Iterator[CachedSample]:
        """Yield samples (see `plan` for order and rank splitting), one feature read per group.

        The next `readahead` groups are read and decoded on a background thread while the current
        one is being consumed (0: read on demand). A sample's `hidden` is a view into its group's
        decoded buffer (no per-sample copy); copy it if you keep it far longer than the group.
        `precision="stored"`: a bf16 cache's `hidden` stays bf16 (uint16 bits, `CachedSample.hidden_tensor`
        views them as torch.bfloat16): half the bytes, no widening on the CPU (other codecs decode to float32
        either way); low-rank context rows stay coefficients (`CachedSample.context`, r floats per row instead
        of d, and `context_basis`), reconstructed where they are used (the trainer: on its device), not by a
        float32 GEMM here.
        `context=False`, for a reader that uses no context row (e.g. training with --recal-context none, or stage 3):
        a low-rank cache's `context` array is not read at all, and its rows read as absent (FLAG_COMPACT cleared
        in `row_flags`, `hidden` zero there, `CachedSample.context` None). Rows stored in `hidden` read as ever:
        they share its chunks with the answer rows."""
        pieces = self.plan(order, seed, rank, world_size, start, status)
        buffers = BufferPool(max_buffers=readahead + 3)  # group buffers reused once no sample uses them
        for piece, group in read_ahead(lambda p: self.read_group(p, buffers, precision, context), pieces, readahead):
            yield from self.group_samples(piece, group)
            del group

    def read_group(self, piece: list[int], buffers: BufferPool | None = None, precision: Precision = "float32",
                   context: bool = True) -> ReadGroup:
        """(first token, decoded arrays of the group's token range, images) for one read group (a list of `plan`);
        `precision` and `context` as in `iter_samples`."""
        ok = [i for i in piece if self._lengths[i] > 0]
        lo = int(min((self._offsets[i] for i in ok), default=0))
        hi = int(max((self._offsets[i] + self._lengths[i] for i in ok), default=0))
        stored = precision == "stored"
        skip = () if context else ("context",)
        arrays = self._decoded(self._read_tokens(lo, hi, buffers, widen=not stored, skip=skip), stored)
        if not context:  # the compact rows were not read: they are absent for this reader
            arrays["row_flags"] = arrays["row_flags"] & np.uint8(~FLAG_COMPACT & 0xFF)
        return lo, arrays, self._read_images(piece)

    def group_samples(self, piece: list[int], group: ReadGroup) -> Iterator[CachedSample]:
        """The samples of a read group (`read_group`'s result)."""
        lo, arrays, images = group
        for i in piece:
            yield self._sample(i, arrays, lo, images[i])

    # ---- decoding ------------------------------------------------------------------------------
    def _fast_readers(self, feats: dict[str, zarr.Array]) -> dict[str, ShardedArrayReader] | None:
        """Direct shard readers for a local cache whose arrays have genrecal's layout (else None: zarr)."""
        fast = getattr(self, "_fast", None)
        if fast is None or fast[0] is not feats:
            readers = None
            if type(self.fs) is LocalFileSystem:  # not a subclass such as remote.py's on-demand MirrorFileSystem
                readers = {name: ShardedArrayReader.for_array(a, self._path(f"{FEATURES_NAME}/{name}"),
                                                               check_finite=name == "hidden")
                           for name, a in feats.items()}
                readers = None if any(r is None for r in readers.values()) else readers
            self._fast = fast = (feats, readers)
        return fast[1]

    def _read_tokens(self, lo: int, hi: int, buffers: BufferPool | None = None, widen: bool = True,
                     skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Token range [lo, hi) of every array but `skip`, read concurrently (one request batch per array). For a
        local cache, straight from the shard files (fastread.py), with bf16 `hidden` already float32
        unless `widen` is False."""
        every = self._features()
        feats = {name: a for name, a in every.items() if name not in skip}
        if hi <= lo:
            return {name: np.zeros((0, *a.shape[1:]), dtype=a.dtype) for name, a in feats.items()}
        fast = self._fast_readers(every)
        if fast is not None:
            bf16 = self.hidden_codec.name == "bf16" and widen
            try:
                return dict(zip(feats, read_ranges([(fast[name], lo, hi, bf16 and name == "hidden") for name in feats],
                                                   buffers)))
            except (MemoryError, KeyboardInterrupt):
                raise
            except NonFiniteError as e:
                raise CacheFormatError(f"{self.url}/{FEATURES_NAME}: tokens [{lo}, {hi}): {e}") from None
            except Exception as e:  # noqa: BLE001 - a missing, truncated or corrupt shard (crc32c, blosc, payload)
                raise CacheFormatError(f"{self.url}/{FEATURES_NAME}: tokens [{lo}, {hi}) unreadable ({type(e).__name__}: "
                                       f"{str(e)[:200]}); a shard is corrupt: run `genrecal-cache verify` and "
                                       f"re-download or re-extract the cache") from e

        async def read_all() -> list[Any]:
            # the first failure cancels the other arrays' requests (no retries left running after it)
            return await gather_cancelling(*(a.async_array.getitem(slice(lo, hi)) for a in feats.values()))
        try:
            out = dict(zip(feats, sync(read_all())))
        except (CacheFormatError, RemoteReadError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt shard fails its crc32c, decompression or decoding
            raise CacheFormatError(f"{self.url}/{FEATURES_NAME}: tokens [{lo}, {hi}) unreadable ({type(e).__name__}: "
                                   f"{str(e)[:200]}); a shard is corrupt: run `genrecal-cache verify` and re-download "
                                   f"or re-extract the cache") from e
        if not self.hidden_codec.finite(out["hidden"]):  # fastread checks this chunk by chunk as it decodes
            bad = lo + int(np.flatnonzero(~np.isfinite(self.hidden_codec.to_float32(out["hidden"])).all(axis=-1))[0])
            raise CacheFormatError(f"{self.url}/{FEATURES_NAME}/hidden: token {bad} holds NaN or inf; the teacher's "
                                   f"forward pass was broken for that sample or the file was altered (the cache is "
                                   f"unusable for training: re-extract it)")
        return out

    def _decoded(self, arrays: dict[str, np.ndarray], stored: bool = False) -> dict[str, np.ndarray]:
        """`hidden` as float32 for a whole token range at once (bf16 bits converted; zarr has already
        decoded fp8/ecq, and float32 needs nothing), with low-rank context rows reconstructed into it;
        `stored`: bf16 bits stay bits and low-rank rows stay coefficients (`context`)."""
        h = arrays["hidden"]
        if h.dtype != np.float32 and not (stored and self.hidden_codec.name == "bf16"):
            h = self.hidden_codec.to_float32(h)
        if "context" in arrays and not stored:
            self.context_basis().decode_into(h, arrays["context"], (arrays["row_flags"] & FLAG_COMPACT) > 0)
            arrays = {k: v for k, v in arrays.items() if k != "context"}  # in `hidden` now
        if "row_flags" not in arrays:  # versions 1-2: every row holds its state and its top-k
            arrays = {**arrays, "row_flags": np.full(h.shape[0], FLAG_EXACT | FLAG_TOPK, np.uint8)}
        return {**arrays, "hidden": h}

    def context_basis(self) -> ContextBasis | None:
        """The low-rank basis of the cache's context rows (None unless its storage is 'lowrank')."""
        if BASIS_NAME not in self.manifest.checksums:
            return None
        if self._basis is None:
            self._basis = load_basis(self.fs, self.root, self.url, self.manifest)
        return self._basis

    def _sample(self, i: int, arrays: dict[str, np.ndarray], base: int, images: list[bytes]) -> CachedSample:
        """One sample from a token range's arrays (`_decoded`) starting at token `base`."""
        row = {c: self.index.column(c)[i].as_py() for c in ("error", "messages", "extra")}
        a, b = int(self._offsets[i]) - base, int(self._offsets[i] + self._lengths[i]) - base
        if self._lengths[i] == 0:
            a = b = 0
        hidden = arrays["hidden"][a:b]  # a view: the range's buffer is decoded once, not copied per sample
        return CachedSample(
            index=i, id=self._ids[i], status=self._status[i], error=row["error"],
            messages=safety.parse_messages(row["messages"], f"{self.url}/{SAMPLES_NAME}: row {i}"), images=images,
            extra=safety.parse_extra(row["extra"], f"{self.url}/{SAMPLES_NAME}: row {i}"),
            token_ids=arrays["token_ids"][a:b].copy(), answer_mask=arrays["answer_mask"][a:b].copy(),
            hidden=hidden, topk_ids=arrays["topk_ids"][a:b].copy(), topk_logprobs=arrays["topk_logprobs"][a:b].copy(),
            row_flags=arrays["row_flags"][a:b].copy(),
            **({"context": arrays["context"][a:b], "context_basis": self.context_basis()} if "context" in arrays else {}))

    def _read_images(self, rows: list[int]) -> dict[int, list[bytes]]:
        """Images of the given rows, reading each parquet row group they touch once. The last row
        group read is kept, so ordered access does not re-read it for every sample."""
        self._reset_if_forked()
        out: dict[int, list[bytes]] = {}
        groups = np.searchsorted(self._rg_starts, rows, side="right") - 1
        for g in sorted(set(groups.tolist())):
            cached = self._images_rg  # one read of the attribute: the read-ahead thread may replace it
            if cached is None or cached[0] != g:
                where = f"{self.url}/{SAMPLES_NAME}"
                try:
                    col = safety.read_images(self._parquet(), g, where)
                except CacheFormatError:
                    raise
                except Exception as e:  # noqa: BLE001 - arrow's, or the server's (a changed file, an outage)
                    changed = changed_error(e, where)
                    if changed is not None:
                        raise changed from None
                    if isinstance(e, RemoteReadError) or not isinstance(e, (pa.ArrowException, OSError, ValueError)):
                        raise
                    raise CacheFormatError(f"{where}: images of row group {g} unreadable ({str(e)[:200]}); the file "
                                           f"is corrupt, re-download or re-extract it") from e
                cached = self._images_rg = (g, col)
            first = int(self._rg_starts[g])
            out.update({i: cached[1][i - first] for i, gi in zip(rows, groups) if gi == g})
        return out

    def __repr__(self) -> str:
        c = self.manifest.counts
        return (f"TeacherCache({self.url!r}, teacher={self.manifest.teacher['id']!r}, samples={c['samples']} "
                f"(ok {c['ok']}, error {c['error']}), tokens={c['tokens']})")


def find_cache(path_or_url: str | os.PathLike, storage_options: dict[str, Any] | None
               ) -> tuple[fsspec.AbstractFileSystem, str, str, Manifest | list[str]]:
    """(filesystem, root, url, what is there): the manifest of one cache, or the names of the parts of a
    cache written in parts (io/locate.py). An extraction still running there is refused by name."""
    fs, root, url = open_fs(path_or_url, storage_options)
    try:
        return fs, root, url, locate(fs, root, url)
    except CacheFormatError:
        _refuse_if_in_progress(fs, root, url)
        raise


def split_plan(groups: list[list[int]], order: str, seed: int, rank: int, world_size: int, start: int
               ) -> list[list[int]]:
    """Shuffle (groups, then samples within each group) and cut into rank slices, as TeacherCache.plan
    (MultiPartCache.plan too, over the groups of all its parts)."""
    if order == "shuffled":
        rng = np.random.default_rng(seed)
        groups = [groups[g] for g in rng.permutation(len(groups))]
        groups = [[grp[j] for j in rng.permutation(len(grp))] for grp in groups]
    flat = [(g, i) for g, grp in enumerate(groups) for i in grp]
    n = len(flat)
    mine = flat[rank * n // world_size:(rank + 1) * n // world_size][max(0, start):]
    pieces: list[list[int]] = []
    for j, (g, i) in enumerate(mine):
        if j == 0 or g != mine[j - 1][0]:
            pieces.append([])
        pieces[-1].append(i)
    return pieces


def _refuse_if_in_progress(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """No cache here: say so plainly when it is an extraction still running (or interrupted)."""
    try:
        in_progress = fs.exists(f"{root}/{PROGRESS_NAME}")
    except Exception:  # noqa: BLE001 - some servers refuse probes: then the manifest's error stands
        in_progress = False
    if not in_progress:
        return
    try:  # the command that writes it (journal.py keeps it): an extraction's, or a merge's
        command = json.loads(fs.cat_file(f"{root}/{PROGRESS_NAME}")).get("command") or ""
    except Exception:  # noqa: BLE001 - unreadable: the advice below stays general
        command = ""
    what = "a merge" if command.split()[1:2] == ["merge"] else "an extraction"
    rerun = f"run `{command}` again" if command else "run the same `genrecal-cache extract` again"
    raise CacheFormatError(
        f"{url}: {what} is running here or was interrupted ({PROGRESS_NAME}, no manifest.json yet). "
        f"Readers only open complete caches: wait for it to finish, or {rerun} to resume it")


def load_head(fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest,
              device: str | torch.device = "cpu") -> TeacherHead:
    """The cache's TeacherHead, checked: a regular file (local), a readable safetensors file whose
    config and shapes match the manifest, and finite values (TeacherHead.load)."""
    path = f"{root}/{HEAD_NAME}"
    if type(fs) is LocalFileSystem:  # checked at open too; the file may have changed since
        safety.check_local_files(root, [HEAD_NAME], url)
    try:
        if isinstance(fs, LocalFileSystem):
            head = TeacherHead.load(local_file(fs, path), device=device)
        else:  # safetensors needs a local file: copy, load into memory, delete
            with tempfile.TemporaryDirectory(prefix="genrecal-head-") as tmp:
                local = os.path.join(tmp, HEAD_NAME)
                # streamed (a 152k x 8192 head is 2.5 GB), and bounded: a server may send an endless body
                download_capped(fs, path, local, safety.file_limit(HEAD_NAME, manifest), f"{url}/{HEAD_NAME}",
                                size=manifest.sizes.get(HEAD_NAME))
                head = TeacherHead.load(local, device=device)
    except FileNotFoundError as e:
        raise CacheFormatError(f"{url}/{HEAD_NAME}: missing; the cache is incomplete, re-download or "
                               f"re-extract it") from e
    except CacheFormatError:
        raise
    except ValueError as e:  # TeacherHead.load names what is wrong with the file
        raise CacheFormatError(f"{url}/{HEAD_NAME}: {str(e).split(': ', 1)[-1]}; the file is corrupt, "
                               f"re-download or re-extract it") from e
    m = manifest
    if (head.hidden_size, head.vocab_size) != (m.hidden_size, m.vocab_size):
        raise CacheFormatError(f"{url}/{HEAD_NAME}: head is [vocab {head.vocab_size}, hidden {head.hidden_size}] "
                               f"but the manifest says [{m.vocab_size}, {m.hidden_size}]; the head belongs to "
                               f"another teacher, re-download or re-extract it")
    return head


def load_basis(fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest) -> ContextBasis:
    """The cache's low-rank context basis (context_basis.safetensors), checked against its sha256 and shapes."""
    where = f"{url}/{BASIS_NAME}"
    if type(fs) is LocalFileSystem:
        safety.check_local_files(root, [BASIS_NAME], url)
    try:
        basis = ContextBasis.from_bytes(read_listed(fs, root, url, manifest, BASIS_NAME))
    except ValueError as e:
        raise CacheFormatError(f"{where}: unreadable ({e}); re-download or re-extract the cache") from None
    want = (manifest.roles.rank, manifest.hidden_size)
    if basis.basis.shape != want:
        raise CacheFormatError(f"{where}: basis is {list(basis.basis.shape)} but the manifest says rank "
                               f"{want[0]} of hidden size {want[1]}; re-download or re-extract the cache")
    return basis


def load_tokenizer_files(fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest) -> dict[str, bytes]:
    """The files under `teacher_tokenizer/` that the manifest lists (name inside the folder -> bytes), each
    checked against its sha256. Read through the same filesystem as the head: a remote cache's read-through
    mirror fetches and verifies them like every file."""
    rels = sorted(rel for rel in manifest.checksums if rel.startswith(f"{TOKENIZER_DIR}/"))
    if type(fs) is LocalFileSystem:
        safety.check_local_files(root, rels, url)
    return {rel[len(TOKENIZER_DIR) + 1:]: read_listed(fs, root, url, manifest, rel) for rel in rels}


def read_listed(fs: fsspec.AbstractFileSystem, root: str, url: str, manifest: Manifest, rel: str) -> bytes:
    """A small file the manifest lists, read whole within its listed size and checked against its sha256."""
    where = f"{url}/{rel}"
    try:
        data = read_capped(fs, f"{root}/{rel}", safety.file_limit(rel, manifest), where, size=manifest.sizes.get(rel))
    except FileNotFoundError as e:
        raise CacheFormatError(f"{where}: missing; the cache is incomplete, re-download or re-extract it") from e
    if sha256_bytes(data) != manifest.checksums[rel]:
        raise CacheFormatError(f"{where}: sha256 mismatch: the file is corrupt; re-download or re-extract it")
    return data


def open_feature_arrays(store: zarr.abc.store.Store, manifest: Manifest, url: str) -> dict[str, zarr.Array]:
    """Open and check the feature arrays against the manifest (dtype, trailing shape, length T)."""
    arrays: dict[str, zarr.Array] = {}
    T = manifest.counts["tokens"]
    for name in manifest.array_names:
        where = f"{url}/{FEATURES_NAME}/{name}"
        spec = manifest.arrays.get(name)
        if spec is None:
            raise CacheFormatError(f"{url}/{MANIFEST_NAME}: no entry for array {name!r} in 'arrays'; "
                                   f"the manifest is not from a complete genrecal cache")
        try:
            a = zarr.open_array(store, path=name, mode="r", zarr_format=3)
        except FileNotFoundError as e:  # zarr's ArrayNotFoundError is one
            raise CacheFormatError(f"{where}: array missing (no {name}/zarr.json); the cache is incomplete, "
                                   f"re-download or re-extract it") from e
        except KeyError as e:  # zarr names a codec it has no implementation for
            raise CacheFormatError(f"{where}/zarr.json: uses codec {e.args[0]!r}, which this installation cannot "
                                   f"decode; genrecal's hidden codecs need `import genrecal_cache` (or genrecal "
                                   f"installed, for its zarr entry points); a newer codec needs a newer genrecal") from e
        except CacheFormatError:
            raise
        except (ValueError, TypeError) as e:  # e.g. truncated JSON
            raise CacheFormatError(f"{where}/zarr.json: unreadable array metadata ({type(e).__name__}: {e}); "
                                   f"the file is corrupt, re-download or re-extract it") from e
        if str(a.dtype) != spec["stored_dtype"] or list(a.shape[1:]) != spec["shape_tail"] or a.shape[0] != T:
            raise CacheFormatError(f"{where}: stored as {a.dtype} {list(a.shape)} but the manifest says "
                                   f"{spec['stored_dtype']} {[T, *spec['shape_tail']]}; the cache is "
                                   f"inconsistent, re-download or re-extract it")
        chain = describe_chain(a)  # before any chunk is decoded: e.g. a chain switched to gzip (no size bound)
        if chain != spec["codec"]:
            raise CacheFormatError(f"{where}/zarr.json: codec chain {chain!r:.300} differs from the manifest's "
                                   f"{spec['codec']!r:.300}; the metadata was altered, re-download or re-extract "
                                   f"the cache")
        reader = ShardedArrayReader.for_array(a, where)
        if reader is None:
            raise CacheFormatError(f"{where}/zarr.json: codec chain {chain!r:.300} is not one genrecal writes "
                                   f"(sharding_indexed[serializer, blosc(...), crc32c] with an index [bytes, crc32c] "
                                   f"at the end); readers decode only those, whose sizes they can bound. Re-extract "
                                   f"the cache with genrecal")
        if (a.shards or a.chunks)[0] // a.chunks[0] > MAX_CHUNKS_PER_SHARD:  # its index alone would be huge
            raise CacheFormatError(f"{where}/zarr.json: {(a.shards or a.chunks)[0] // a.chunks[0]} inner chunks per "
                                   f"shard, above {MAX_CHUNKS_PER_SHARD}; the metadata is corrupt or hostile, "
                                   f"re-download or re-extract the cache")
        row_bytes = int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
        if max((a.shards or a.chunks)[0], a.chunks[0]) * row_bytes > MAX_CHUNK_BYTES:  # before any data is read
            raise CacheFormatError(f"{where}/zarr.json: shards/chunks of {(a.shards or a.chunks)[0]}/{a.chunks[0]} "
                                   f"tokens exceed {MAX_CHUNK_BYTES >> 30} GiB; the metadata is corrupt or hostile, "
                                   f"re-download or re-extract the cache")
        bound_zarr_decoding(a, reader)  # remote reads decode through zarr: same exact-size check as fastread
        arrays[name] = a
    return arrays
