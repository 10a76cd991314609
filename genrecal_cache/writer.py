"""Write a teacher cache: Zarr v3 sharded feature arrays + streamed `samples.parquet` + manifest.

Layout (spec: docs/cache-format.md)::

    manifest.json               written last, atomically; its absence marks an incomplete cache
    teacher_head.safetensors    TeacherHead.save
    features.zarr/              token_ids [T] int32, answer_mask [T] bool, hidden [T, d] (stored by the
                                hidden codec: bf16 bits as uint16, fp8, ecq or float32; see codecs.py),
                                topk_ids [T, k] int32, topk_logprobs [T, k] f32
    samples.parquet             one row per sample (offsets into the token axis, spans, inputs)
    teacher_tokenizer/          the teacher's tokenizer files, when given (format/tokenizer.py)

Extraction calls `add` per sample; a background thread does the compression and I/O behind a
bounded queue so the teacher forward never waits on the disk. Feature arrays are written one
whole shard at a time (a shard-sized buffer per array), so no shard file is ever rewritten and
each shard's sha256 is taken from the bytes as they are written, not by re-reading the cache.

Long because `CacheWriter` is one class: a sample's checks (`add`, `_prepare`) name the sample in the
caller's thread, the writer thread fills and flushes shards, and resume reopens the arrays; the commit
protocol is journal.py.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import zarr
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from . import __version__
from .format.codecs import HiddenCodec, describe_chain, hidden_codec as get_hidden_codec
from .config import BASIS_FIT_ROWS
from .format.head import TeacherHead
from .format.layout import create_feature_arrays, plan_layout
from .format.manifest import (
    BASIS_NAME, FEATURES_NAME, FORMAT_VERSION, HEAD_NAME, MANIFEST_NAME, SAMPLES_NAME, SIZES_KEY, TOKENIZER_DIR,
    ArraySpec, CacheFormatError, Counts, Manifest, TeacherInfo, answer_spans, relpath_problem, sha256_bytes, sha256_file,
)
from .format.roles import FLAG_COMPACT, FLAG_EXACT, FLAG_TOPK, ContextBasis, Storage, row_flags
from .io.durable import atomic_write
from .journal import CacheWriteError, Committed, Journal, is_journal, kill_point

__all__ = ["CacheWriteError", "CacheWriter", "SampleArrays", "SampleRecord"]


ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class SampleRecord:
    """One sample's row in samples.parquet: its inputs, provenance and extraction status."""
    id: str
    messages: list[dict]                   # [{"role": ..., "content": ...}], "<image>" marks images
    images: list[bytes] = field(default_factory=list)
    image_refs: list[str] = field(default_factory=list)
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleArrays:
    """One sample's teacher features in the teacher's tokenization (numpy or torch, any device)."""
    token_ids: ArrayLike       # [L] integer
    answer_mask: ArrayLike     # [L] bool: True on answer content tokens
    hidden: ArrayLike          # [L, d] post-final-norm hidden states (float32/bf16/float16)
    topk_ids: ArrayLike        # [L, k] integer
    topk_logprobs: ArrayLike   # [L, k] float


