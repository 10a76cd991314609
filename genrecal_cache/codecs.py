"""Hidden-state codecs: how `features.zarr/hidden [T, d]` is stored, chosen at extract time.

| codec  | zarr dtype         | chain inside each shard                      | bytes/token before blosc  | decoded value                     |
|--------|--------------------|----------------------------------------------|---------------------------|-----------------------------------|
| `fp32` | float32            | bytes, blosc(zstd-1, byte shuffle)           | 4d                        | exact                             |
| `bf16` | uint16 (bf16 bits) | bytes, blosc(zstd-1, byte shuffle, 1 MiB)    | 2d                        | exact bf16 (default, lossless)    |
| `fp8`  | float32            | genrecal.fp8_e4m3, blosc(zstd-1)             | d + 4                     | fp8 e4m3 x per-token scale        |
| `q4`   | float32            | genrecal.q4, blosc(zstd-1)                   | d/2 + 2 ceil(d/32) (+2d/chunk) | 4-bit, groups of 32, per-group fp16 scale, per-chunk channel equalisation |

`fp8` and `q4` are Zarr v3 array->bytes codecs (`Fp8E4M3Codec`, `Q4Codec`) registered with zarr on
`import genrecal_cache` and through the `zarr.codecs` entry point, so `zarr.open_array` on a cache
returns decoded float32 wherever genrecal is installed. The same transforms are also numcodecs
codecs (`genrecal_fp8_e4m3`, `genrecal_q4`, entry point `numcodecs.codecs`). Their payload is
self-describing (a 32-byte header: magic, kind, version, rows, cols, group, levels, flags), so a
chunk decodes without the array metadata.

Error bounds (per element, float32 input x, decoded x^):
- `bf16`: |x - x^| <= 2^-8 |x| (round to nearest even); bit-exact for bf16 input.
- `fp8`:  |x - x^| <= max(2^-4 |x|, 2^-10 s) with s = max|row| / 448 (the token's scale, float32).
- `q4`:   |x - x^| <= c_j s_g / 2 with c_j the channel's stored fp16 equalisation scale (RMS of channel j
          over the chunk's rows) and s_g >= max_group |x / c| / 7 the group's stored fp16 scale
          (rounded up, so no value is clipped). Values are rounded to the nearest of 15 levels -7..7.
`error_bound(codec, x)` returns these bounds per element; tests check them.

Why these (measured by `bench/storage.py --candidates`, numbers in docs/benchmarks.md): fp8 e4m3's
relative error does not depend on the magnitude within 2^-6..1 of the token's maximum, so one
scale per token is enough even with outlier channels; it costs 0.50x of bf16. For 4 bits, real
post-norm states have a few huge, fixed channels and lognormal per-channel scales: per-group
scaling alone lets one outlier zero its 31 group neighbours. Dividing by a per-chunk channel RMS
first (SmoothQuant-style equalisation, d fp16 scales per chunk of hundreds of tokens) removes that,
and uniform int4 levels then beat NF4's normal-quantile levels on these heavy-tailed groups.
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration

FP8_NAME = "genrecal.fp8_e4m3"
Q4_NAME = "genrecal.q4"

HIDDEN_CODECS = ("bf16", "fp8", "q4", "fp32")
DEFAULT_HIDDEN_CODEC = "bf16"
# names of the old `hidden_dtype` option, still accepted everywhere a codec is
LEGACY_NAMES = {"bfloat16": "bf16", "float32": "fp32"}

# ---- payload header ---------------------------------------------------------------------------------
MAGIC = b"GRHQ"
HEADER = struct.Struct("<4sBBBBIIHH12x")  # magic, kind, version, levels, flags, rows, cols, group, outliers
assert HEADER.size == 32
KIND_FP8, KIND_Q4 = 1, 2
VERSION = 1
LEVELS = {"int4": 0, "nf4": 1}
FLAG_EQUALIZE = 1

FP8_MAX = 448.0  # largest finite float8 e4m3fn


class CodecError(ValueError):
    """A payload that is not a genrecal hidden-state chunk, or input a codec cannot encode."""


def _header(payload: np.ndarray) -> tuple[int, int, int, int, int, int, int]:
    if payload.nbytes < HEADER.size:
        raise CodecError(f"genrecal hidden codec: payload of {payload.nbytes} bytes is shorter than its header")
    magic, kind, version, levels, flags, rows, cols, group, k = HEADER.unpack(payload[:HEADER.size].tobytes())
    if magic != MAGIC:
        raise CodecError(f"genrecal hidden codec: bad magic {magic!r} (expected {MAGIC!r}); not a genrecal chunk")
    if version != VERSION:
        raise CodecError(f"genrecal hidden codec: payload version {version}, this genrecal decodes version {VERSION}; "
                         f"upgrade genrecal")
    return kind, levels, flags, rows, cols, group, k


def _as_rows(x: np.ndarray) -> np.ndarray:
    """float32 [..., d] -> C-contiguous [rows, d]; refuses other dtypes and non-finite values."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise CodecError(f"genrecal hidden codecs encode float32, got {x.dtype}")
    if x.ndim == 0:
        raise CodecError("genrecal hidden codecs encode arrays with at least one dimension")
    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x)
    if not np.isfinite(x).all():
        raise CodecError("genrecal hidden codecs: input contains NaN or inf")
    return x


