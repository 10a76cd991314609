"""The cache manifest (`manifest.json`): what a cache holds, how it was made, and a checksum per file.

The manifest is written last, atomically: a cache directory without one is incomplete. Parsing is
strict (unknown version, missing keys, wrong types and unknown top-level keys all raise
`CacheFormatError` naming the file and the field) because a cache is shared between labs and a
silently misread field would poison a training run. Additions within a format version go into
`extra`; `teacher` may carry extra provenance keys (e.g. the extraction backend).

`extra.sizes` (optional, within version 2) gives each listed file's exact size in bytes next to its
sha256, so a reader caps every download or read of a file at that size. It lives in `extra` so that
older genrecal (which refuses unknown top-level keys) still reads the cache; caches without it are
read with the bounds their layout allows (format/safety.py `file_limit`).

Version 3 added `storage` (role-aware storage: which rows hold what, format/roles.py), the arrays
`row_flags` and (low-rank context) `context`, and the file `context_basis.safetensors`. Version 2 added `hidden_codec` (how `hidden` is stored: bf16, fp8, ecq or fp32; see
genrecal_cache/format/codecs.py). Version 1 manifests are still read: their codec follows from
`arrays.hidden.dtype` (bfloat16 -> bf16, float32 -> fp32).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import IO, Any, TypedDict

import numpy as np

from .codecs import HIDDEN_CODECS, LEGACY_NAMES, hidden_codec
from .roles import CONTEXT_CODEC, Storage, role_arrays

__all__ = ["ARRAY_NAMES", "ArraySpec", "BASIS_NAME", "BLOSC_MAX_OVERHEAD", "COMMITS_DIR", "CacheFormatError", "Counts",
           "FEATURES_NAME", "FORMAT_VERSION", "HEAD_NAME", "MANIFEST_NAME", "MAX_INT", "MAX_METADATA_BYTES",
           "MAX_SHARD_FILE_BYTES", "Manifest", "PROGRESS_NAME", "READABLE_VERSIONS", "SAMPLES_NAME", "SIZES_KEY",
           "TOKENIZER_DIR", "TeacherInfo", "answer_spans", "identity", "identity_diff", "layout_limit", "max_shard_bytes",
           "relpath_problem", "sha256_bytes", "sha256_file", "sha256_stream", "sha256_text"]

FORMAT_VERSION = 3               # what this genrecal writes
READABLE_VERSIONS = (1, 2, 3)    # what it reads
MANIFEST_NAME = "manifest.json"
HEAD_NAME = "teacher_head.safetensors"
BASIS_NAME = "context_basis.safetensors"  # low-rank context storage: mean [d], basis [r, d] (format/roles.py)
PROGRESS_NAME = "_progress.json"  # the journal of an extraction in progress (journal.py); no manifest yet
COMMITS_DIR = "_commits"
FEATURES_NAME = "features.zarr"
SAMPLES_NAME = "samples.parquet"
# the teacher's tokenizer files (tokenizer.json, tokenizer_config.json, chat template, ...): optional, listed
# in `checksums` like every file; caches written before it lack the folder (docs/cache-format.md)
TOKENIZER_DIR = "teacher_tokenizer"
ARRAY_NAMES = ("token_ids", "answer_mask", "hidden", "topk_ids", "topk_logprobs")  # every version


class CacheFormatError(ValueError):
    """A cache (or one of its files) does not follow the genrecal cache format."""


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(f: IO[bytes], block_size: int = 8 << 20) -> str:
    """sha256 of a binary file object, read in blocks so large shards never sit in memory whole."""
    h = hashlib.sha256()
    while block := f.read(block_size):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_text(text: str | None) -> str:
    """How a teacher's config, tokenizer and chat template are fingerprinted (None hashes as "")."""
    return hashlib.sha256((text or "").encode()).hexdigest()


class TeacherInfo(TypedDict):
    id: str                      # hub id or local path of the teacher model
    revision: str | None         # commit / revision; None when unknown
    config_sha256: str           # sha256 of the teacher's config
    model_type: str              # config.model_type, e.g. "qwen2_vl"


class ArraySpec(TypedDict):
    dtype: str                   # logical dtype: "int32", "bool", "float32", "bfloat16" (hidden: also
                                 # "float8_e4m3fn" for fp8, "int8" for ecq; both decode to float32)
    stored_dtype: str            # Zarr data type on disk ("uint16" for bfloat16 bits)
    shape_tail: list[int]        # shape after the token axis: [], [hidden_size] or [topk]
    chunk_tokens: int            # inner-chunk length along the token axis
    shard_tokens: int            # shard (file) length along the token axis
    codec: str                   # the codec chain, as text


