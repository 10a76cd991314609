"""The cache manifest (`manifest.json`): what a cache holds, how it was made, and a checksum per file.

The manifest is written last, atomically: a cache directory without one is incomplete. Parsing is
strict (unknown version, missing or unknown keys, wrong types all raise `CacheFormatError`) because
a cache is shared between labs and a silently misread field would poison a training run. Anything a
writer wants to add without a format bump goes into `extra`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import IO, Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
HEAD_NAME = "teacher_head.safetensors"
FEATURES_NAME = "features.zarr"
SAMPLES_NAME = "samples.parquet"
ARRAY_NAMES = ("token_ids", "answer_mask", "hidden", "topk_ids", "topk_logprobs")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CacheFormatError(ValueError):
    """A cache (or one of its files) does not follow the genrecal cache format."""


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(f: IO[bytes], block_size: int = 8 << 20) -> str:
    """sha256 of a binary file object, read in blocks so large shards never sit in memory twice."""
    h = hashlib.sha256()
    while block := f.read(block_size):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


@dataclass
class TeacherInfo:
    id: str                      # hub id or local path of the teacher model
    revision: str | None         # commit / revision; None for a local checkpoint
    config_sha256: str           # sha256 of the teacher's config.json bytes
    model_type: str              # config.model_type, e.g. "qwen2_vl"


@dataclass
class ArraySpec:
    dtype: str                   # logical dtype: "int32", "bool", "float32", "bfloat16"
    stored_dtype: str            # Zarr dtype on disk ("uint16" for bfloat16 bits)
    shape_tail: list[int]        # shape after the token axis: [] , [hidden_size] or [topk]
    chunk_tokens: int            # inner-chunk length along the token axis
    shard_tokens: int            # shard (file) length along the token axis
    codec: str                   # human-readable codec chain, e.g. "sharding(blosc(zstd,1,shuffle))"


@dataclass
class Counts:
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
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format_version": d.pop("format_version"), **d}  # version first: readers look there first
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate; `source` (file path or URL) is named in every error."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheFormatError(f"{source}: not valid JSON ({e}); the file is corrupt or truncated") from e
        if not isinstance(raw, dict):
            raise CacheFormatError(f"{source}: expected a JSON object at the top level, got {type(raw).__name__}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheFormatError(
                f"{source}: field 'format_version' is {version!r}, this genrecal reads version {FORMAT_VERSION} "
                f"only; use the genrecal release that wrote the cache, or re-extract it")
        return _parse(cls, raw, source, "")


# -- strict parsing -------------------------------------------------------------------------------
# Field types are declared once in the dataclasses above; this checks a JSON object against them.

_NESTED: dict[str, type] = {"teacher": TeacherInfo, "counts": Counts}


def _fail(source: str, name: str, problem: str) -> CacheFormatError:
    return CacheFormatError(f"{source}: field '{name}' {problem}")


def _check_scalar(value: Any, kind: str, source: str, name: str) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "str|None": value is None or isinstance(value, str),
    }[kind]
    if not ok:
        raise _fail(source, name, f"must be {kind.replace('|None', ' or null')}, got {type(value).__name__} {value!r:.80}")
    return value


def _parse(cls: type, raw: dict, source: str, prefix: str) -> Any:
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in raw and not (cls is Manifest and n == "extra")]
    if missing:
        raise _fail(source, prefix + missing[0], "is missing")
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise _fail(source, prefix + unknown[0], "is unknown in format version 1 (extensions belong in 'extra')")
    out: dict[str, Any] = {}
    for f in fields(cls):
        name, value = prefix + f.name, raw.get(f.name)
        t = f.type if isinstance(f.type, str) else f.type.__name__
        if f.name == "extra" and cls is Manifest:
            value = {} if value is None else value
            if not isinstance(value, dict):
                raise _fail(source, name, f"must be an object, got {type(value).__name__}")
        elif f.name in _NESTED and cls is Manifest:
            if not isinstance(value, dict):
                raise _fail(source, name, f"must be an object, got {type(value).__name__}")
            value = _parse(_NESTED[f.name], value, source, name + ".")
        elif f.name == "arrays":
            if not isinstance(value, dict):
                raise _fail(source, name, f"must be an object, got {type(value).__name__}")
            value = {k: _parse(ArraySpec, v, source, f"{name}.{k}.") if isinstance(v, dict)
                     else _bad_obj(source, f"{name}.{k}", v) for k, v in value.items()}
        elif f.name == "checksums":
            if not isinstance(value, dict):
                raise _fail(source, name, f"must be an object, got {type(value).__name__}")
            for k, v in value.items():
                if not (isinstance(v, str) and _SHA256.match(v)):
                    raise _fail(source, f"{name}.{k}", f"must be a lowercase sha256 hex digest, got {v!r:.80}")
        elif f.name == "shape_tail":
            if not (isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                    for x in value)):
                raise _fail(source, name, f"must be a list of non-negative ints, got {value!r:.80}")
        elif t in ("int", "str", "str | None"):
            _check_scalar(value, t.replace(" | ", "|"), source, name)
            if t == "int" and value < 0:
                raise _fail(source, name, f"must be >= 0, got {value}")
        else:  # pragma: no cover - a dataclass field without a rule is a programming error
            raise TypeError(f"no validation rule for {cls.__name__}.{f.name} ({t})")
        out[f.name] = value
    return cls(**out)


def _bad_obj(source: str, name: str, value: Any) -> Any:
    raise _fail(source, name, f"must be an object, got {type(value).__name__}")