# ---- fp8 e4m3 with one float32 scale per row ------------------------------------------------------------

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

    Equal to torch's `y.to(torch.float8_e4m3fn)` for that range (tested exhaustively).
    """
    y = np.asarray(y, dtype=np.float32)
    bits = y.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    a = bits & np.uint32(0x7FFFFFFF)
    # normal range (|y| >= 2^-6): drop 20 of float32's 23 mantissa bits with round-half-to-even; a carry
    # out of the mantissa moves into the exponent, which is what rounding up to the next binade means
    r = (a + np.uint32(0x7FFFF) + ((a >> 20) & np.uint32(1))) >> 20
    normal = (r - np.uint32((127 - 7) << 3)).astype(np.uint8)  # rebias the exponent: 127 -> 7
    # subnormals (|y| < 2^-6): multiples of 2^-9, rint is half-to-even; 2^-6 itself gives code 8 (= normal 2^-6)
    sub = np.rint(np.abs(y) * np.float32(512)).astype(np.uint8)
    code = np.where(a < np.uint32(0x3C800000), sub, normal)  # 0x3c800000 = 2^-6
    return code | sign


def fp8_encode(x: np.ndarray) -> np.ndarray:
    """float32 [..., d] -> payload (uint8): header, then per row [float32 scale][d e4m3 codes].

    scale = max|row| / 448 (1 for an all-zero row), so each token uses fp8's full range.
    """
    x = _as_rows(x)
    rows, cols = x.shape
    amax = np.abs(x).max(axis=1) if cols else np.zeros(rows, np.float32)
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    # rows whose amax is subnormal-small would overflow 1/scale: they round to zero codes either way
    inv = np.where(scale > np.float32(1e-30), np.float32(1) / scale, np.float32(0)).astype(np.float32)
    y = np.clip(x * inv[:, None], -FP8_MAX, FP8_MAX)
    out = np.empty(HEADER.size + rows * (4 + cols), dtype=np.uint8)
    out[:HEADER.size] = np.frombuffer(HEADER.pack(MAGIC, KIND_FP8, VERSION, 0, 0, rows, cols, 0, 0), np.uint8)
    body = out[HEADER.size:].reshape(rows, 4 + cols)
    body[:, :4] = scale.view(np.uint8).reshape(rows, 4)
    body[:, 4:] = float32_to_e4m3(y)
    return out


def _fp8_decode(payload: np.ndarray, rows: int, cols: int) -> np.ndarray:
    body = payload[HEADER.size:]
    if body.size != rows * (4 + cols):
        raise CodecError(f"genrecal fp8 chunk: {body.size} body bytes, expected {rows} x (4 + {cols}); truncated?")
    body = body.reshape(rows, 4 + cols)
    scale = np.ascontiguousarray(body[:, :4]).view(np.float32)  # [rows, 1]
    out = E4M3_TABLE.take(body[:, 4:])
    out *= scale
    return out


def fp8_error_bound(x: np.ndarray) -> np.ndarray:
    x = _as_rows(x)
    amax = np.abs(x).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), 1)
    return np.maximum(np.abs(x) * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)


# ---- 4-bit groups with per-group fp16 scales (+ per-chunk channel equalisation) ---------------------------

# NF4 (QLoRA): 16 quantiles of N(0, 1) normalised to [-1, 1]; here only as a measured alternative
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0], dtype=np.float32)
INT4_LEVELS = np.concatenate([[0.0], np.arange(-7, 8)]).astype(np.float32)  # code 0 unused; code q + 8 = q
_LEVEL_TABLES = {0: INT4_LEVELS, 1: NF4_LEVELS}
_QMAX = {0: 7.0, 1: 1.0}  # a group's scale maps its largest |value| to this level
_NF4_MIDPOINTS = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).astype(np.float32)
_F16_MAX = float(np.finfo(np.float16).max)
_F16_TINY = float(np.finfo(np.float16).tiny)


def _pair_table(levels: np.ndarray) -> np.ndarray:
    """[256, 2] float32: the two values a packed byte holds (low nibble first)."""
    b = np.arange(256)
    return np.stack([levels[b & 0xF], levels[b >> 4]], axis=1).astype(np.float32)


_PAIR_TABLES = {k: _pair_table(v) for k, v in _LEVEL_TABLES.items()}


def _q4_geometry(cols: int, group: int) -> tuple[int, int]:
    groups = -(-cols // group) if cols else 0
    return groups, groups * group  # number of groups, padded width


def _channel_scales(x: np.ndarray) -> np.ndarray:
    """fp16 RMS of each column over the rows (1 where a column is all zero)."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=0)) if x.shape[0] else np.ones(x.shape[1])
    rms = np.clip(rms, _F16_TINY, _F16_MAX)
    c = rms.astype(np.float16)
    c[~(c > 0)] = 1
    return c


