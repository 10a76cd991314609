"""The feature arrays of a cache, as the format defines them: their token-axis layout (shards and
inner chunks), their Zarr v3 codec chains and the `samples.parquet` schema (docs/cache-format.md).
The writer creates the arrays from here; `genrecal-cache plan` measures compression through them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .codecs import DEFAULT_HIDDEN_CODEC, HiddenCodec, describe_chain, hidden_codec as get_hidden_codec
from .manifest import ARRAY_NAMES, ArraySpec
from .roles import CONTEXT_CODEC, Storage, role_arrays

__all__ = ["Layout", "array_names", "MAX_SHARD_DECODED_BYTES", "ROW_GROUP_IMAGE_BYTES", "ROW_GROUP_ROWS", "SAMPLES_SCHEMA",
           "SMALL_CODEC", "TARGET_CHUNK_BYTES", "TARGET_SHARD_BYTES", "create_feature_arrays", "plan_layout"]

# Codec choice, measured on synthetic post-final-norm states (student-t per channel, lognormal
# norm weights, 6 outlier channels; bf16), one 4 MiB chunk, one core, numcodecs 0.16 (numbers
# and method in docs/cache-format.md):
#   d=8192 bf16:  zstd-1 1.25x (165 MB/s enc, 285 dec) | zstd-9 1.25x (47 enc)
#                 blosc-lz4 shuffle 1.05x | blosc-zstd-1 bitshuffle 1M 1.27x (346 enc, 754 dec)
#                 blosc-zstd-1 shuffle auto-block 1.25x | 256 KiB blocks 1.41x (184 enc, 743 dec)
#                 blosc-zstd-1 shuffle 1 MiB blocks 1.43x (206 enc, 1018 dec)  <- chosen
#                 blosc-zstd-5 shuffle 1.38x but 20 MB/s enc (too slow for extraction)
#   topk_ids int32:      zstd-1 1.44x, blosc-zstd-1 shuffle 1.69x, bitshuffle 1.76-1.80x  <- chosen
#   topk_logprobs f32:   zstd-1 1.20x, blosc-zstd-1 shuffle 1.35x, bitshuffle 1.41-1.45x  <- chosen
# Byte shuffle isolates the bf16 sign/exponent byte (compressible) from the mantissa byte (noise);
# bigger blosc blocks give zstd's entropy coder enough of that byte stream to pay off.
# The chain of `hidden` comes from its codec (genrecal_cache/format/codecs.py): fp32 the one above; bf16 the one
# above until issue 24, now lz4 without shuffle, which reads >= 0.8x of a raw read (bench/hidden_compressors.py).
SMALL_CODEC = dict(cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=1 << 20)

TARGET_CHUNK_BYTES = 4 << 20     # inner chunk: the unit of decompression and of partial reads
TARGET_SHARD_BYTES = 128 << 20   # shard: one file; large enough to keep file counts low
# A reader decodes a shard's worth of `hidden` per read group (float32 for fp8/ecq: 4x their stored
# size): cap that so the trainer's prefetch stays within a few hundred MB.
MAX_SHARD_DECODED_BYTES = 256 << 20
ROW_GROUP_ROWS = 256
# Readers fetch images a row group at a time; with big images, cutting groups at 16 MiB keeps a
# shuffled read of one shard's ~10-30 samples from pulling in far more image bytes than it uses.
ROW_GROUP_IMAGE_BYTES = 16 << 20


@dataclass(frozen=True)
class Layout:
    """Token-axis chunking of every array. All arrays share `shard_tokens`, so shard s holds
    tokens [s*S, (s+1)*S) in every array and a reader needs one shard per array per range."""
    shard_tokens: int
    chunk_tokens: dict[str, int]


def array_names(storage: Storage) -> tuple[str, ...]:
    """The feature arrays a cache written with `storage` holds (format version 3; Manifest.array_names)."""
    return ARRAY_NAMES + role_arrays(storage)


def plan_layout(hidden_size: int, topk: int, hidden_codec: HiddenCodec | str = DEFAULT_HIDDEN_CODEC, *,
                shard_tokens: int | None = None, chunk_tokens: int | None = None,
                storage: Storage = Storage()) -> Layout:
    """Shard/chunk lengths (tokens) from the bytes per token of `hidden`, which dominates the cache.

    Default: powers of two with hidden inner chunks <= 4 MiB (as encoded, before compression),
    shards <= 128 MiB, and at most 256 MiB of decoded `hidden` per shard (d=8192 bf16: 256-token
    chunks, 8192-token shards; d=3584 bf16: 512 / 16384; d=8192 fp8 or ecq: 256 / 8192).
    Smaller arrays get the largest inner chunk <= 4 MiB that divides the shard (often the whole
    shard). `hidden_codec`: the codec, or its name (the old names 'bfloat16' and 'float32' too).
    """
    codec = get_hidden_codec(hidden_codec)
    row = {"token_ids": 4, "answer_mask": 1, "hidden": max(1, math.ceil(codec.row_bytes(hidden_size))),
           "topk_ids": 4 * topk, "topk_logprobs": 4 * topk, "row_flags": 1,
           "context": math.ceil(CONTEXT_CODEC.row_bytes(storage.rank or 1))}
    decoded_row = hidden_size * np.dtype(codec.stored_dtype).itemsize
    pow2_floor = lambda n: 1 << max(0, int(n).bit_length() - 1)  # noqa: E731
    if chunk_tokens is None:
        chunk_tokens = pow2_floor(max(1, TARGET_CHUNK_BYTES // row["hidden"]))
        if shard_tokens is not None:  # must divide the requested shard: largest divisor not above it
            chunk_tokens = max(c for c in range(1, min(chunk_tokens, shard_tokens) + 1) if shard_tokens % c == 0)
    if shard_tokens is None:
        per_shard = min(TARGET_SHARD_BYTES // (chunk_tokens * row["hidden"]),
                        MAX_SHARD_DECODED_BYTES // (chunk_tokens * decoded_row))
        shard_tokens = chunk_tokens * pow2_floor(max(1, per_shard))
    if chunk_tokens < 1 or shard_tokens < 1 or shard_tokens % chunk_tokens:
        raise ValueError(f"shard_tokens ({shard_tokens}) must be a positive multiple of chunk_tokens ({chunk_tokens})")
    chunks = {}
    for name in array_names(storage):
        n = shard_tokens // chunk_tokens
        # multiples of the hidden chunk that divide the shard, largest within the byte budget
        fits = [chunk_tokens * j for j in range(1, n + 1) if n % j == 0 and chunk_tokens * j * row[name] <= TARGET_CHUNK_BYTES]
        chunks[name] = chunk_tokens if name == "hidden" else max(fits, default=chunk_tokens)
    return Layout(shard_tokens, chunks)


def create_feature_arrays(group: zarr.Group, layout: Layout, codec: HiddenCodec, hidden_size: int, topk: int,
                          storage: Storage = Storage()) -> tuple[dict[str, zarr.Array], dict[str, ArraySpec]]:
    """The empty feature arrays (token axis first, sharded, compressed) and their manifest specs: the five of
    every version, `row_flags` and, for low-rank context, `context` [T, r] (fp8 with a per-row scale).
    Used by the writer and by `estimate_cache_size`, so an estimate compresses exactly as a cache does."""
    stored = {"token_ids": ("int32", []), "answer_mask": ("bool", []), "hidden": (codec.stored_dtype, [hidden_size]),
              "topk_ids": ("int32", [topk]), "topk_logprobs": ("float32", [topk]), "row_flags": ("uint8", []),
              "context": (CONTEXT_CODEC.stored_dtype, [storage.rank or 1])}
    arrays, specs = {}, {}
    S = layout.shard_tokens
    for name in array_names(storage):
        dtype, tail = stored[name]
        c = layout.chunk_tokens[name]
        if name in ("hidden", "context"):
            ac = codec if name == "hidden" else CONTEXT_CODEC
            serializer, compressor, attributes = ac.serializer(), ac.compressor(), ac.attributes
            logical = ac.logical_dtype
        else:
            serializer, compressor, attributes = "auto", BloscCodec(typesize=np.dtype(dtype).itemsize, **SMALL_CODEC), {}
            logical = dtype
        arrays[name] = group.create_array(
            name, shape=(0, *tail), dtype=dtype, chunks=(c, *tail), shards=(S, *tail), serializer=serializer,
            # crc32c on every inner chunk: a reader notices a flipped byte as it reads (blosc has no checksum)
            compressors=(compressor, Crc32cCodec()), fill_value=0,
            dimension_names=("token", *(["hidden"] if name == "hidden" else ["rank"] if name == "context"
                                        else ["k"] if tail else [])),
            attributes=attributes,
            # every shard file exists even when all-zero (e.g. an answer_mask shard without answers),
            # so the set of files is a function of T alone and a missing one is always a fault
            config={"write_empty_chunks": True})
        specs[name] = ArraySpec(dtype=logical, stored_dtype=dtype, shape_tail=list(tail), chunk_tokens=c,
                                shard_tokens=S, codec=describe_chain(arrays[name]))
    return arrays, specs


SAMPLES_SCHEMA = pa.schema(
    [("index", pa.int64()), ("id", pa.string()), ("status", pa.string()), ("error", pa.string()),
     ("token_offset", pa.int64()), ("num_tokens", pa.int64()),
     ("answer_spans", pa.list_(pa.list_(pa.int64()))),  # [[start, end), ...] relative to the sample
     ("messages", pa.string()), ("images", pa.list_(pa.binary())), ("image_refs", pa.list_(pa.string())),
     ("extra", pa.string())],
    # the parquet's schema is the same in format versions 2 and 3 (version 3 changed the features only)
    metadata={"genrecal_format_version": "2"})