class _HashingLocalStore(LocalStore):
    """LocalStore that records the sha256 of every value it writes (zarr writes atomically, so the
    last recorded digest is the file's) and refuses to write any shard file twice."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.digests: dict[str, str] = {}

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        if key in self.digests and not key.endswith("zarr.json"):
            raise CacheWriteError(f"{FEATURES_NAME}/{key} would be rewritten; shard writes must be "
                                  f"shard-aligned (this is a bug in genrecal_cache.writer)")
        digest = await asyncio.to_thread(lambda: hashlib.sha256(value.as_buffer_like()).hexdigest())
        await super()._set(key, value, exclusive=exclusive)
        self.digests[key] = digest


_STOP = object()
_COMMIT_POINT = object()  # queued by commit_point()


class CacheWriter:
    """Streams samples into a new cache directory. Use `add` per sample, then `close`.

    `add` returns as soon as the sample is validated and queued; the writer thread compresses
    and writes. A failure in that thread is raised (as CacheWriteError) by the next `add`/`close`.
    As a context manager, an exception inside the block abandons the cache (no manifest).
    """

    def __init__(self, out_dir: str | os.PathLike, *, hidden_size: int, vocab_size: int, topk: int,
                 hidden_codec: HiddenCodec | str | None = None, teacher: dict[str, Any],
                 tokenizer_sha256: str, chat_template_sha256: str | None, head: TeacherHead, command: str,
                 shard_tokens: int | None = None, chunk_tokens: int | None = None, embed_images: bool = True,
                 queue_size: int = 16, extra: dict[str, Any] | None = None, resume: bool = False,
                 commit_seconds: float | None = None, tokenizer_files: dict[str, bytes] | None = None,
                 storage: Storage = Storage(), context_basis: ContextBasis | None = None,
                 basis_fit_rows: int = BASIS_FIT_ROWS) -> None:
        """`hidden_codec`: the codec, or its name: "bf16" (default, lossless), "fp8", "ecq" or "fp32"
        (genrecal_cache/format/codecs.py).
        `tokenizer_files`: the teacher tokenizer's files (`format.tokenizer.tokenizer_files`), written to
        `teacher_tokenizer/` at close so that the cache is trained from without the teacher.
        `storage`: which rows are stored, and how, by role (format/roles.py). With low-rank context the basis
        is `context_basis` when given (merge), else fitted on the first `basis_fit_rows` context rows
        (samples are held back until then) and saved to context_basis.safetensors before any is written."""
        self.out_dir = Path(out_dir)
        self.storage = storage
        if storage.rank is not None and storage.rank > hidden_size:
            raise ValueError(f"context rank {storage.rank} exceeds hidden_size {hidden_size}")
        if context_basis is not None and (storage.context != "lowrank" or context_basis.rank != storage.rank
                                          or context_basis.mean.shape[0] != hidden_size):
            raise ValueError(f"context basis of rank {context_basis.rank} and size {context_basis.mean.shape[0]} does "
                             f"not fit storage {storage} with hidden_size {hidden_size}")
        self.codec: HiddenCodec = get_hidden_codec(hidden_codec)
        if topk < 1 or hidden_size < 1 or vocab_size < 1:
            raise ValueError(f"hidden_size, vocab_size and topk must be >= 1 (got {hidden_size}, {vocab_size}, {topk})")
        if (head.hidden_size, head.vocab_size) != (hidden_size, vocab_size):
            raise ValueError(f"teacher head is [{head.vocab_size}, {head.hidden_size}] (vocab, hidden) but the cache "
                             f"is declared with vocab_size={vocab_size}, hidden_size={hidden_size}")
        self.hidden_size, self.vocab_size, self.topk = hidden_size, vocab_size, topk
        self._teacher: TeacherInfo = dict(teacher)  # type: ignore[assignment]  # extra provenance keys are kept
        self._meta = dict(command=command, tokenizer_sha256=tokenizer_sha256,
                          chat_template_sha256=chat_template_sha256,  # sizes: the files', at close
                          extra={k: v for k, v in (extra or {}).items() if k != SIZES_KEY})
        self._counts: Counts = {"samples": 0, "ok": 0, "error": 0, "tokens": 0, "answer_tokens": 0}
        self._tokenizer_files = {f"{TOKENIZER_DIR}/{name}": bytes(data) for name, data in (tokenizer_files or {}).items()}
        bad = next((rel for rel in self._tokenizer_files if relpath_problem(rel)), None)
        if bad is not None:
            raise ValueError(f"tokenizer file {bad!r}: {relpath_problem(bad)}")
        try:  # fail now, not after hours of extraction, if these would make an unreadable manifest
            Manifest.from_json(self._manifest(arrays={}, checksums={}).to_json(), source="CacheWriter arguments")
        except (CacheFormatError, TypeError) as e:
            raise ValueError(f"invalid cache metadata: {e}") from e
        self.embed_images = embed_images
        self.layout = plan_layout(hidden_size, topk, self.codec, shard_tokens=shard_tokens,
                                  chunk_tokens=chunk_tokens, storage=storage)
        # crash safety (journal.py, docs/cache-format.md "Commit protocol"): commits go to _progress.json +
        # _commits/; `resume=True` continues an interrupted run in the same directory from its last commit
        self.journal = Journal(self.out_dir, self._identity(), head, resume=resume, commit_seconds=commit_seconds,
                               command=command)
        resumed = self.journal.resumed
        self._store = _HashingLocalStore(self.out_dir / FEATURES_NAME)
        if resumed is None:
            group = zarr.open_group(self._store, mode="w", zarr_format=3)
            self._arrays, self._specs = create_feature_arrays(group, self.layout, self.codec, hidden_size, topk, storage)
        else:
            self._store.digests.update(resumed.shards)
            self._arrays, self._specs = self._reopen_arrays(resumed.written)
        S = self.layout.shard_tokens
        self._buf = {name: np.zeros((S, *a.shape[1:]), dtype=a.dtype) for name, a in self._arrays.items()}

        # caller-side state (add / close)
        self.committed_ids = self.journal.committed_ids  # a resumed run holds these samples already, in order
        self._ids = set(self.committed_ids)
        self._n_rows = len(self.committed_ids)
        self._closed = False
        # writer-thread state
        self._filled = 0        # tokens in the shard buffers
        self._written = 0       # tokens written to zarr (multiple of S until close)
        if resumed is not None:
            self._counts, self._written = resumed.counts, resumed.written
            for name, a in resumed.pending.items():
                self._buf[name][:len(a)] = a
                self._filled = len(a)
        self._error: tuple[str | None, BaseException] | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._basis = context_basis
        self._basis_fit_rows = basis_fit_rows
        # caller thread, low-rank context before its basis exists: the queue items held back (in order) and the
        # context rows gathered for the fit (see _hold)
        self._pending: list[object] | None = None
        self._fit_rows: list[torch.Tensor] = []
        (self.out_dir / (BASIS_NAME + ".tmp")).unlink(missing_ok=True)
        if storage.context == "lowrank" and context_basis is None and resumed is not None \
                and resumed.counts["samples"] > 0:  # committed samples were encoded on the saved basis: keep it
            self._basis = _load_saved_basis(self.out_dir / BASIS_NAME)
        elif self._basis is not None:  # given (merge): saved before any sample is written
            self._save_basis()
        if storage.context == "lowrank" and self._basis is None:
            self._pending = []
        self._thread = threading.Thread(target=self._run, name=f"CacheWriter({self.out_dir.name})", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------
    def add(self, row: SampleRecord, arrays: SampleArrays | None, commit: bool = True) -> None:
        """Validate and queue one sample. Blocks only while the queue is full. `commit=False`: no commit right
        after this sample; the caller marks where commits may happen with `commit_point()` (extraction
        commits between batches only, so that a resumed run batches the rest as an uninterrupted one)."""
        self._raise_if_failed()
        if self._closed:
            raise CacheWriteError(f"{self.out_dir}: add() after close()")
        sid = row.id
        if not isinstance(sid, str) or not sid:
            raise ValueError(f"sample id must be a non-empty string, got {sid!r}")
        if sid in self._ids:
            raise ValueError(f"sample {sid!r}: duplicate id; ids must be unique within a cache")
        if row.status == "ok":
            if arrays is None:
                raise ValueError(f"sample {sid!r}: status 'ok' needs arrays (pass status='error' with a reason instead)")
            if row.error is not None:
                raise ValueError(f"sample {sid!r}: status 'ok' must have error=None, got {row.error!r}")
            prepared = self._prepare(sid, arrays)
        elif row.status == "error":
            if arrays is not None:
                raise ValueError(f"sample {sid!r}: an error row carries no arrays (got some); drop them or mark it 'ok'")
            if not row.error:
                raise ValueError(f"sample {sid!r}: status 'error' needs an error message saying what went wrong")
            prepared = None
        else:
            raise ValueError(f"sample {sid!r}: status must be 'ok' or 'error', got {row.status!r}")
        if row.images and not self.embed_images and len(row.image_refs) != len(row.images):
            raise ValueError(f"sample {sid!r}: embed_images=False but it has {len(row.images)} image(s) and "
                             f"{len(row.image_refs)} image_refs; the cache would lose its inputs")
        try:  # fail here, naming the sample, rather than in the writer thread
            messages = json.dumps(row.messages, ensure_ascii=False)
            extra = json.dumps(row.extra, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sample {sid!r}: messages/extra must be JSON-serialisable: {e}") from e
        try:  # Parquet strings are UTF-8: a lone surrogate would fail a later commit, naming another sample
            for text in (sid, row.error or "", messages, extra, *row.image_refs):
                text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"sample {sid!r}: text that is not valid Unicode ({e.reason} "
                             f"{e.object[e.start:e.end]!r}); fix the input text") from None
        self._ids.add(sid)
        parquet_row = dict(index=self._n_rows, id=sid, status=row.status, error=row.error, messages=messages,
                           images=[bytes(b) for b in row.images] if self.embed_images else [],
                           image_refs=list(row.image_refs), extra=extra)
        self._n_rows += 1
        self._submit((parquet_row, prepared, commit))

    def commit_point(self) -> None:
        """Let the writer commit here if a commit is due (after samples added with `commit=False`)."""
        self._raise_if_failed()
        self._submit(_COMMIT_POINT)

    def _submit(self, item: object) -> None:
        """(Caller thread.) Queue an item, its low-rank context rows coded first; before the basis exists, hold it."""
        if self._pending is not None:
            self._hold(item)
        else:
            self._put(self._coded(item))

    def _coded(self, item: object) -> object:
        """The item with its context rows' states (`_context`, on the teacher's device) replaced by their
        coefficients. Here, on the forward's thread and device, not on the writer thread: on a CPU, a GEMM on the
        writer thread (numpy's BLAS threads beside torch's) slowed the forward itself; on a GPU only r floats per
        row cross to the host."""
        if isinstance(item, tuple) and item[1] is not None and "_context" in item[1]:
            arrays = item[1]
            compact = (arrays["row_flags"] & FLAG_COMPACT) > 0
            arrays["context"] = np.zeros((compact.shape[0], self.storage.rank), np.float32)
            arrays["context"][compact] = self._basis.encode(arrays.pop("_context"))
        return item

    def _hold(self, item: object) -> None:
        """(Caller thread.) Hold an item back until the low-rank basis exists, gathering its context rows; once
        `basis_fit_rows` are there, fit the basis here (in line it costs its own time once, 0.3 s at d=4096; on the
        writer thread, two thread pools on the same cores slowed both), save it, then queue the held items."""
        self._pending.append(item)
        if isinstance(item, tuple) and item[1] is not None:
            self._fit_rows.append(item[1]["_context"])
            if sum(len(r) for r in self._fit_rows) >= self._basis_fit_rows:
                self._release_pending()

    def _release_pending(self) -> None:
        """(Caller thread.) Fit the basis on the gathered context rows (all of them at the end of a run with fewer
        than `basis_fit_rows`), save it before any sample is written, then queue the held items in order."""
        states = (torch.cat(self._fit_rows)[:self._basis_fit_rows].cpu().numpy() if self._fit_rows
                  else np.zeros((0, self.hidden_size), np.float32))
        self._basis = ContextBasis.fit(states, self.storage.rank)
        self._save_basis()
        pending, self._pending, self._fit_rows = self._pending, None, []
        for item in pending:
            self._put(self._coded(item))

    def _put(self, item: object) -> None:
        """Queue an item for the writer thread."""
        while True:  # a bounded put that still notices a writer that died while we wait
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def _save_basis(self) -> None:
        path = self.out_dir / BASIS_NAME
        try:
            atomic_write(path, self._basis.to_bytes())
        except OSError as e:
            raise CacheWriteError(f"{path}: could not save the low-rank context basis ({e}); free the disk or fix "
                                  f"the folder's permissions, then run again (it resumes)") from e

    def close(self) -> Manifest:
        """Flush everything, write checksums and the manifest (last, atomically). Returns the manifest."""
        if self._closed:
            raise CacheWriteError(f"{self.out_dir}: close() called twice")
        if self._pending is not None:  # fewer context rows than basis_fit_rows in the whole run
            try:
                self._release_pending()
            except BaseException:
                self.abort()  # the writer thread does not outlive a cache that cannot be finished
                raise
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()
        try:
            self._flush_shards(final=True)
            self.journal.consolidate()
            self._write_tokenizer()
            checksums = self._checksums()
            sizes = {rel: (self.out_dir / rel).stat().st_size for rel in checksums}
            manifest = self._manifest(arrays=self._specs, checksums=checksums, sizes=sizes)
            atomic_write(self.out_dir / MANIFEST_NAME, manifest.to_json().encode())
            self.journal.remove()
        except Exception as e:
            raise CacheWriteError(f"{self.out_dir}: finishing the cache failed ({type(e).__name__}: {e}); "
                                  f"it has no manifest and is incomplete") from e
        return manifest

    def _manifest(self, arrays: dict[str, ArraySpec], checksums: dict[str, str],
                  sizes: dict[str, int] | None = None) -> Manifest:
        meta = dict(self._meta)
        if sizes is not None:  # extra.sizes: each file's exact size next to its sha256 (format/manifest.py)
            meta["extra"] = {**meta["extra"], SIZES_KEY: sizes}
        return Manifest(created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        tool_version=__version__, teacher=self._teacher, hidden_size=self.hidden_size,
                        vocab_size=self.vocab_size, topk=self.topk, arrays=arrays, counts=self._counts,
                        checksums=checksums, hidden_codec=self.codec.name, storage=self.storage.as_dict(),
                        # full storage is what version 2 stores, byte for byte: older genrecal reads it
                        format_version=2 if self.storage.is_full else FORMAT_VERSION, **meta)

    def _identity(self) -> dict[str, Any]:
        """What a resume must find unchanged: everything that decides the bytes written (Journal adds the head's sha256)."""
        return {"teacher": self._teacher, "tokenizer_sha256": self._meta["tokenizer_sha256"],
                "chat_template_sha256": self._meta["chat_template_sha256"], "hidden_codec": self.codec.name,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "topk": self.topk,
                "shard_tokens": self.layout.shard_tokens, "chunk_tokens": dict(self.layout.chunk_tokens),
                "embed_images": self.embed_images, "storage": self.storage.as_dict(),
                "extra": json.loads(json.dumps(self._meta["extra"], default=str))}

    def abort(self) -> None:
        """Stop the writer thread and leave the directory without a manifest (incomplete)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            sid, e = self._error
            where = f"sample {sid!r}" if sid is not None else "a commit"
            raise CacheWriteError(f"{self.out_dir}: the writer thread failed at {where}: {type(e).__name__}: {e}") from e

    def _prepare(self, sid: str, a: SampleArrays) -> dict[str, np.ndarray]:
        """Check shapes/ranges and copy to owned CPU numpy arrays in the stored dtypes."""
        tok = _as_int32(a.token_ids, sid, "token_ids", self.vocab_size)
        L = tok.shape[0] if tok.ndim == 1 else -1
        if L < 1:
            raise ValueError(f"sample {sid!r}: token_ids must be a non-empty 1-D array, got shape {tok.shape}")
        mask = _to_numpy(a.answer_mask)
        if mask.dtype != np.bool_:
            if not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
                raise ValueError(f"sample {sid!r}: answer_mask must be bool (or 0/1 integers), got {mask.dtype}")
            mask = mask.astype(np.bool_)
        ids, lps = _as_int32(a.topk_ids, sid, "topk_ids", self.vocab_size), _to_numpy(a.topk_logprobs).astype(np.float32)
        hidden = self._hidden_bits(a.hidden, sid)
        for name, arr, shape in (("answer_mask", mask, (L,)), ("hidden", hidden, (L, self.hidden_size)),
                                 ("topk_ids", ids, (L, self.topk)), ("topk_logprobs", lps, (L, self.topk))):
            if arr.shape != shape:
                raise ValueError(f"sample {sid!r}: {name} has shape {tuple(arr.shape)}, expected {shape} "
                                 f"(L={L} tokens, hidden_size={self.hidden_size}, topk={self.topk})")
        out = {"token_ids": np.array(tok, copy=True), "answer_mask": np.array(mask, copy=True),
               "hidden": hidden, "topk_ids": np.array(ids, copy=True), "topk_logprobs": np.array(lps, copy=True)}
        if self.storage.is_full:  # every row, as format version 2: no flags to compute
            return out
        flags = out["row_flags"] = row_flags(tok, mask, self.storage)
        if self.storage.context == "lowrank":  # float32 states of the context rows, on the teacher's device (_coded)
            out["_context"] = _context_rows(a.hidden, (flags & FLAG_COMPACT) > 0)
        out["hidden"][(flags & FLAG_EXACT) == 0] = 0  # rows the storage does not keep: zeros, compressed to ~nothing
        no_topk = (flags & FLAG_TOPK) == 0
        out["topk_ids"][no_topk] = 0
        out["topk_logprobs"][no_topk] = 0
        return out

    def _hidden_bits(self, h: ArrayLike, sid: str) -> np.ndarray:
        """hidden -> owned numpy in the stored dtype (bf16 bits, or float32 that fp8/ecq quantise in
        the writer thread); see HiddenCodec.to_stored."""
        try:
            out = self.codec.to_stored(h)
        except ValueError as e:
            raise ValueError(f"sample {sid!r}: {e}") from e
        if not self.codec.finite(out):
            raise ValueError(f"sample {sid!r}: hidden contains NaN or inf (as {self.codec.stored_dtype} for codec "
                             f"{self.codec.name}); the teacher forward is broken for it (record it with "
                             f"status='error')")
        return out

    def _reopen_arrays(self, written: int) -> tuple[dict[str, zarr.Array], dict[str, ArraySpec]]:
        """Resume: the arrays as the interrupted run created them, cut to the committed length (the journal
        kept exactly the committed shard files). Their zarr.json is kept but for the length: a run begun by
        an older genrecal (e.g. before the inner crc32c) goes on with its own codec chain, so its shards and
        ours decode alike, and the manifest records that chain. Missing metadata (a kill before the arrays
        were created) is today's."""
        mem = MemoryStore()
        fresh, specs = create_feature_arrays(zarr.open_group(mem, mode="w", zarr_format=3), self.layout, self.codec,
                                             self.hidden_size, self.topk, self.storage)

        async def keys() -> list[str]:
            return [k async for k in mem.list()]
        proto = default_buffer_prototype()
        for key in sync(keys()):
            path = self.out_dir / FEATURES_NAME / key
            value = proto.buffer.from_bytes(path.read_bytes()) if path.exists() else sync(mem.get(key, prototype=proto))
            if key.endswith("/zarr.json"):  # an array's: zarr's own serialisation, so a resumed cache is byte-identical
                try:
                    meta = ArrayV3Metadata.from_dict(json.loads(value.to_bytes()))
                except (ValueError, TypeError, KeyError) as e:  # zarr writes it atomically: a damaged disk
                    raise CacheWriteError(f"{path}: unreadable ({e}); delete {self.out_dir} and extract again") from e
                value = meta.update_shape((written, *meta.shape[1:])).to_buffer_dict(proto)["zarr.json"]
            sync(self._store.set(key, value))
        arrays = {name: zarr.open_array(self._store, path=name, mode="r+", zarr_format=3)
                  .with_config({"write_empty_chunks": True}) for name in fresh}
        for name, a in arrays.items():
            f = fresh[name]
            if (a.dtype, a.shape[1:], a.chunks, a.shards) != (f.dtype, f.shape[1:], f.chunks, f.shards):
                raise CacheWriteError(f"{self.out_dir / FEATURES_NAME / name}/zarr.json: {a.dtype} chunks {a.chunks} "
                                      f"shards {a.shards}, but this run writes {f.dtype} {f.chunks} {f.shards}; resume "
                                      f"with the genrecal release that began it, or delete {self.out_dir}")
        return arrays, {name: {**spec, "codec": describe_chain(arrays[name])} for name, spec in specs.items()}

    # ---- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None:
                continue  # keep draining so a blocked add() wakes up and sees the error
            self._take(item)

    def _take(self, item: object) -> None:
        """Write one queued item."""
        if item is _COMMIT_POINT:
            try:
                self._maybe_commit()
            except BaseException as e:  # noqa: BLE001 - handed to the caller thread
                self._error = (None, e)
            return
        row, arrays, commit = item
        try:
            self._write(row, arrays)
            if commit:
                self._maybe_commit()
        except BaseException as e:  # noqa: BLE001 - handed to the caller thread
            self._error = (row["id"], e)

    def _write(self, row: dict[str, Any], arrays: dict[str, np.ndarray] | None) -> None:
        c = self._counts
        c["samples"] += 1
        if arrays is None:
            c["error"] += 1
            self._add_row(row, offset=0, length=0, spans=[])
            return
        L = arrays["token_ids"].shape[0]
        self._add_row(row, offset=c["tokens"], length=L, spans=[list(s) for s in answer_spans(arrays["answer_mask"])])
        c["ok"] += 1
        c["tokens"] += L
        c["answer_tokens"] += int(arrays["answer_mask"].sum())
        S, pos = self.layout.shard_tokens, 0
        while pos < L:  # copy into the shard buffers, writing each one as soon as it is full
            n = min(L - pos, S - self._filled)
            for name, a in arrays.items():
                self._buf[name][self._filled:self._filled + n] = a[pos:pos + n]
            self._filled += n
            pos += n
            if self._filled == S:
                self._flush_shards(final=False)

    def _flush_shards(self, final: bool) -> None:
        n = self._filled
        if n == 0 or (n < self.layout.shard_tokens and not final):
            return
        start, end = self._written, self._written + n
        for name, arr in self._arrays.items():
            arr.resize((end, *arr.shape[1:]))
            arr[start:end] = self._buf[name][:n]
            kill_point("flush-array")
        self._written, self._filled = end, 0

    def _add_row(self, row: dict[str, Any], offset: int, length: int, spans: list[list[int]]) -> None:
        self.journal.add_row({**row, "token_offset": offset, "num_tokens": length, "answer_spans": spans})

    def _maybe_commit(self) -> None:
        if self.journal.due(self._written):
            n = self._filled
            self.journal.commit(Committed(self._counts, self._written, self._store.digests,
                                          {k: b[:n] for k, b in self._buf.items()} if n else {}))

    def _write_tokenizer(self) -> None:
        """The teacher tokenizer's files, written whole at close (a resumed run rewrites them)."""
        shutil.rmtree(self.out_dir / TOKENIZER_DIR, ignore_errors=True)
        for rel, data in self._tokenizer_files.items():
            (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out_dir / rel, data)

    def _checksums(self) -> dict[str, str]:
        sums = {f"{FEATURES_NAME}/{k}": v for k, v in self._store.digests.items()}
        sums.update({rel: sha256_bytes(data) for rel, data in self._tokenizer_files.items()})
        for name in (HEAD_NAME, SAMPLES_NAME) + ((BASIS_NAME,) if self._basis is not None else ()):
            sums[name] = sha256_file(str(self.out_dir / name))
        on_disk = {p.relative_to(self.out_dir).as_posix() for p in self.out_dir.rglob("*") if p.is_file()}
        on_disk = {rel for rel in on_disk if not is_journal(rel)}  # removed right after the manifest
        if on_disk != set(sums):  # e.g. a stray file: a manifest must describe exactly what is there
            raise CacheWriteError(f"files on disk and files written differ: only on disk {sorted(on_disk - set(sums))}, "
                                  f"only written {sorted(set(sums) - on_disk)}")
        return dict(sorted(sums.items()))


def _load_saved_basis(path: Path) -> ContextBasis:
    """The low-rank context basis saved in a cache folder (safetensors: no code runs)."""
    try:
        return ContextBasis.from_bytes(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CacheWriteError(f"{path}: unreadable context basis ({e}); delete {path.parent} and extract again") from e


def _context_rows(h: ArrayLike, rows: np.ndarray) -> torch.Tensor:
    """float32 h[rows], where h is (a tensor stays on its device)."""
    t = h.detach() if isinstance(h, torch.Tensor) else torch.from_numpy(np.asarray(h))
    return t[torch.from_numpy(rows).to(t.device)].float()


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _as_int32(x: ArrayLike, sid: str, name: str, vocab_size: int) -> np.ndarray:
    a = _to_numpy(x)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"sample {sid!r}: {name} must be an integer array, got {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ValueError(f"sample {sid!r}: {name} outside [0, vocab_size={vocab_size}): min {a.min()}, max {a.max()}")
    return a.astype(np.int32, copy=False)


