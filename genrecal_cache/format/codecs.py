"""Hidden-state codecs: how `features.zarr/hidden [T, d]` is stored, chosen at extract time.

| codec  | zarr dtype         | chain in each shard (then crc32c)           | bytes/token before blosc      | decoded value                   |
|--------|--------------------|---------------------------------------------|-------------------------------|---------------------------------|
| `bf16` | uint16 (bf16 bits) | bytes, blosc(lz4-1, no shuffle)             | 2d                            | exact bf16 (default, lossless)  |
| `fp8`  | float32            | genrecal.fp8_e4m3, blosc(zstd-1)            | d + 4                         | e4m3 x per-token float32 scale  |
| `ecq`  | float32            | genrecal.ecq, blosc(zstd-1)                 | d + 4 + 6k (zstd: ~0.6d)      | int8 codes x per-token step     |
| `fp32` | float32            | bytes, blosc(zstd-1, byte shuffle)          | 4d                            | exact (for tests)               |

Compression (`HiddenCodec.compression`; measured with bench/hidden_compressors.py, figures in docs/benchmarks.md):
since issue 24, bf16 is blosc lz4 without shuffle, so that reading bf16 into a trainer in its stored precision is
not bound by decompression. On LLM-like states lz4 cannot shrink interleaved bf16 bytes, and blosc then stores the
chunk as it is (a 16-byte header before the bytes), which the reader copies straight from the file into its
output; rows of zeros (what role-aware storage leaves out of `hidden`) and repeated rows (shared prompt prefixes)
still compress. Before, zstd-1 over byte-shuffled bytes stored 0.70 of LLM-like rows but decoded at ~2.5 GB/s per
thread, which held stored-precision reads at ~0.55x of a raw read of the same bytes; byte-shuffled lz4 (0.89)
still decoded too slowly for 0.8x. Caches written before keep their chain (zarr.json records it) and read as
before. fp32 (exact, for tests and references; no read target) keeps zstd-1 over shuffled bytes; fp8/ecq payloads
are single bytes whose zstd entropy coding is the point (ecq's int8 codes).

`fp8` and `ecq` are Zarr v3 array->bytes codecs (`Fp8E4M3Codec`, `EcqCodec`) registered with zarr
on `import genrecal_cache` and through the `zarr.codecs` entry point, so `zarr.open_array` on a
cache returns decoded float32 wherever genrecal is installed. The same payloads are also numcodecs
codecs (ids `genrecal_fp8_e4m3`, `genrecal_ecq`, entry point `numcodecs.codecs`). A payload is
self-describing: a 32-byte header (magic `GRHQ`, kind, version, rows, cols, outlier count) and the
per-token scales, so a chunk decodes without the array metadata.

- `fp8`: each token row is divided by s = max|row| / 448 and rounded to float8 e4m3fn (nearest
  even); stored per row as [float32 s][d codes]. Bound: |x - x^| <= max(2^-4 |x|, 2^-10 s)
  (+ 5.3e-36: a row whose max is below that decodes as zeros).
- `ecq` (entropy-coded quantisation): each token keeps its k = 8 largest |values| exactly (uint16
  column + float32 value) and rounds the rest to integer multiples of one step per token,
  step = max(alpha * rms, max|rest| / 127) with alpha = 0.14 and rms the RMS of the rest; the int8
  codes are planar after the steps and outliers, and blosc's zstd entropy-codes them (they take
  ~4.5 bits each on realistic states). Bound: |x - x^| <= step / 2 (+ float32 rounding), 0 for the
  kept values; since step ~ alpha * rms, the error is at most ~7% of the token's RMS and its RMS
  ~4% (step / sqrt(12)).
- `bf16`: |x - x^| <= 2^-8 |x| for float32 input (round to nearest even); bit-exact for bf16 input.

`HiddenCodec.error_bound(x)` returns these bounds per element (the tests check them).

Why `ecq` and not 4-bit groups (measured with `bench/storage.py --candidates`, figures in
docs/benchmarks.md): at a fixed bit rate, a uniform quantiser followed by an entropy coder beats
fixed-length 4-bit codes by a wide margin, because hidden-state values are concentrated near zero
(heavy-tailed): on realistic synthetic post-norm states (d=4096), NF4 groups of 32 with fp16
scales and the 8 largest values kept (0.25x of bf16 after zstd) leave 8.7% relative RMS error and
flip 5% of the teacher's top-1 tokens, while `ecq` at 0.30x leaves 3.4% and flips 1.4%, close to
fp8's 2.5% and 1.1% at 0.44x. Keeping each token's few largest values exactly stops the "massive
activation" channels of real LLMs from inflating every other value's step.

One file although long: the four codecs share the payload header, `HiddenCodec` and the decode
routines that io/fastread.py calls directly; apart, each piece would import the others.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numcodecs.abc import Codec as NumcodecsCodec
from numcodecs.compat import ensure_contiguous_ndarray, ndarray_copy
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration

__all__ = ["BloscSettings", "CodecError", "DEFAULT_HIDDEN_CODEC", "E4M3_PAIR_TABLE", "E4M3_TABLE", "ECQ_NAME",
           "ECQ_OUTLIERS", "ECQ_QMAX", "ECQ_STEP", "EcqCodec", "FP8_FLUSH", "FP8_MAX", "FP8_NAME", "Fp8E4M3Codec",
           "HEADER", "HIDDEN_CODECS", "HiddenArrayBytesCodec", "HiddenCodec", "LEGACY_NAMES", "LZ4_BYTES", "MAGIC",
           "NumcodecsEcq", "NumcodecsFp8E4M3", "VERSION", "ZSTD_BYTES", "ZSTD_SHUFFLE",
           "bf16_bits_to_float32", "decode_payload", "describe_chain", "ecq_encode", "ecq_error_bound", "ecq_variant",
           "float32_to_bf16_bits", "float32_to_e4m3", "fp8_encode", "fp8_error_bound", "hidden_codec", "register",
           "resolve_hidden_codec"]

FP8_NAME = "genrecal.fp8_e4m3"
ECQ_NAME = "genrecal.ecq"

HIDDEN_CODECS = ("bf16", "fp8", "ecq", "fp32")
DEFAULT_HIDDEN_CODEC = "bf16"
LEGACY_NAMES = {"bfloat16": "bf16", "float32": "fp32"}  # the old `hidden_dtype` values, still accepted

# ---- payload header ----------------------------------------------------------------------------------
MAGIC = b"GRHQ"
HEADER = struct.Struct("<4sBBHIIHH12x")  # magic, kind, version, flags, rows, cols, outliers, reserved
assert HEADER.size == 32
KIND_FP8, KIND_ECQ = 1, 2
VERSION = 1

FP8_MAX = 448.0       # largest finite float8 e4m3fn
_F32_TINY = np.float32(np.finfo(np.float32).tiny)
FP8_FLUSH = float(_F32_TINY) * FP8_MAX  # fp8 rows whose max is below this (5.3e-36) decode as zeros
ECQ_STEP = 0.14       # ecq step, as a fraction of each token's RMS (chosen by measurement, see above)
ECQ_OUTLIERS = 8      # values per token kept exactly by ecq
ECQ_QMAX = 127


class CodecError(ValueError):
    """A payload that is not a genrecal hidden-state chunk, or input a codec cannot encode."""


def _pack_header(kind: int, rows: int, cols: int, outliers: int = 0) -> np.ndarray:
    return np.frombuffer(HEADER.pack(MAGIC, kind, VERSION, 0, rows, cols, outliers, 0), np.uint8)


def _header(payload: np.ndarray) -> tuple[int, int, int, int]:
    if payload.nbytes < HEADER.size:
        raise CodecError(f"genrecal hidden codec: payload of {payload.nbytes} bytes is shorter than its header")
    magic, kind, version, _flags, rows, cols, k, _ = HEADER.unpack(payload[:HEADER.size].tobytes())
    if magic != MAGIC:
        raise CodecError(f"genrecal hidden codec: bad magic {magic!r} (expected {MAGIC!r}); not a genrecal chunk")
    if version != VERSION:
        raise CodecError(f"genrecal hidden codec: payload version {version}, this genrecal decodes version {VERSION}; "
                         f"upgrade genrecal")
    return kind, rows, cols, k


def _as_rows(x: Any) -> np.ndarray:
    """float32 [..., d] -> C-contiguous [rows, d]; refuses other dtypes and non-finite values."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise CodecError(f"genrecal hidden codecs encode float32, got {x.dtype}")
    if x.ndim == 0:
        raise CodecError("genrecal hidden codecs encode arrays with at least one dimension")
    x = np.ascontiguousarray(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]))  # not -1: rows of 0 values
    if not np.isfinite(x).all():
        raise CodecError("genrecal hidden codecs: input contains NaN or inf")
    return x


