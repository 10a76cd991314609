"""Fast reads of a local cache's feature arrays, straight from the shard files.

zarr-python reads a token range of a sharded array correctly but slowly for this access pattern
(measured by bench/read_throughput.py: about a third of what the codecs themselves decode at):
it fetches the shard, decodes every inner chunk into a fresh buffer, copies it into a fresh output,
and the reader then converts bf16 bits to float32 in another pass. Here, for arrays whose layout is
the one genrecal writes (token-axis shards, index at the end with crc32c, inner chain of `bytes` or
a genrecal hidden codec, then blosc, then crc32c in caches written since the inner crc32c was
added), each inner chunk is read with one `pread`, decompressed and decoded on a small thread pool
(blosc and numpy release the GIL) and written straight into the output, converting bf16 to float32
on the way while the chunk is still in cache. A chunk that blosc stored as it is (a frame of header +
bytes: bf16 LLM states under lz4, which cannot shrink them without shuffling) and that is read in its
stored dtype goes from the file straight into the output, with no scratch copy. The shard index and
its crc32c and each inner chunk's crc32c are checked exactly as zarr checks them; a blosc frame must
declare exactly one chunk's bytes (checked before decoding), and `hidden` must decode to finite values.
Remote stores go through zarr, with the same frame-size check (`bound_zarr_decoding`); readers refuse
other chains when a cache is opened. Tests compare both paths.
"""

from __future__ import annotations

import copy
import os
import struct
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from ..format.codecs import BloscSettings, HiddenArrayBytesCodec, decode_payload
from ..format.safety import open_regular

__all__ = ["BufferPool", "EMPTY", "NonFiniteError", "ShardedArrayReader", "bf16_into", "blosc_sizes",
           "bound_zarr_decoding", "decode_pool", "read_ranges"]

EMPTY = np.uint64(2**64 - 1)
BLOSC_HEADER = 16    # bytes of a blosc frame's header (version, flags, type size, nbytes, blocksize, cbytes)
BLOSC_MEMCPYED = 2   # header flag: the frame holds the bytes as they are (nothing compressed, nothing shuffled)

_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _after_fork_in_child() -> None:  # the parent's pool threads (and a lock one of them held) are gone
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def decode_pool() -> ThreadPoolExecutor:
    """A process-wide pool for chunk decoding (recreated after a fork)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            workers = max(2, min(4, os.cpu_count() or 2))
            _pool = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="genrecal-decode"))
        return _pool[1]


def bf16_into(out: np.ndarray, bits: np.ndarray) -> None:
    """Write bfloat16 `bits` (uint16) into C-contiguous float32 `out` of the same shape (exact)."""
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)


_scratch = threading.local()


def _finite(x: np.ndarray) -> bool:
    """No NaN or inf in float `x`, or in `x` as bf16 bits (uint16: exponent all ones), without a temporary."""
    if x.dtype == np.uint16:  # |bits| below the first inf/NaN pattern, in one reused buffer
        mag = _buffer("finite", x.nbytes).view(np.uint16)[:x.size].reshape(x.shape)
        np.bitwise_and(x, 0x7FFF, out=mag)
        return int(mag.max()) < 0x7F80
    return bool(np.isfinite(x.min()) and np.isfinite(x.max()))  # min/max propagate NaN and show inf


def _nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Per token (row) of `x`: holds a NaN or inf (see `_finite`)."""
    if x.dtype == np.uint16:
        return ((x & 0x7F80) == 0x7F80).any(axis=-1)
    return ~np.isfinite(x).all(axis=-1)