class Counts(TypedDict):
    samples: int
    ok: int
    error: int
    tokens: int                  # T: length of every feature array's token axis
    answer_tokens: int           # number of True entries in answer_mask


@dataclass
class Manifest:
    created: str                 # ISO 8601 UTC time the cache was completed
    tool_version: str            # genrecal version that wrote it
    command: str                 # command line that produced it (provenance)
    teacher: TeacherInfo
    tokenizer_sha256: str
    chat_template_sha256: str | None  # None when the tokenizer has no chat template
    hidden_size: int
    vocab_size: int
    topk: int
    arrays: dict[str, ArraySpec]
    counts: Counts
    checksums: dict[str, str]    # path relative to the cache root -> sha256 hex, every stored file
    hidden_codec: str = "bf16"   # "bf16" | "fp8" | "ecq" | "fp32" (format version 2; derived for version 1)
    extra: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=lambda: Storage().as_dict())  # version 3 (roles.Storage)
    format_version: int = FORMAT_VERSION

    @property
    def roles(self) -> Storage:
        """How rows are stored by role; versions 1-2 store every row in full (`Storage()`)."""
        return Storage.from_dict(self.storage)

    @property
    def array_names(self) -> tuple[str, ...]:
        """The feature arrays this cache holds, in a fixed order."""
        if self.format_version < 3:
            return ARRAY_NAMES
        return ARRAY_NAMES + role_arrays(self.roles)

    @property
    def sizes(self) -> dict[str, int]:
        """Path -> exact size in bytes of the files `checksums` lists, from `extra.sizes` (validated by
        `from_json`); empty for caches written before sizes were recorded, partial never by genrecal."""
        return self.extra.get(SIZES_KEY) or {}

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format_version": d.pop("format_version"), **d}  # version first: readers look there first
        if self.format_version == 1:
            del d["hidden_codec"]  # a version-1 manifest read and written back stays version 1
        if self.format_version < 3:
            del d["storage"]
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate; `source` (file path or URL) is named in every error."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # recursion: absurdly deep nesting
            raise CacheFormatError(f"{source}: not valid JSON ({str(e)[:200]}); the file is corrupt or truncated") from e
        if not isinstance(raw, dict):
            raise CacheFormatError(f"{source}: expected a JSON object at the top level, got {type(raw).__name__}")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise CacheFormatError(
                f"{source}: field 'format_version' is {version!r}, this genrecal reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; use the genrecal release that wrote the cache (or a newer "
                f"one), or re-extract it")
        raw = {"extra": {}, **raw}
        schema = _MANIFEST
        if version < 3:
            schema = {k: v for k, v in _MANIFEST.items() if k != "storage" and (version > 1 or k != "hidden_codec")}
        _check_object(raw, schema, source, "", allow_extra=False)
        _check_object(raw["teacher"], _TEACHER, source, "teacher.", allow_extra=True)
        _check_object(raw["counts"], _COUNTS, source, "counts.", allow_extra=False)
        for name, spec in raw["arrays"].items():
            _check_object(spec, _ARRAY, source, f"arrays.{name}.", allow_extra=False)
        for path, digest in raw["checksums"].items():
            if not (isinstance(digest, str) and _SHA256.match(digest)):
                raise _fail(source, f"checksums.{path:.200}", f"must be a lowercase sha256 hex digest, got {digest!r:.80}")
            problem = relpath_problem(path)
            if problem or path == MANIFEST_NAME:
                # a manifest from an untrusted source must not name files outside the cache folder
                raise _fail(source, f"checksums.{path!r:.200}", f"is not a file of the cache: {problem or 'the manifest'}")
        _check_array_values(raw["arrays"], source)
        if version == 1:  # v1 knew two storages of hidden, told apart by its logical dtype
            dtype = raw["arrays"].get("hidden", {}).get("dtype")
            raw["hidden_codec"] = LEGACY_NAMES.get(dtype, f"unknown ({dtype})")
        if raw["hidden_codec"] not in HIDDEN_CODECS:
            raise _fail(source, "hidden_codec", f"is {raw['hidden_codec']!r}, this genrecal knows "
                        f"{', '.join(HIDDEN_CODECS)}; upgrade genrecal or re-extract the cache")
        if version == 3:
            _check_object(raw["storage"], _STORAGE, source, "storage.", allow_extra=False)
            try:
                Storage.from_dict(raw["storage"])
            except (ValueError, TypeError) as e:
                raise _fail(source, "storage", f"is invalid: {e}; upgrade genrecal or re-extract the cache") from None
        m = cls(**raw)
        _check_sizes(m, source)
        return m