def _f32(a: np.ndarray) -> np.ndarray:
    """Bytes (uint8, any alignment) -> float32 values."""
    return np.frombuffer(a.tobytes(), np.float32) if a.ctypes.data % 4 else a.view(np.float32)


# ---- fp8 e4m3 with one float32 scale per token -----------------------------------------------------------

def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8 e4m3fn bit patterns (0x7f/0xff are NaN)."""
    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    e, m = (code >> 3) & 0xF, code & 0x7
    val = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    val = (sign * val).astype(np.float32)
    val[(code & 0x7F) == 0x7F] = np.nan
    return val


E4M3_TABLE = _e4m3_table()


def float32_to_e4m3(y: np.ndarray) -> np.ndarray:
    """Round float32 values with |y| <= 448 to float8 e4m3fn bit patterns (uint8), nearest-even.

    Bit-identical to torch's `y.to(torch.float8_e4m3fn)` on that range (tested).
    """
    y = np.asarray(y, dtype=np.float32)
    bits = y.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    a = bits & np.uint32(0x7FFFFFFF)
    # normal range (|y| >= 2^-6): drop 20 of float32's 23 mantissa bits, rounding half to even; a carry
    # out of the mantissa moves into the exponent, which is what rounding up to the next binade means
    r = (a + np.uint32(0x7FFFF) + ((a >> 20) & np.uint32(1))) >> 20
    normal = (r - np.uint32((127 - 7) << 3)).astype(np.uint8)  # rebias the exponent: 127 -> 7
    # subnormals (|y| < 2^-6): multiples of 2^-9, rint rounds half to even; 2^-6 itself gives code 8
    sub = np.rint(np.abs(y) * np.float32(512)).astype(np.uint8)
    code = np.where(a < np.uint32(0x3C800000), sub, normal)  # 0x3c800000 = 2^-6
    return code | sign


def _fp8_scales(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    return np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)


def fp8_encode(x: Any) -> np.ndarray:
    """float32 [..., d] -> payload (uint8): header, then per row [float32 scale][d e4m3 codes];
    scale = max|row| / 448 (1 for an all-zero row), so every token uses fp8's whole range."""
    x = _as_rows(x)
    rows, cols = x.shape
    scale = _fp8_scales(x)
    # 1/scale overflows below float32's smallest normal: such rows (max < 5e-36) are flushed to zero
    inv = np.where(scale >= _F32_TINY, np.float32(1) / np.maximum(scale, _F32_TINY), np.float32(0)).astype(np.float32)
    y = np.clip(x * inv[:, None], -FP8_MAX, FP8_MAX)  # the clip only catches float rounding at the max
    out = np.empty(HEADER.size + rows * (4 + cols), dtype=np.uint8)
    out[:HEADER.size] = _pack_header(KIND_FP8, rows, cols)
    body = out[HEADER.size:].reshape(rows, 4 + cols)
    body[:, :4] = scale.view(np.uint8).reshape(rows, 4)
    body[:, 4:] = float32_to_e4m3(y)
    return out