def _buffer(name: str, nbytes: int) -> np.ndarray:
    """A per-thread reusable byte buffer (no fresh allocation, and no page faults, per chunk)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), np.uint8)
        setattr(_scratch, name, buf)
    return buf[:nbytes]


class ShardedArrayReader:
    """Token ranges of one local sharded array. Build with `for_array` (None: use zarr instead)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, shard_tokens: int, chunk_tokens: int,
                 blosc: numcodecs.Blosc, deserialize: Callable[[Any], np.ndarray], encoded_nbytes: int,
                 crc: bool = False, check_finite: bool = False) -> None:
        self.path, self.shape, self.dtype = path, shape, dtype
        self.shard_tokens, self.chunk_tokens = shard_tokens, chunk_tokens
        self.chunks_per_shard = shard_tokens // chunk_tokens
        self._blosc, self._deserialize = blosc, deserialize
        self.crc, self.check_finite = crc, check_finite
        self.encoded_nbytes = encoded_nbytes  # one inner chunk after the serializer, before compression
        self._indexes: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_array(cls, array: zarr.Array, path: str, check_finite: bool = False) -> ShardedArrayReader | None:
        """`check_finite`: refuse chunks that decode to NaN or inf (for `hidden`; see `_job`)."""
        codecs = array.metadata.codecs
        if array.ndim not in (1, 2) or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sh = codecs[0]
        tail = tuple(array.shape[1:])
        if (sh.index_location != ShardingCodecIndexLocation.end or tuple(sh.chunk_shape[1:]) != tail
                or tuple(array.shards[1:]) != tail or [type(c) for c in sh.index_codecs] != [BytesCodec, Crc32cCodec]
                or array.fill_value not in (0, False)):
            return None
        # the chains genrecal writes: serializer, blosc, then crc32c (caches written before it had no crc32c)
        serializer, *compressors = sh.codecs
        crc = bool(compressors) and isinstance(compressors[-1], Crc32cCodec)
        if crc:
            compressors = compressors[:-1]
        if len(compressors) != 1 or not isinstance(compressors[0], BloscCodec):
            return None
        c = compressors[0]
        blosc = BloscSettings(c.cname.value, c.clevel, c.shuffle.value, c.blocksize).numcodecs()
        dtype = np.dtype(array.dtype)
        chunk_shape = tuple(sh.chunk_shape)
        if isinstance(serializer, BytesCodec) and (dtype.itemsize == 1 or serializer.endian is None
                                                   or serializer.endian.value == "little") and np.little_endian:
            def deserialize(b: Any) -> np.ndarray:
                return np.frombuffer(b, dtype=dtype).reshape(chunk_shape)
            encoded_nbytes = int(np.prod(chunk_shape)) * dtype.itemsize
        elif isinstance(serializer, HiddenArrayBytesCodec):
            def deserialize(b: Any, out: np.ndarray | None = None) -> np.ndarray:
                return decode_payload(np.frombuffer(b, np.uint8), out=out).reshape(chunk_shape)
            deserialize.into = True  # type: ignore[attr-defined]  # can decode straight into the output
            encoded_nbytes = serializer.encoded_size(int(np.prod(chunk_shape[:-1])), chunk_shape[-1])
        else:
            return None
        return cls(path, tuple(array.shape), dtype, int(array.shards[0]), int(sh.chunk_shape[0]), blosc,
                   deserialize, encoded_nbytes, crc, check_finite)

    # ---- files ----------------------------------------------------------------------------------
    def _shard_file(self, s: int) -> str:
        return os.path.join(self.path, "c", str(s), *(["0"] if len(self.shape) == 2 else []))

    def _index(self, s: int, fd: int) -> np.ndarray:
        with self._lock:
            idx = self._indexes.get(s)
            if idx is not None:
                self._indexes.move_to_end(s)
                return idx
        n = 16 * self.chunks_per_shard + 4
        size = os.fstat(fd).st_size
        if size < n:
            raise ValueError(f"{self._shard_file(s)}: {size} bytes, too short for its shard index")
        raw = os.pread(fd, n, size - n)
        if len(raw) != n:
            raise ValueError(f"{self._shard_file(s)}: {size} bytes, too short for its shard index")
        if np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
            raise ValueError(f"{self._shard_file(s)}: shard index fails its crc32c check")
        idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.chunks_per_shard, 2)
        used = idx[idx[:, 0] != EMPTY]
        if used.size and ((used[:, 0] > size - n) | (used[:, 1] > size - n - used[:, 0])).any():
            # checked here, once per shard: a chunk length from the index is what a read allocates
            raise ValueError(f"{self._shard_file(s)}: shard index points past the end of the file's {size} bytes")
        with self._lock:
            self._indexes[s] = idx
            while len(self._indexes) > 64:
                self._indexes.popitem(last=False)
        return idx

    # ---- reading -----------------------------------------------------------------------------------
    def tasks(self, lo: int, hi: int, out: np.ndarray, convert_bf16: bool) -> list[Callable[[], None]]:
        """Closures that each fill one inner chunk's part of out[0 : hi - lo] (run them on a pool)."""
        if not 0 <= lo <= hi <= self.shape[0]:
            raise IndexError(f"{self.path}: tokens [{lo}, {hi}) outside [0, {self.shape[0]})")
        jobs = []
        c = self.chunk_tokens
        for k in range(lo // c, -(-hi // c)):  # global inner-chunk numbers
            a, b = max(lo, k * c), min(hi, (k + 1) * c)
            jobs.append(self._job(k, a - k * c, b - k * c, out[a - lo:b - lo], convert_bf16))
        return jobs

    def _job(self, k: int, a: int, b: int, dest: np.ndarray, convert_bf16: bool) -> Callable[[], None]:
        def run() -> None:
            s, j = divmod(k, self.chunks_per_shard)
            whole = (a, b) == (0, self.chunk_tokens) and dest.flags.c_contiguous
            into = getattr(self._deserialize, "into", False)
            # a whole chunk of stored bytes (no widening, no genrecal payload) in a frame of exactly header + chunk:
            # blosc stored it uncompressed, so it may be read straight into the output (`_stored_frame`)
            raw_out = whole and not convert_bf16 and dest.dtype == self.dtype and not into
            fd = open_regular(self._shard_file(s), self._shard_file(s))
            try:
                offset, nbytes = self._index(s, fd)[j]
                if offset == EMPTY:
                    dest[...] = 0
                    return
                if raw_out and nbytes == BLOSC_HEADER + self.encoded_nbytes + 4 * self.crc:
                    if self._stored_frame(fd, int(offset), dest, s, j, k):
                        self._check_finite(dest, k, a, s)
                        return
                data: Any = _buffer("raw", int(nbytes))
                got = os.preadv(fd, [data], int(offset))
            finally:
                os.close(fd)
            if got != nbytes:
                raise ValueError(f"{self._shard_file(s)}: chunk {j} truncated ({got} of {nbytes} bytes)")
            if self.crc:  # zarr's crc32c codec: 4 bytes after the blosc frame (caches since issue 14)
                if nbytes < 4 or np.uint32(google_crc32c.value(data[:-4])).tobytes() != data[-4:].tobytes():
                    raise ValueError(self._crc_fault(s, j, k))
                data = data[:-4]
            # blosc frames declare their decoded size: it must be exactly one chunk (decoded into a reused
            # buffer of that size: a frame declaring more or less is refused, never allocated or half-filled)
            declared = blosc_sizes(data)[0]
            if declared != self.encoded_nbytes:
                raise ValueError(f"{self._shard_file(s)}: chunk {j} declares {declared} decoded bytes, not the "
                                 f"{self.encoded_nbytes} of one chunk: the file is corrupt or hostile")
            if raw_out:
                self._blosc.decode(data, out=dest.reshape(-1).view(np.uint8))  # stored bytes: straight into the output
            else:
                data = self._blosc.decode(data, out=_buffer("decoded", self.encoded_nbytes))
                if into and whole and dest.dtype == np.float32:
                    self._deserialize(data, out=dest)  # a whole chunk: decode in place
                else:
                    chunk = self._deserialize(data)[a:b]
                    if convert_bf16:
                        bf16_into(dest, chunk)
                    else:
                        dest[...] = chunk
            self._check_finite(dest, k, a, s)
        return run

    def _stored_frame(self, fd: int, offset: int, dest: np.ndarray, s: int, j: int, k: int) -> bool:
        """Read a chunk whose blosc frame is its bytes behind the 16-byte header (blosc's `memcpyed` frames: a chunk
        that does not shrink, e.g. bf16 LLM states under lz4 without shuffle) with one `preadv` straight into `dest`,
        the header and the crc32c into small buffers: no scratch copy, no decompression pass. The crc32c covers
        header and bytes as zarr's does; the header must declare exactly this chunk, stored as is. False (nothing
        decided) for a frame of that size that is compressed after all: the caller reads it the usual way."""
        head, out = _buffer("head", BLOSC_HEADER), dest.reshape(-1).view(np.uint8)
        bufs = [head, out, *([_buffer("crc", 4)] if self.crc else [])]
        got, want = os.preadv(fd, bufs, offset), sum(b.nbytes for b in bufs)
        if got != want:
            raise ValueError(f"{self._shard_file(s)}: chunk {j} truncated ({got} of {want} bytes)")
        if self.crc and np.uint32(google_crc32c.extend(google_crc32c.value(head), out)).tobytes() != bufs[2].tobytes():
            raise ValueError(self._crc_fault(s, j, k))
        nbytes, _, cbytes = struct.unpack_from("<III", head, 4)
        if nbytes != self.encoded_nbytes:
            raise ValueError(f"{self._shard_file(s)}: chunk {j} declares {nbytes} decoded bytes, not the "
                             f"{self.encoded_nbytes} of one chunk: the file is corrupt or hostile")
        return bool(head[2] & BLOSC_MEMCPYED) and cbytes == BLOSC_HEADER + nbytes

    def _crc_fault(self, s: int, j: int, k: int) -> str:
        return (f"{self._shard_file(s)}: chunk {j} (tokens {k * self.chunk_tokens}+) fails its crc32c check: the file "
                f"is corrupt")

    def _check_finite(self, dest: np.ndarray, k: int, a: int, s: int) -> None:
        if self.check_finite and dest.size and not _finite(dest):
            bad = k * self.chunk_tokens + a + int(np.flatnonzero(_nonfinite_rows(dest))[0])
            raise NonFiniteError(f"{self._shard_file(s)}: token {bad} holds NaN or inf; the teacher's forward "
                                 f"pass was broken for that sample or the file was altered (the cache is unusable "
                                 f"for training: re-extract it)")


def blosc_sizes(frame: Any) -> tuple[int, int]:
    """(decoded bytes, frame bytes) a blosc frame declares in its 16-byte header; (-1, -1) if too short."""
    if len(frame) < 16:
        return -1, -1
    nbytes, _blocksize, cbytes = struct.unpack_from("<III", frame, 4)
    return nbytes, cbytes


class _ExactSizeBlosc(BloscCodec):
    """zarr's blosc codec refusing, before it allocates, a frame that does not declare exactly one chunk."""

    _expected: int = -1

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        declared = blosc_sizes(chunk_bytes.as_numpy_array())[0]
        if declared != self._expected:
            raise ValueError(f"a chunk declares {declared} decoded bytes, not the {self._expected} of one chunk: "
                             f"the shard is corrupt or hostile")
        return super()._decode_sync(chunk_bytes, chunk_spec)


def bound_zarr_decoding(array: zarr.Array, reader: ShardedArrayReader) -> None:
    """Make zarr's own decoding of `array` (remote caches) refuse blosc frames of any size but one chunk's,
    as `ShardedArrayReader` does; `reader` is the one `for_array` made for it (so the chain is genrecal's)."""
    sh = array.metadata.codecs[0]
    codecs = []
    for c in sh.codecs:
        if isinstance(c, BloscCodec):
            c = copy.copy(c)
            object.__setattr__(c, "__class__", _ExactSizeBlosc)  # frozen dataclass: same fields, one more check
            object.__setattr__(c, "_expected", reader.encoded_nbytes)
        codecs.append(c)
    object.__setattr__(sh, "codecs", tuple(codecs))  # zarr builds the inner pipeline from this on every read


class NonFiniteError(ValueError):
    """A chunk of `hidden` decoded to NaN or inf."""


class BufferPool:
    """Output buffers reused across reads: writing a fresh 256 MiB array first costs the kernel a
    page fault and zeroing per page, about a third of a bf16 read. A buffer is handed out again only
    when nothing references it any more: every numpy view of it (a sample's `hidden`, views of
    that, tensors made with torch.from_numpy) holds a reference to the buffer itself, so CPython's
    reference count says exactly whether one is still alive."""

    def __init__(self, max_buffers: int = 4, min_bytes: int = 1 << 20) -> None:
        self._bufs: list[np.ndarray] = []
        self.max_buffers, self.min_bytes = max_buffers, min_bytes
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n < self.min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            for k in range(len(self._bufs)):
                # 2 references = the list's and getrefcount's argument: no array or view uses it
                if self._bufs[k].nbytes >= n and sys.getrefcount(self._bufs[k]) == 2:
                    return self._bufs[k][:n].view(dtype).reshape(shape)
            buf = np.empty(n, np.uint8)
            if len(self._bufs) < self.max_buffers:
                self._bufs.append(buf)
            return buf.view(dtype).reshape(shape)


def read_ranges(requests: list[tuple[ShardedArrayReader, int, int, bool]], pool: BufferPool | None = None
                ) -> list[np.ndarray]:
    """Read [lo, hi) of several arrays at once on the decode pool; (reader, lo, hi, bf16 -> float32).
    Outputs come from `pool` when given (see BufferPool)."""
    outs, jobs = [], []
    for reader, lo, hi, bf16 in requests:
        shape, dtype = (hi - lo, *reader.shape[1:]), np.dtype(np.float32 if bf16 else reader.dtype)
        out = pool.empty(shape, dtype) if pool is not None else np.empty(shape, dtype)
        outs.append(out)
        jobs += reader.tasks(lo, hi, out, bf16)
    if len(jobs) == 1:
        jobs[0]()
    else:
        for f in [decode_pool().submit(job) for job in jobs]:
            f.result()
    return outs