def _group_scales(amax: np.ndarray, qmax: float) -> np.ndarray:
    """fp16 scales with scale * qmax >= amax (rounded up), so no value is ever clipped."""
    want = amax / qmax
    if float(want.max(initial=0.0)) > _F16_MAX:
        raise CodecError("genrecal q4: a group's values exceed the fp16 scale range (|x / channel scale| > 4.5e5)")
    s = want.astype(np.float16)
    low = s.astype(np.float32) < want
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    return s


def q4_encode(x: np.ndarray, group: int = 32, levels: str = "int4", outliers: int = 8,
              equalize: bool = False) -> np.ndarray:
    """float32 [..., d] -> payload: header, [d fp16 channel scales if equalize], then per row
    [G fp16 group scales][k uint16 outlier columns][k float32 outlier values][G*group/2 bytes of
    4-bit codes, low nibble first], G = ceil(d / group), k = min(outliers, d).

    The k largest |values| of each row are kept exactly (sparse part) and zeroed in the dense part,
    which is then quantised in groups: int4 rounds x/s to -7..7 with s = max|group|/7 (fp16, rounded
    up so nothing clips); nf4 rounds x/s to the nearest NF4 level with s = max|group|."""
    if levels not in LEVELS:
        raise CodecError(f"genrecal q4: levels must be one of {sorted(LEVELS)}, got {levels!r}")
    if group < 2 or group % 2 or group > 0xFFFF:
        raise CodecError(f"genrecal q4: group must be an even number in [2, 65534], got {group}")
    x = _as_rows(x)
    rows, cols = x.shape
    k = min(outliers, cols)
    if k and cols > 0xFFFF:
        raise CodecError(f"genrecal q4: outlier columns are uint16, so rows of {cols} > 65535 values need outliers=0")
    if not 0 <= outliers <= 0xFFFF:
        raise CodecError(f"genrecal q4: outliers must be in [0, 65535], got {outliers}")
    lv = LEVELS[levels]
    groups, width = _q4_geometry(cols, group)
    flags = FLAG_EQUALIZE if equalize else 0
    parts = [np.frombuffer(HEADER.pack(MAGIC, KIND_Q4, VERSION, lv, flags, rows, cols, group, k), np.uint8)]
    xp = np.zeros((rows, width), np.float32)
    xp[:, :cols] = x
    if k:
        idx = np.sort(np.argpartition(-np.abs(x), k - 1, axis=1)[:, :k], axis=1).astype(np.uint16)
        vals = np.take_along_axis(x, idx.astype(np.intp), axis=1)
        np.put_along_axis(xp, idx.astype(np.intp), 0, axis=1)
    if equalize:
        c = _channel_scales(xp[:, :cols])
        parts.append(c.view(np.uint8))
        xp[:, :cols] /= c.astype(np.float32)
    xg = xp.reshape(rows, groups, group)
    s16 = _group_scales(np.abs(xg).max(axis=2), _QMAX[lv])
    s = s16.astype(np.float32)
    inv = np.divide(1, s, out=np.zeros_like(s), where=s > 0)
    y = xg * inv[:, :, None]
    if lv == 0:
        codes = (np.clip(np.rint(y), -7, 7) + 8).astype(np.uint8)
    else:
        codes = np.searchsorted(_NF4_MIDPOINTS, y).astype(np.uint8)
    codes = codes.reshape(rows, width)
    body = np.empty((rows, 2 * groups + 6 * k + width // 2), np.uint8)
    body[:, :2 * groups] = s16.view(np.uint8).reshape(rows, 2 * groups)
    o = 2 * groups
    if k:
        body[:, o:o + 2 * k] = idx.view(np.uint8).reshape(rows, 2 * k)
        body[:, o + 2 * k:o + 6 * k] = np.ascontiguousarray(vals).view(np.uint8).reshape(rows, 4 * k)
    body[:, o + 6 * k:] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    parts.append(body.reshape(-1))
    return np.concatenate(parts)


def _q4_decode(payload: np.ndarray, levels: int, flags: int, rows: int, cols: int, group: int, k: int) -> np.ndarray:
    if levels not in _LEVEL_TABLES or group < 2 or group % 2 or k > cols:
        raise CodecError(f"genrecal q4 chunk: unknown levels {levels}, bad group {group} or {k} outliers for {cols} cols")
    groups, width = _q4_geometry(cols, group)
    off = HEADER.size
    c = None
    if flags & FLAG_EQUALIZE:
        c = np.frombuffer(payload[off:off + 2 * cols].tobytes(), np.float16).astype(np.float32)
        off += 2 * cols
    stride = 2 * groups + 6 * k + width // 2
    body = payload[off:]
    if body.size != rows * stride or c is not None and c.size != cols:
        raise CodecError(f"genrecal q4 chunk: {payload.size} bytes do not fit {rows} rows x {cols} cols; truncated?")
    body = body.reshape(rows, stride)
    s = np.ascontiguousarray(body[:, :2 * groups]).view(np.float16).astype(np.float32)  # [rows, groups]
    o = 2 * groups
    vals = _PAIR_TABLES[levels].take(body[:, o + 6 * k:], axis=0)  # [rows, width/2, 2]
    vals = vals.reshape(rows, groups, group)
    vals *= s[:, :, None]
    out = vals.reshape(rows, width)
    if width != cols:
        out = np.ascontiguousarray(out[:, :cols])
    if c is not None:
        out *= c
    if k:
        idx = np.ascontiguousarray(body[:, o:o + 2 * k]).view(np.uint16).astype(np.intp)
        if idx.size and int(idx.max()) >= cols:
            raise CodecError(f"genrecal q4 chunk: outlier column {int(idx.max())} outside {cols} columns; corrupt")
        np.put_along_axis(out, idx, np.ascontiguousarray(body[:, o + 2 * k:o + 6 * k]).view(np.float32), axis=1)
    return out


def q4_error_bound(x: np.ndarray, group: int = 32, levels: str = "int4", outliers: int = 8,
                   equalize: bool = False) -> np.ndarray:
    """Per element: 0 for a row's k kept outliers, else half the group's quantisation step
    (int4: c_j s_g / 2; nf4: c_j s_g * max NF4 gap / 2), c_j = 1 without equalisation."""
    x = _as_rows(x)
    rows, cols = x.shape
    k, lv = min(outliers, cols), LEVELS[levels]
    groups, width = _q4_geometry(cols, group)
    xp = np.zeros((rows, width), np.float32)
    xp[:, :cols] = x
    if k:
        idx = np.argpartition(-np.abs(x), k - 1, axis=1)[:, :k]
        np.put_along_axis(xp, idx, 0, axis=1)
    c = _channel_scales(xp[:, :cols]).astype(np.float32) if equalize else np.ones(cols, np.float32)
    xp[:, :cols] /= c
    s = _group_scales(np.abs(xp.reshape(rows, groups, group)).max(axis=2), _QMAX[lv]).astype(np.float32)
    half_gap = 0.5 if lv == 0 else float(np.max(np.diff(NF4_LEVELS))) / 2
    bound = np.repeat(s, group, axis=1)[:, :cols] * half_gap * c * (1 + 1e-5) + np.abs(x) * 1e-6
    if k:
        np.put_along_axis(bound, idx, 0, axis=1)
    return bound


# ---- payload dispatch ---------------------------------------------------------------------------------

def decode_payload(payload: Any) -> np.ndarray:
    """Any genrecal fp8/q4 payload -> float32 [rows, cols] (what it describes in its header)."""
    p = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload.view(np.uint8).reshape(-1)
    kind, levels, flags, rows, cols, group, k = _header(p)
    if kind == KIND_FP8:
        return _fp8_decode(p, rows, cols)
    if kind == KIND_Q4:
        return _q4_decode(p, levels, flags, rows, cols, group, k)
    raise CodecError(f"genrecal hidden codec: unknown payload kind {kind}; upgrade genrecal")


# ---- Zarr v3 codecs -------------------------------------------------------------------------------------

class _HiddenArrayBytesCodec(ArrayBytesCodec):
    """float32 chunk [..., d] <-> self-describing bytes. Subclasses set `name` and `_encode_rows`."""

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

    def _encode_rows(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        out = decode_payload(chunk_bytes.as_numpy_array())
        if out.size != math.prod(chunk_spec.shape):
            raise CodecError(f"codec {self.name}: chunk decodes to {list(out.shape)} but the array's chunk is "
                             f"{list(chunk_spec.shape)}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out.reshape(chunk_spec.shape))

    def _encode_sync(self, chunk_array: Any, chunk_spec: Any) -> Any:
        return chunk_spec.prototype.buffer.from_array_like(self._encode_rows(chunk_array.as_numpy_array()))

    async def _decode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: Any, chunk_spec: Any) -> Any:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)


@dataclass(frozen=True)
class Fp8E4M3Codec(_HiddenArrayBytesCodec):
    """float8 e4m3 with one float32 scale (max|row| / 448) per row (token), stored with the row."""

    name = FP8_NAME

    def _encode_rows(self, x: np.ndarray) -> np.ndarray:
        return fp8_encode(x)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: Any) -> int:
        cols = chunk_spec.shape[-1]
        rows = math.prod(chunk_spec.shape[:-1])
        return HEADER.size + rows * (4 + cols)


@dataclass(frozen=True)
class Q4Codec(_HiddenArrayBytesCodec):
    """4-bit codes in groups of `group` values per row with an fp16 scale each, after keeping each
    row's `outliers` largest |values| exactly; `levels` int4 (-7..7) or nf4; `equalize` divides each
    column by its fp16 RMS over the chunk first (measured: it does not pay, see the module docstring)."""

    name = Q4_NAME
    group: int = 32
    levels: str = "int4"
    outliers: int = 8
    equalize: bool = False

    def __post_init__(self) -> None:
        if (self.levels not in LEVELS or not isinstance(self.group, int) or self.group < 2 or self.group % 2
                or not isinstance(self.outliers, int) or not 0 <= self.outliers <= 0xFFFF):
            raise ValueError(f"codec {Q4_NAME}: group must be an even integer >= 2, outliers in [0, 65535] and "
                             f"levels one of {sorted(LEVELS)}; got group={self.group!r}, outliers={self.outliers!r}, "
                             f"levels={self.levels!r}")

    def _config(self) -> dict[str, Any]:
        return {"group": self.group, "levels": self.levels, "outliers": self.outliers, "equalize": self.equalize}

    def _encode_rows(self, x: np.ndarray) -> np.ndarray:
        return q4_encode(x, self.group, self.levels, self.outliers, self.equalize)

    def encoded_size(self, rows: int, cols: int) -> int:
        groups, width = _q4_geometry(cols, self.group)
        k = min(self.outliers, cols)
        return HEADER.size + (2 * cols if self.equalize else 0) + rows * (2 * groups + 6 * k + width // 2)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: Any) -> int:
        return self.encoded_size(math.prod(chunk_spec.shape[:-1]), chunk_spec.shape[-1])

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        return q4_error_bound(x, self.group, self.levels, self.outliers, self.equalize)


# ---- numcodecs codecs (same payloads; for zarr v2 arrays and plain numcodecs users) -------------------------

def _numcodecs_classes() -> tuple[type, type]:
    from numcodecs.abc import Codec as NCodec
    from numcodecs.compat import ensure_contiguous_ndarray, ndarray_copy

    class NumcodecsFp8E4M3(NCodec):
        """numcodecs form of `Fp8E4M3Codec` (id `genrecal_fp8_e4m3`)."""
        codec_id = "genrecal_fp8_e4m3"

        def encode(self, buf: Any) -> bytes:
            return fp8_encode(np.asarray(buf)).tobytes()

        def decode(self, buf: Any, out: Any = None) -> Any:
            arr = decode_payload(ensure_contiguous_ndarray(buf).view(np.uint8))
            return ndarray_copy(arr, out) if out is not None else arr

    class NumcodecsQ4(NCodec):
        """numcodecs form of `Q4Codec` (id `genrecal_q4`)."""
        codec_id = "genrecal_q4"

        def __init__(self, group: int = 32, levels: str = "int4", outliers: int = 8, equalize: bool = False) -> None:
            Q4Codec(group=group, levels=levels, outliers=outliers, equalize=equalize)  # validates
            self.group, self.levels, self.outliers, self.equalize = group, levels, outliers, equalize

        def encode(self, buf: Any) -> bytes:
            return q4_encode(np.asarray(buf), self.group, self.levels, self.outliers, self.equalize).tobytes()

        def decode(self, buf: Any, out: Any = None) -> Any:
            arr = decode_payload(ensure_contiguous_ndarray(buf).view(np.uint8))
            return ndarray_copy(arr, out) if out is not None else arr

    return NumcodecsFp8E4M3, NumcodecsQ4


NumcodecsFp8E4M3, NumcodecsQ4 = _numcodecs_classes()


_registered = False


def register() -> None:
    """Register the codecs with zarr (v3 names) and numcodecs (ids). Idempotent; runs on
    `import genrecal_cache`, and zarr/numcodecs also find them through entry points."""
    global _registered
    if _registered:
        return
    import numcodecs
    from zarr.registry import register_codec

    register_codec(FP8_NAME, Fp8E4M3Codec)
    register_codec(Q4_NAME, Q4Codec)
    numcodecs.register_codec(NumcodecsFp8E4M3)
    numcodecs.register_codec(NumcodecsQ4)
    _registered = True


# ---- the hidden codecs as the writer/reader/plan use them ------------------------------------------------

@dataclass(frozen=True)
class HiddenCodec:
    """How one `--hidden-codec` choice stores `hidden`: zarr dtype, chain, manifest text, sizes, bounds."""
    name: str                  # "bf16" | "fp8" | "q4" | "fp32"
    logical_dtype: str         # manifest arrays.hidden.dtype
    stored_dtype: str          # the zarr array's data type
    lossless: bool
    description: str
    quantizer: _HiddenArrayBytesCodec | None = None  # the genrecal zarr codec (fp8, q4), else None

    def serializer(self) -> Any:
        """The array->bytes codec of the chain (zarr's `bytes` for bf16/fp32)."""
        from zarr.codecs import BytesCodec
        return self.quantizer if self.quantizer is not None else BytesCodec()

    def compressor(self) -> Any:
        from zarr.codecs import BloscCodec
        return BloscCodec(typesize=self.blosc_typesize, **self.blosc)

    @property
    def blosc(self) -> dict[str, Any]:
        # bf16/fp32: byte shuffle separates the compressible sign/exponent bytes from mantissa noise.
        # fp8/q4 payloads are bytes (one value or two nibbles each): shuffling does nothing.
        shuffle = "noshuffle" if self.quantizer is not None else "shuffle"
        return dict(cname="zstd", clevel=1, shuffle=shuffle, blocksize=1 << 20)

    @property
    def blosc_typesize(self) -> int:
        return 1 if self.quantizer is not None else np.dtype(self.stored_dtype).itemsize

    @property
    def attributes(self) -> dict[str, Any]:
        """zarr attributes of `hidden` (bf16 bits need one to be read as numbers)."""
        return {"genrecal_encoding": "bfloat16"} if self.name == "bf16" else {}

    def chain_text(self) -> str:
        """The codec chain as the manifest records it (arrays.hidden.codec)."""
        ser = "bytes" if self.quantizer is None else json_compact(self.quantizer.to_dict())
        b = self.blosc
        return (f"sharding_indexed[{ser}, blosc(cname={b['cname']}, clevel={b['clevel']}, shuffle={b['shuffle']}, "
                f"blocksize={b['blocksize']})], index [bytes, crc32c]")

    def encoded_bytes(self, rows: int, cols: int) -> int:
        """Exact bytes of one inner chunk of `rows` tokens before blosc."""
        if isinstance(self.quantizer, Q4Codec):
            return self.quantizer.encoded_size(rows, cols)
        if isinstance(self.quantizer, Fp8E4M3Codec):
            return HEADER.size + rows * (4 + cols)
        return rows * cols * np.dtype(self.stored_dtype).itemsize

    def row_bytes(self, cols: int) -> float:
        """Bytes per token before compression, leaving out per-chunk headers."""
        return (self.encoded_bytes(1 << 20, cols) - self.encoded_bytes(0, cols)) / (1 << 20)

    def to_stored(self, h: Any) -> np.ndarray:
        """Float hidden states (torch tensor on any device, or numpy) -> an owned numpy array in the
        zarr dtype: bf16 bits (torch's round-to-nearest-even cast, done on the tensor's own device so
        a GPU batch crosses to the host at half size), else float32 (fp8/q4 quantise later, in the
        writer thread, inside zarr's codec pipeline)."""
        import torch

        t = h.detach() if isinstance(h, torch.Tensor) else torch.from_numpy(np.asarray(h))
        if not t.is_floating_point():
            raise ValueError(f"hidden must be floating point, got {t.dtype}")
        if self.name == "bf16":
            return t.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16).copy()
        return t.to(torch.float32).cpu().numpy().copy()

    def finite(self, stored: np.ndarray) -> bool:
        """Whether a `to_stored` result holds only finite values (checked on numpy: torch.isfinite
        is ~30x slower on CPU). A value beyond bf16's range is inf there, as wrong as a NaN."""
        if self.name == "bf16":
            return not bool(((stored & 0x7F80) == 0x7F80).any())  # exponent all ones: inf or NaN
        return bool(np.isfinite(stored).all())

    def to_float32(self, stored: np.ndarray) -> np.ndarray:
        """What zarr returns for `hidden` -> float32 values (a new array; zarr decodes fp8/q4 itself)."""
        if self.name == "bf16":
            return bf16_bits_to_float32(stored)
        return np.array(stored, dtype=np.float32, copy=True)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """Per-element bound on |x - decode(encode(x))| for float32 input x [..., d] (one chunk)."""
        x32 = _as_rows(np.asarray(x, np.float32))
        if self.name == "fp32":
            return np.zeros_like(x32)
        if self.name == "bf16":
            return np.abs(x32) * 2.0 ** -8
        if isinstance(self.quantizer, Fp8E4M3Codec):
            return fp8_error_bound(x32)
        return self.quantizer.error_bound(x32)

    def round_trip(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, d] -> what a cache with this codec returns for it (as one chunk)."""
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        if self.name == "fp32":
            return x32.copy()
        if self.name == "bf16":
            return bf16_bits_to_float32(self.to_stored(x32))
        return decode_payload(self.quantizer._encode_rows(x32)).reshape(x32.shape)


def json_compact(d: dict[str, Any]) -> str:
    import json
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bits -> float32 (exact: bf16 is the top half of a float32)."""
    bits = np.asarray(bits)
    out = np.zeros(bits.shape + (2,), dtype=np.uint16)  # little-endian: high half second
    out[..., 1] = bits
    return out.view(np.float32).reshape(bits.shape)


_CODECS = {
    "bf16": HiddenCodec("bf16", "bfloat16", "uint16", True,
                        "bfloat16 bits, lossless (bit-exact for bf16 teachers; 2^-8 relative for float32 ones)"),
    "fp32": HiddenCodec("fp32", "float32", "float32", True, "float32, exact"),
    "fp8": HiddenCodec("fp8", "float8_e4m3", "float32", False,
                       "float8 e4m3 with a float32 scale per token (max|row|/448)", Fp8E4M3Codec()),
    "q4": HiddenCodec("q4", "int4", "float32", False,
                      "int4 (-7..7) in groups of 32 with fp16 scales; each token's 8 largest |values| kept exactly",
                      Q4Codec()),
}


def q4_variant(group: int = 32, levels: str = "int4", outliers: int = 8, equalize: bool = False) -> HiddenCodec:
    """A `q4` with other parameters (for measuring alternatives; caches use the registered default)."""
    q = Q4Codec(group=group, levels=levels, outliers=outliers, equalize=equalize)
    label = f"q4[{levels} g{group} k{outliers}{' eq' if equalize else ''}]"
    return HiddenCodec(label, "int4" if levels == "int4" else "nf4", "float32", False, label, q)


def hidden_codec(name: str) -> HiddenCodec:
    """The codec called `name` (also accepts the old hidden_dtype names 'bfloat16' and 'float32')."""
    key = LEGACY_NAMES.get(name, name)
    if key not in _CODECS:
        raise ValueError(f"unknown hidden codec {name!r}: choose one of {', '.join(HIDDEN_CODECS)}")
    return _CODECS[key]