def _e4m3_pair_table() -> np.ndarray:
    """The float32 values of every pair of adjacent e4m3 codes, indexed by the pair read as one uint16
    (in memory order, so either endianness), as uint64: one lookup writes two output values."""
    pairs = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(E4M3_TABLE[pairs]).view(np.uint64).reshape(-1)


E4M3_PAIR_TABLE = _e4m3_pair_table()  # 512 KiB


def _fp8_decode(payload: np.ndarray, rows: int, cols: int, out: np.ndarray | None = None) -> np.ndarray:
    body = payload[HEADER.size:]
    if body.size != rows * (4 + cols):
        raise CodecError(f"genrecal fp8 chunk: {body.size} body bytes, expected {rows} x (4 + {cols}); truncated?")
    body = body.reshape(rows, 4 + cols)
    scale = _f32(np.ascontiguousarray(body[:, :4])).reshape(rows, 1)
    out = _out(out, rows, cols)
    # Two passes per block, which stays in cache: a table lookup, then the per-token scale. The lookup
    # reads codes in pairs (uint16 index, uint64 entry = two float32 values): half the gathers of a
    # 256-entry table, and mode="wrap" skips numpy's bounds check (every uint16 is a valid index).
    # Exactly E4M3_TABLE[code] * scale (NaN codes, never written, give NaN: a corrupt chunk shows).
    if cols % 2 == 0:
        codes, dest, table = body[:, 4:].view(np.uint16), out.view(np.uint64), E4M3_PAIR_TABLE
    else:  # odd rows cannot be read in pairs
        codes, dest, table = body[:, 4:], out, E4M3_TABLE
    step = max(1, (512 << 10) // max(4 * cols, 1))  # rows per block
    for a in range(0, rows, step):
        np.take(table, codes[a:a + step], out=dest[a:a + step], mode="wrap")
        np.multiply(out[a:a + step], scale[a:a + step], out=out[a:a + step])
    return out


def fp8_error_bound(x: Any) -> np.ndarray:
    x = _as_rows(x)
    return np.maximum(np.abs(x) * 2.0 ** -4, _fp8_scales(x)[:, None] * 2.0 ** -10) * (1 + 1e-6) + FP8_FLUSH


# ---- ecq: int8 multiples of one step per token, entropy-coded by the zstd that follows ------------------------

def _ecq_split(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(rest with each row's k largest |values| zeroed, their columns [rows, k] uint16 sorted, values)."""
    if not k:
        return x, None, None
    idx = np.sort(np.argpartition(np.abs(x), x.shape[1] - k, axis=1)[:, -k:], axis=1)
    vals = np.take_along_axis(x, idx, axis=1)
    rest = x.copy()
    np.put_along_axis(rest, idx, 0, axis=1)
    return rest, idx.astype(np.uint16), vals


def _ecq_steps(rest: np.ndarray, step: float) -> np.ndarray:
    cols = max(rest.shape[1], 1)
    rms = np.sqrt(np.einsum("ij,ij->i", rest, rest, dtype=np.float64) / cols)
    amax = np.abs(rest).max(axis=1).astype(np.float64) if rest.shape[1] else np.zeros(rest.shape[0])
    s = np.maximum(step * rms, amax / ECQ_QMAX).astype(np.float32)  # no code ever exceeds +-127
    s[~(s > 0)] = 1  # an all-zero row (or a subnormal-small one, which rounds to zeros anyway)
    return s


def ecq_encode(x: Any, step: float = ECQ_STEP, outliers: int = ECQ_OUTLIERS) -> np.ndarray:
    """float32 [..., d] -> payload: header, steps [rows] float32, outlier columns [rows, k] uint16,
    outlier values [rows, k] float32, codes [rows, d] int8 (k = min(outliers, d))."""
    if not (0 < step <= 1e6) or not 0 <= outliers <= 0xFFFF:
        raise CodecError(f"genrecal ecq: step must be > 0 and outliers in [0, 65535], got {step}, {outliers}")
    x = _as_rows(x)
    rows, cols = x.shape
    k = min(outliers, cols)
    if k and cols > 0xFFFF:
        raise CodecError(f"genrecal ecq: outlier columns are uint16; rows of {cols} > 65535 values need outliers=0")
    rest, idx, vals = _ecq_split(x, k)
    s = _ecq_steps(rest, step)
    q = rest * (np.float32(1) / s)[:, None]
    np.rint(q, out=q)
    np.clip(q, -ECQ_QMAX, ECQ_QMAX, out=q)
    parts = [_pack_header(KIND_ECQ, rows, cols, k), s.view(np.uint8)]
    if k:
        parts += [idx.view(np.uint8).reshape(-1), np.ascontiguousarray(vals).view(np.uint8).reshape(-1)]
    parts.append(q.astype(np.int8).view(np.uint8).reshape(-1))
    return np.concatenate(parts)


def _ecq_decode(payload: np.ndarray, rows: int, cols: int, k: int, out: np.ndarray | None = None) -> np.ndarray:
    if k > cols or payload.size != HEADER.size + rows * (4 + 6 * k + cols):
        raise CodecError(f"genrecal ecq chunk: {payload.size} bytes do not fit {rows} rows x {cols} cols with {k} "
                         f"outliers; truncated or corrupt")
    o = HEADER.size
    s = _f32(payload[o:o + 4 * rows])
    o += 4 * rows
    codes = payload[o + 6 * rows * k:].view(np.int8).reshape(rows, cols)
    out = np.multiply(codes, s[:, None], out=_out(out, rows, cols), dtype=np.float32)
    if k:
        idx = np.frombuffer(payload[o:o + 2 * rows * k].tobytes(), np.uint16).reshape(rows, k).astype(np.intp)
        if idx.size and int(idx.max()) >= cols:
            raise CodecError(f"genrecal ecq chunk: outlier column {int(idx.max())} outside {cols} columns; corrupt")
        vals = _f32(payload[o + 2 * rows * k:o + 6 * rows * k]).reshape(rows, k)
        np.put_along_axis(out, idx, vals, axis=1)
    return out


def ecq_error_bound(x: Any, step: float = ECQ_STEP, outliers: int = ECQ_OUTLIERS) -> np.ndarray:
    x = _as_rows(x)
    k = min(outliers, x.shape[1])
    rest, idx, _ = _ecq_split(x, k)
    bound = np.broadcast_to(_ecq_steps(rest, step)[:, None] / 2, x.shape) * (1 + 1e-6) + np.abs(x) * 2.0 ** -23
    if k:
        np.put_along_axis(bound, idx.astype(np.intp), 0, axis=1)
    return bound


# ---- payload dispatch ------------------------------------------------------------------------------------

def _out(out: np.ndarray | None, rows: int, cols: int) -> np.ndarray:
    if out is None:
        return np.empty((rows, cols), np.float32)
    if out.dtype != np.float32 or out.size != rows * cols or not out.flags.c_contiguous:
        raise CodecError(f"genrecal hidden codec: out must be a C-contiguous float32 array of {rows} x {cols}")
    return out.reshape(rows, cols)


def decode_payload(payload: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Any genrecal fp8/ecq payload -> float32 [rows, cols] (as its header describes), written into
    `out` (C-contiguous float32 of that size) when given."""
    p = payload.view(np.uint8).reshape(-1) if isinstance(payload, np.ndarray) else np.frombuffer(payload, np.uint8)
    kind, rows, cols, k = _header(p)
    if kind == KIND_FP8:
        return _fp8_decode(p, rows, cols, out)
    if kind == KIND_ECQ:
        return _ecq_decode(p, rows, cols, k, out)
    raise CodecError(f"genrecal hidden codec: unknown payload kind {kind}; upgrade genrecal")


# ---- Zarr v3 codecs --------------------------------------------------------------------------------------

class HiddenArrayBytesCodec(ArrayBytesCodec):
    """float32 chunk [..., d] <-> self-describing bytes; subclasses set `name` and the transforms."""

    is_fixed_size = True
    name: str = ""

    def _config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        _, config = parse_named_configuration(data, cls.name, require_configuration=False)
        try:
            return cls(**(config or {}))
        except TypeError as e:
            raise ValueError(f"codec {cls.name}: bad configuration {config!r} ({e})") from e

    def to_dict(self) -> dict[str, Any]:
        config = self._config()
        return {"name": self.name, **({"configuration": config} if config else {})}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        if dtype.to_native_dtype() != np.dtype(np.float32):
            raise ValueError(f"codec {self.name} encodes float32 arrays, not {dtype}")
        if len(shape) < 1:
            raise ValueError(f"codec {self.name} needs arrays with at least one dimension")

    def encode_array(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encoded_size(self, rows: int, cols: int) -> int:
        raise NotImplementedError

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: Any) -> int:
        return self.encoded_size(math.prod(chunk_spec.shape[:-1]), chunk_spec.shape[-1])

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        out = decode_payload(chunk_bytes.as_numpy_array())
        if out.size != math.prod(chunk_spec.shape):
            raise CodecError(f"codec {self.name}: chunk decodes to {list(out.shape)} but the array's chunk is "
                             f"{list(chunk_spec.shape)}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out.reshape(chunk_spec.shape))

    def _encode_sync(self, chunk_array: Any, chunk_spec: Any) -> Any:
        return chunk_spec.prototype.buffer.from_array_like(self.encode_array(chunk_array.as_numpy_array()))

    async def _decode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: Any, chunk_spec: Any) -> Any:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)


@dataclass(frozen=True)
class Fp8E4M3Codec(HiddenArrayBytesCodec):
    """float8 e4m3fn with one float32 scale (max|row| / 448) per row (token), stored with the row."""

    name = FP8_NAME

    def encode_array(self, x: np.ndarray) -> np.ndarray:
        return fp8_encode(x)

    def encoded_size(self, rows: int, cols: int) -> int:
        return HEADER.size + rows * (4 + cols)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        return fp8_error_bound(x)


@dataclass(frozen=True)
class EcqCodec(HiddenArrayBytesCodec):
    """Per row: the `outliers` largest |values| exactly, the rest as int8 multiples of
    step * RMS (at least max|rest| / 127); to be followed by an entropy coder (blosc zstd)."""

    name = ECQ_NAME
    step: float = ECQ_STEP
    outliers: int = ECQ_OUTLIERS

    def __post_init__(self) -> None:
        ok_step = isinstance(self.step, (int, float)) and not isinstance(self.step, bool) and 0 < self.step <= 1e6
        if not ok_step or not isinstance(self.outliers, int) or not 0 <= self.outliers <= 0xFFFF:
            raise ValueError(f"codec {ECQ_NAME}: step must be a number > 0 and outliers an integer in [0, 65535]; "
                             f"got step={self.step!r}, outliers={self.outliers!r}")

    def _config(self) -> dict[str, Any]:
        return {"step": self.step, "outliers": self.outliers}

    def encode_array(self, x: np.ndarray) -> np.ndarray:
        return ecq_encode(x, self.step, self.outliers)

    def encoded_size(self, rows: int, cols: int) -> int:
        return HEADER.size + rows * (4 + 6 * min(self.outliers, cols) + cols)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        return ecq_error_bound(x, self.step, self.outliers)


# ---- numcodecs codecs (same payloads; for zarr v2 arrays and plain numcodecs users) -------------------------

def _numcodecs_decode(buf: Any, out: Any = None) -> Any:
    arr = decode_payload(ensure_contiguous_ndarray(buf).view(np.uint8).reshape(-1))
    return ndarray_copy(arr, out) if out is not None else arr


class NumcodecsFp8E4M3(NumcodecsCodec):
    """numcodecs form of `Fp8E4M3Codec`: encodes a float32 array [..., d], decodes to [rows, d]."""
    codec_id = "genrecal_fp8_e4m3"

    def encode(self, buf: Any) -> bytes:
        return fp8_encode(np.asarray(buf)).tobytes()

    def decode(self, buf: Any, out: Any = None) -> Any:
        return _numcodecs_decode(buf, out)


class NumcodecsEcq(NumcodecsCodec):
    """numcodecs form of `EcqCodec` (follow it with a zstd or blosc-zstd compressor)."""
    codec_id = "genrecal_ecq"

    def __init__(self, step: float = ECQ_STEP, outliers: int = ECQ_OUTLIERS) -> None:
        EcqCodec(step=step, outliers=outliers)  # validates
        self.step, self.outliers = step, outliers

    def encode(self, buf: Any) -> bytes:
        return ecq_encode(np.asarray(buf), self.step, self.outliers).tobytes()

    def decode(self, buf: Any, out: Any = None) -> Any:
        return _numcodecs_decode(buf, out)


_registered = False


def register() -> None:
    """Register the codecs with zarr (v3 names) and numcodecs (ids). Idempotent; runs on
    `import genrecal_cache`; zarr and numcodecs also find them through entry points."""
    global _registered
    if _registered:
        return
    import numcodecs
    from zarr.registry import register_codec

    register_codec(FP8_NAME, Fp8E4M3Codec)
    register_codec(ECQ_NAME, EcqCodec)
    numcodecs.register_codec(NumcodecsFp8E4M3)
    numcodecs.register_codec(NumcodecsEcq)
    _registered = True


# ---- the hidden codecs as writer, reader, plan and fidelity use them -------------------------------------------

@dataclass(frozen=True)
class BloscSettings:
    """One blosc compressor of a chain, as zarr's BloscCodec records it in the array's zarr.json."""
    cname: str       # "zstd" | "lz4" | "lz4hc" | "blosclz" | "zlib"
    clevel: int      # 0: stored as is (a blosc header, then the bytes)
    shuffle: str     # "noshuffle" | "shuffle" | "bitshuffle"
    blocksize: int   # bytes per blosc block; 0: blosc's choice

    def numcodecs(self) -> NumcodecsCodec:
        """The same compressor as a numcodecs Blosc (what readers decode a chunk with outside zarr)."""
        import numcodecs

        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[self.shuffle]
        return numcodecs.Blosc(cname=self.cname, clevel=self.clevel, shuffle=shuffle, blocksize=self.blocksize)


# fp8/ecq payloads are single bytes whose zstd entropy coding is the point (no shuffle; 1 MiB blocks give
# the entropy coder enough of them).
ZSTD_BYTES = BloscSettings("zstd", 1, "noshuffle", 1 << 20)
# fp32, and bf16 before issue 24: byte shuffle separates the compressible sign/exponent bytes from mantissa noise.
ZSTD_SHUFFLE = BloscSettings("zstd", 1, "shuffle", 1 << 20)
# bf16 (see the module docstring): LLM-like rows are stored as they are, zero and repeated rows compressed;
# lz4 level 1 stores as little as level 9 here and encodes faster (both > 2.5 GB/s per thread).
LZ4_BYTES = BloscSettings("lz4", 1, "noshuffle", 1 << 20)


@dataclass(frozen=True)
class HiddenCodec:
    """One `--hidden-codec` choice: zarr dtype and chain, manifest text, sizes, conversions, bounds."""
    name: str                  # "bf16" | "fp8" | "ecq" | "fp32"
    logical_dtype: str         # manifest arrays.hidden.dtype: precision of the stored values
    stored_dtype: str          # the zarr array's data type
    lossless: bool
    description: str
    quantizer: HiddenArrayBytesCodec | None = None  # the genrecal zarr codec (fp8, ecq); None: zarr's `bytes`
    compression: BloscSettings = field(kw_only=True)  # the blosc after the serializer

    def serializer(self) -> Any:
        """The array->bytes codec of the chain."""
        from zarr.codecs import BytesCodec
        return self.quantizer if self.quantizer is not None else BytesCodec()

    @property
    def blosc(self) -> dict[str, Any]:
        """The blosc settings of the chain as keyword arguments (cname, clevel, shuffle, blocksize)."""
        return dataclasses.asdict(self.compression)

    def compressor(self) -> Any:
        from zarr.codecs import BloscCodec
        typesize = 1 if self.quantizer is not None else np.dtype(self.stored_dtype).itemsize
        return BloscCodec(typesize=typesize, **self.blosc)

    @property
    def attributes(self) -> dict[str, Any]:
        """zarr attributes of `hidden` (bf16 bits need one to be read as numbers)."""
        return {"genrecal_encoding": "bfloat16"} if self.name == "bf16" else {}

    def encoded_bytes(self, rows: int, cols: int) -> int:
        """Exact bytes of one inner chunk of `rows` tokens before blosc."""
        if self.quantizer is not None:
            return self.quantizer.encoded_size(rows, cols)
        return rows * cols * np.dtype(self.stored_dtype).itemsize

    def row_bytes(self, cols: int) -> float:
        """Bytes per token before compression, leaving out per-chunk headers."""
        n = 1 << 16
        return (self.encoded_bytes(n, cols) - self.encoded_bytes(0, cols)) / n

    def to_stored(self, h: Any) -> np.ndarray:
        """Float hidden states (torch tensor on any device, or numpy) -> an owned numpy array in the
        zarr dtype: bf16 bits (torch's round-to-nearest-even cast, done on the tensor's own device so a
        GPU batch crosses to the host at half size), else float32 (fp8/ecq quantise later, in the
        writer thread, inside zarr's codec pipeline)."""
        import torch

        t = h.detach() if isinstance(h, torch.Tensor) else torch.from_numpy(np.asarray(h))
        if not t.is_floating_point():
            raise ValueError(f"hidden must be floating point, got {t.dtype}")
        if self.name == "bf16":
            if t.device.type == "cpu" and t.dtype == torch.float32:
                # the same round-to-nearest-even as torch's cast, in numpy: torch's cast runs on its OpenMP
                # pool, which stalls (several ms per sample) while the writer thread keeps a core busy
                return float32_to_bf16_bits(t.contiguous().numpy())
            return t.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16).copy()
        return t.to(torch.float32).cpu().numpy().copy()

    def finite(self, stored: np.ndarray) -> bool:
        """Whether a `to_stored` result holds only finite values (on numpy: torch.isfinite is ~30x
        slower on CPU). A value beyond bf16's range is inf there, as wrong as a NaN."""
        if self.name == "bf16":
            return not bool(((stored & 0x7F80) == 0x7F80).any())  # exponent all ones: inf or NaN
        return bool(np.isfinite(stored).all())

    def to_float32(self, stored: np.ndarray) -> np.ndarray:
        """What zarr returns for `hidden` -> float32 values in a new array (zarr decodes fp8/ecq)."""
        if self.name == "bf16":
            return bf16_bits_to_float32(stored)
        return np.array(stored, dtype=np.float32, copy=True)

    def error_bound(self, x: Any) -> np.ndarray:
        """Per-element bound on |x - decode(encode(x))| for float32 input x [..., d] (one chunk)."""
        x32 = _as_rows(np.asarray(x, np.float32))
        if self.quantizer is not None:
            return self.quantizer.error_bound(x32)
        return np.abs(x32) * 2.0 ** -8 if self.name == "bf16" else np.zeros_like(x32)

    def round_trip(self, x: Any) -> np.ndarray:
        """float32 [n, d] -> what a cache with this codec returns for it (as one chunk)."""
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        if self.quantizer is not None:
            return decode_payload(self.quantizer.encode_array(x32)).reshape(x32.shape)
        return bf16_bits_to_float32(self.to_stored(x32)) if self.name == "bf16" else x32.copy()


def describe_chain(array: Any) -> str:
    """A zarr array's codec chain as the manifest records it (`arrays.<name>.codec`), e.g.
    `sharding_indexed[bytes, blosc(cname=zstd, clevel=1, shuffle=shuffle, blocksize=1048576), crc32c],
    index [bytes, crc32c]`. Readers compare it with the manifest, so a zarr.json whose chain was
    changed (e.g. to gzip) is refused before a chunk is decoded. Caches written before genrecal
    added the inner crc32c have the same text without it."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    def one(c: Any) -> str:
        if isinstance(c, BytesCodec):
            return "bytes"
        if isinstance(c, BloscCodec):
            return (f"blosc(cname={c.cname.value}, clevel={c.clevel}, shuffle={c.shuffle.value}, "
                    f"blocksize={c.blocksize})")
        if isinstance(c, ZstdCodec):
            return f"zstd(level={c.level})"
        if isinstance(c, Crc32cCodec):
            return "crc32c"
        return json.dumps(c.to_dict(), separators=(",", ":"), sort_keys=False, default=str)

    codecs = array.metadata.codecs
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        sh = codecs[0]
        return (f"sharding_indexed[{', '.join(map(one, sh.codecs))}], "
                f"index [{', '.join(map(one, sh.index_codecs))}]")
    return ", ".join(map(one, codecs))


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even: bit-identical to torch's
    `.to(torch.bfloat16)` (NaN payloads aside; the writer rejects NaN and inf anyway)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (b >> 16) & np.uint32(1)
    lsb += np.uint32(0x7FFF)
    lsb += b
    lsb >>= 16
    return lsb.astype(np.uint16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of a float32).
    One pass: the shift casts to uint32 on the fly (~6x faster than astype, then shift)."""
    bits = np.asarray(bits)
    out = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


_CODECS = {
    "bf16": HiddenCodec("bf16", "bfloat16", "uint16", True,
                        "bfloat16 bits: lossless for bf16 teachers (float32 input: round to nearest even)",
                        compression=LZ4_BYTES),
    "fp8": HiddenCodec("fp8", "float8_e4m3fn", "float32", False,
                       "float8 e4m3 with a float32 scale per token (max|row|/448)", Fp8E4M3Codec(),
                       compression=ZSTD_BYTES),
    "ecq": HiddenCodec("ecq", "int8", "float32", False,
                       f"per token: {ECQ_OUTLIERS} largest values exact, the rest int8 multiples of "
                       f"{ECQ_STEP} x RMS, entropy-coded by zstd", EcqCodec(), compression=ZSTD_BYTES),
    "fp32": HiddenCodec("fp32", "float32", "float32", True, "float32, exact", compression=ZSTD_SHUFFLE),
}


def hidden_codec(name: str | HiddenCodec | None = None) -> HiddenCodec:
    """The codec called `name` (None: the default, bf16; the old hidden_dtype names 'bfloat16' and 'float32'
    also work). A codec is returned as it is: resolved once where a run starts, it is passed down whole."""
    if isinstance(name, HiddenCodec):
        return name
    name = DEFAULT_HIDDEN_CODEC if name is None else name
    key = LEGACY_NAMES.get(name, name)
    if key not in _CODECS:
        raise ValueError(f"unknown hidden codec {name!r}: choose one of {', '.join(HIDDEN_CODECS)}")
    return _CODECS[key]


def resolve_hidden_codec(name: str | None, hidden_dtype: str | None = None) -> HiddenCodec:
    """The codec from `--hidden-codec`, or from `--hidden-dtype`, its old CLI name; both given must agree."""
    if name is not None and hidden_dtype is not None:
        a, b = hidden_codec(name), hidden_codec(hidden_dtype)
        if a.name != b.name:
            raise ValueError(f"hidden_codec={name!r} and hidden_dtype={hidden_dtype!r} disagree; "
                             f"hidden_dtype is the old name of the option: pass only hidden_codec")
        return a
    if hidden_dtype is not None and hidden_dtype not in LEGACY_NAMES:
        raise ValueError(f"hidden_dtype must be 'bfloat16' or 'float32', got {hidden_dtype!r} (other storages: "
                         f"hidden_codec='fp8' or 'ecq')")
    return hidden_codec(name or hidden_dtype)


def ecq_variant(step: float = ECQ_STEP, outliers: int = ECQ_OUTLIERS) -> HiddenCodec:
    """An `ecq` with other parameters (for measuring; caches written by genrecal use the default)."""
    return HiddenCodec(f"ecq[step={step:g},k={outliers}]", "int8", "float32", False, "ecq variant",
                       EcqCodec(step=step, outliers=outliers), compression=ZSTD_BYTES)