# -- strict validation -----------------------------------------------------------------------------
# A schema maps each key to a kind: "int" (>= 0), "str", "str?" (str or null), "ints" (list of
# ints >= 0), "object" (any JSON object).

_MANIFEST = {"format_version": "int", "created": "str", "tool_version": "str", "command": "str", "teacher": "object",
             "tokenizer_sha256": "str", "chat_template_sha256": "str?", "hidden_size": "int", "vocab_size": "int",
             "topk": "int", "arrays": "object", "counts": "object", "checksums": "object", "hidden_codec": "str",
             "extra": "object", "storage": "object"}
assert set(_MANIFEST) == {f.name for f in fields(Manifest)}, "manifest schema and dataclass disagree"
_TEACHER = {"id": "str", "revision": "str?", "config_sha256": "str", "model_type": "str"}
_ARRAY = {"dtype": "str", "stored_dtype": "str", "shape_tail": "ints", "chunk_tokens": "int", "shard_tokens": "int",
          "codec": "str"}
_COUNTS = {k: "int" for k in Counts.__annotations__}
_STORAGE = {"context": "str", "rank": "int?", "topk_rows": "str", "image_token_ids": "ints"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


SIZES_KEY = "sizes"  # extra.sizes: path -> exact size in bytes (see the module doc)


def _check_sizes(m: Manifest, source: str) -> None:
    """`extra.sizes`, when present: an object naming only files `checksums` lists, each an integer number
    of bytes within what the cache's layout allows that file (`layout_limit`). A reader caps every
    read of a file at its listed size, so a hostile size must not raise a bound it would otherwise have."""
    sizes = m.extra.get(SIZES_KEY)
    if sizes is None:
        return
    if not isinstance(sizes, dict):
        raise _fail(source, f"extra.{SIZES_KEY}", f"must be an object (path -> bytes), got {type(sizes).__name__}")
    for rel, n in sizes.items():
        name = f"extra.{SIZES_KEY}.{rel:.200}"
        if rel not in m.checksums:
            raise _fail(source, name, "names a file that 'checksums' does not list; the manifest is corrupt or "
                        "hostile: re-download or re-extract the cache")
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise _fail(source, name, f"must be an integer number of bytes >= 0, got {type(n).__name__} {n!r:.80}; "
                        f"the manifest is corrupt or hostile: re-download or re-extract the cache")
        limit = layout_limit(rel, m)
        if n > limit:
            raise _fail(source, name, f"is {n!r:.40} bytes, beyond the {limit} bytes this cache's layout allows "
                        f"that file; the manifest is corrupt or hostile: re-download or re-extract the cache")


MAX_METADATA_BYTES = 1 << 20     # one zarr.json (genrecal's are ~1.5 KB)
MAX_SHARD_FILE_BYTES = 5 << 30   # one shard file, whatever its layout says
BLOSC_MAX_OVERHEAD = 64         # bytes a blosc frame adds to its data at most (c-blosc 16, blosc2 32)


def layout_limit(rel: str, m: Manifest | None) -> int:
    """Most bytes a file of a cache can hold whatever its manifest says of its size: metadata 1 MiB, a
    shard what the manifest's layout allows (`max_shard_bytes`, at most 5 GiB: readers refuse shards above
    4 GiB decoded), the head its float32 size, a tokenizer file 256 MiB, samples.parquet 1 TiB."""
    if rel.endswith("zarr.json"):
        return MAX_METADATA_BYTES
    if rel.startswith(f"{FEATURES_NAME}/"):
        name = rel.split("/")[1]
        return min(MAX_SHARD_FILE_BYTES, max_shard_bytes(m, name)) if m is not None and name in m.arrays \
            else MAX_SHARD_FILE_BYTES
    if rel == HEAD_NAME:
        return 4 * (m.vocab_size + 2) * m.hidden_size + (64 << 20)
    if rel == BASIS_NAME:  # mean [d] + basis [r, d] float32, and a header
        return 4 * ((m.roles.rank or 0) + 1) * m.hidden_size + (1 << 20)
    if rel.startswith(f"{TOKENIZER_DIR}/"):
        return 256 << 20  # a large tokenizer.json is tens of MiB
    return 1 << 40  # samples.parquet: text and images as given


def max_shard_bytes(m: Manifest, name: str) -> int:
    """Most bytes a shard file of array `name` can hold under the manifest's layout: each inner chunk's
    encoded bytes (blosc never stores more than those plus its header) and crc32c, then the shard
    index (16 bytes per chunk, crc32c). A genuine shard is smaller (compressed; empty chunks left out)."""
    spec = m.arrays[name]
    rows, cols = spec["chunk_tokens"], int(np.prod(spec["shape_tail"], dtype=np.int64))
    raw = (hidden_codec(m.hidden_codec).encoded_bytes(rows, cols) if name == "hidden"
           else CONTEXT_CODEC.encoded_bytes(rows, cols) if name == "context"
           else rows * cols * np.dtype(spec["stored_dtype"]).itemsize)
    n = -(-spec["shard_tokens"] // rows)
    return n * (raw + BLOSC_MAX_OVERHEAD + 4) + 16 * n + 4


def answer_spans(mask: Any) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D answer mask (numpy, torch or list): the `answer_spans` of samples.parquet."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], m, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def identity(m: Manifest) -> dict[str, Any]:
    """What decides whether two caches hold the same teacher's features in the same form: the one
    "same teacher and settings?" question (parts of one cache, a re-run over a finished cache)."""
    return {"teacher.id": m.teacher["id"], "teacher.config_sha256": m.teacher["config_sha256"],
            "teacher.model_type": m.teacher["model_type"], "tokenizer_sha256": m.tokenizer_sha256,
            "chat_template_sha256": m.chat_template_sha256, "hidden_codec": m.hidden_codec,
            "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "topk": m.topk,
            "head sha256": m.checksums.get(HEAD_NAME), "storage": m.storage}


def identity_diff(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for every key on which two identities differ, in key order."""
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _fail(source: str, name: str, problem: str) -> CacheFormatError:
    return CacheFormatError(f"{source}: field '{name}' {problem}")


MAX_INT = 2 ** 53  # no count, size or length in a real cache comes near this; larger ones are corrupt or hostile


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT


def relpath_problem(rel: Any) -> str | None:
    """Why `rel` is not a plain relative path inside a cache folder; None when it is one."""
    if not isinstance(rel, str) or not rel:
        return "an empty path"
    if len(rel) > 1024:
        return "a path longer than 1024 characters"
    if rel.startswith("/") or "\\" in rel or ":" in rel:
        return "absolute paths, backslashes, drive letters and URLs are refused"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "control characters are refused"
    if any(p in ("", ".", "..") for p in rel.split("/")):
        return "'..', '.' and empty path parts are refused"
    return None


def _check_array_values(arrays: dict[str, Any], source: str) -> None:
    """Values the reader computes with: known dtypes, shard/chunk lengths >= 1, at most 4 trailing dims."""
    codecs = [hidden_codec(name) for name in HIDDEN_CODECS]
    logical = {"int32", "bool", "float32", "bfloat16", "uint8", *(c.logical_dtype for c in codecs)}
    stored = {"int32", "bool", "uint16", "float32", "uint8", *(c.stored_dtype for c in codecs)}
    for name, spec in arrays.items():
        where = f"arrays.{name:.100}."
        if spec["dtype"] not in logical:
            raise _fail(source, where + "dtype", f"is {spec['dtype']!r:.80}, not one of {sorted(logical)}")
        if spec["stored_dtype"] not in stored:
            raise _fail(source, where + "stored_dtype", f"is {spec['stored_dtype']!r:.80}, not one of {sorted(stored)}")
        for key in ("chunk_tokens", "shard_tokens"):
            if spec[key] < 1:
                raise _fail(source, where + key, "must be >= 1")
        if len(spec["shape_tail"]) > 4:
            raise _fail(source, where + "shape_tail", f"has {len(spec['shape_tail'])} dimensions (at most 4)")


_KINDS = {
    "int": (_is_count, "an integer >= 0"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "int?": (lambda v: v is None or _is_count(v), "an integer >= 0 or null"),
    "ints": (lambda v: isinstance(v, list) and all(_is_count(x) for x in v), "a list of integers >= 0"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def _check_object(obj: Any, schema: dict[str, str], source: str, prefix: str, allow_extra: bool) -> None:
    if not isinstance(obj, dict):
        raise _fail(source, prefix.rstrip("."), f"must be an object, got {type(obj).__name__}")
    for key, kind in schema.items():
        if key not in obj:
            raise _fail(source, prefix + key, "is missing")
        ok, what = _KINDS[kind]
        if kind == "int" and isinstance(obj[key], int) and not isinstance(obj[key], bool) and obj[key] > MAX_INT:
            raise _fail(source, prefix + key, f"is {obj[key]!r:.40}, beyond any real cache (at most 2^53)")
        if not ok(obj[key]):
            raise _fail(source, prefix + key, f"must be {what}, got {type(obj[key]).__name__} {obj[key]!r:.80}")
    unknown = sorted(set(obj) - set(schema))
    if unknown and not allow_extra:
        raise _fail(source, prefix + unknown[0], "is unknown in this format version (additions belong in 'extra')")
