"""Training samples: one conversation plus its images, read from LLaVA-style JSONL or Parquet.

Input formats (chosen by file suffix):

* ``.jsonl`` / ``.ndjson`` -- one JSON object per line, LLaVA style::

      {"id": "42", "image": "images/42.png",            # or a list of paths, or absent
       "conversations": [{"from": "human", "value": "<image>\\nWhat colour is it?"},
                         {"from": "gpt",   "value": "red"}]}

  Multi-turn conversations are allowed. ``"<image>"`` marks where each image goes (in user
  turns only); if a sample has images but no marker, the markers are prepended to the first
  user turn, as LLaVA does. Image paths are resolved against ``image_root`` (default: the
  JSONL's folder) and may not point outside it. Extra keys (e.g. ``"qtype"``) are ignored.
* ``.json`` -- the same objects in one JSON array (LLaVA's own release format).
* ``.parquet`` -- one row per sample, images embedded so the file is self-contained:

  =============  ==================================================================
  column         type
  =============  ==================================================================
  id             string (optional; ``row-<n>`` is used when absent or null)
  conversations  string holding the JSON list above, or list<struct<from, value>>
  images         list<binary> of encoded image files (PNG/JPEG/...), in marker order;
                 list<struct<bytes: binary, path: string>> (Hugging Face ``Image``
                 feature) is accepted too; the column may be absent (text only)
  =============  ==================================================================

Roles are normalised: ``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``,
``system`` -> ``system``; both ``from``/``value`` and ``role``/``content`` keys are accepted.

Bad input never raises out of the iterator: a malformed line, wrong field types, a missing,
escaping or undecodable image, an empty answer, a marker/image count mismatch, text that is not
valid Unicode (a lone surrogate such as ``"\\ud800"`` is valid JSON but cannot be stored as UTF-8)
or an ``id`` used before yields a ``Sample`` whose ``error`` names the sample, the file and the
problem, so an extraction run can record it and go on. A repeated id's row is renamed
``<id>@<line-n>`` (ids are unique within a cache). A JSONL line longer than ``MAX_LINE_BYTES`` (8 MiB)
is such an error row too, skipped without being read into memory. Problems with the file itself
(missing, unknown format, no JSON object in the first lines of a JSONL file) raise at once
(`check_data_file`, which extraction calls before it creates its output folder).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .format.safety import MAX_IMAGE_BYTES

IMAGE_MARKER = "<image>"
# 64 MP: far above any VLM's input resolution, far below what can exhaust a worker's memory.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# One JSONL line is one sample with image paths: 8 MiB is far above any real one (a 50 MB line once took
# 14 GB to tokenize); longer lines become error rows without being read into memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
SNIFF_BYTES, SNIFF_LINES = 64 * 1024, 16  # what check_data_file reads of a JSONL file to refuse it

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass
class Sample:
    id: str
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}], "<image>" marks images
    images: list[bytes]  # encoded image files, in <image> order
    image_refs: list[str]  # where they came from (paths), for provenance; [] when embedded
    error: str | None = None  # set when the input itself is bad (missing/corrupt image, empty answer...)
    extra: dict = field(default_factory=dict)  # other top-level JSONL fields (e.g. "qtype"), kept in the cache
    where: str = ""  # position in the input file ("line-7", "row-3", "item-2"), for messages


class ImageError(ValueError):
    """An image that cannot be used: empty, corrupt, truncated or too large."""


class _BadSample(Exception):
    """Internal: aborts building one sample; its message becomes `Sample.error`."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an encoded image file into a fully loaded RGB PIL image.

    Raises `ImageError` for zero-byte, unrecognised, corrupt or truncated data and for images
    with more than `max_pixels` pixels (checked from the header, before decoding the pixels).
    """
    if not data:
        raise ImageError("image data is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image data is {len(data)} bytes, above the {MAX_IMAGE_BYTES}-byte limit")
    try:
        with warnings.catch_warnings():
            # PIL warns (and later errors) on huge images itself; our own limit below is the rule.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                                 f"(raise max_pixels or downscale the image)")
            img.load()  # decode now: truncation and corrupt data only show up here
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format ({len(data)} bytes)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL reports corrupt/truncated data with these
        raise ImageError(f"corrupt or truncated image ({len(data)} bytes): {e}") from None
    if w == 0 or h == 0:
        raise ImageError(f"image has zero size ({w}x{h})")
    return img.convert("RGB") if img.mode != "RGB" else img


def read_samples(path: str | Path, limit: int | None = None, image_root: str | Path | None = None,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Sample]:
    """Iterate the samples of a JSONL, JSON or Parquet file (see the module docstring).

    `limit` caps the number of samples yielded (error samples included). Every image is decoded
    once while reading so a bad image is reported on its sample, not later on a GPU worker.
    Raises `FileNotFoundError` / `ValueError` right away for a missing file or unknown format.
    """
    path = Path(path)
    check_data_file(path, image_root)
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES or suffix == ".json":
        root = Path(image_root) if image_root is not None else path.parent
        records = _jsonl_records(path) if suffix in _JSONL_SUFFIXES else _json_array_records(path)
        samples = (_sample_from_record(rec, where, path, root.resolve(), max_image_pixels)
                   for where, rec in records)
    else:
        samples = _parquet_samples(path, max_image_pixels)
    return _take(_unique_ids(samples, path), limit)


def check_data_file(path: str | Path, image_root: str | Path | None = None) -> None:
    """Refuse, before anything is written, a dataset that cannot be read at all: a missing file, an
    unknown format, a missing image root, or a JSONL file that is not JSONL (none of its first
    `SNIFF_LINES` lines a JSON object: random bytes, a text file). Raises `FileNotFoundError` / `ValueError`."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder; give the dataset file in it (.jsonl, .json or .parquet)")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (*_JSONL_SUFFIXES, ".json", ".parquet"):
        raise ValueError(f"{path}: unknown dataset format {suffix!r}; use .jsonl, .ndjson, .json or .parquet")
    if suffix == ".parquet":
        return
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory (needed to resolve the image paths in "
                                f"{path}; pass --image-root, or image_root=... in Python)")
    if suffix in _JSONL_SUFFIXES:  # (bad lines among good ones are error rows: only a file of none is refused)
        first = [rec for _, (_, rec) in zip(range(SNIFF_LINES), _jsonl_records(path))]
        if first and not any(isinstance(rec, dict) for rec in first):
            with open(path, "rb") as f:
                binary = b"\0" in f.read(SNIFF_BYTES)
            raise ValueError(f"{path}: not JSONL: {'binary data, and ' if binary else ''}none of its first "
                             f"{len(first)} non-blank lines is a JSON object (first: {first[0]}); pass a file "
                             f"with one sample object per line (see genrecal_cache.data for the format)")


def _unique_ids(samples: Iterable[Sample], path: Path) -> Iterator[Sample]:
    """A repeated id becomes an error row under a new id: the cache's ids must be unique, and one
    careless line must not stop a run (nor lose the first sample with that id)."""
    first: dict[str, str] = {}
    for s in samples:
        if s.id in first:
            new_id, k = f"{s.id}@{s.where}", 1
            while new_id in first:
                new_id, k = f"{s.id}@{s.where}#{k}", k + 1
            s = Sample(new_id, [], [], [], where=s.where,
                       error=f"sample {s.id!r} ({path}, {s.where}): duplicate id: {first[s.id]} has the same id; "
                             f"ids must be unique, give this sample its own (recorded as {new_id!r})")
        first[s.id] = s.where
        yield s


def _take(samples: Iterable[Sample], limit: int | None) -> Iterator[Sample]:
    for i, s in enumerate(samples):
        if limit is not None and i >= limit:
            return
        yield s


# --- JSON / JSONL ------------------------------------------------------------------------------

def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed object or the parse error) per non-blank line; `where` is `line-<n>`. A line longer
    than MAX_LINE_BYTES is an error record, skipped without being held in memory."""
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw) + _skip_line(f)
                yield f"line-{n}", _BadSample(f"the line is {size} bytes, above the limit of {MAX_LINE_BYTES} bytes "
                                              f"for one sample; shorten or drop it")
                continue
            if not raw.strip():
                continue
            try:
                yield f"line-{n}", json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield f"line-{n}", _BadSample(f"malformed JSON: {e}")
            except RecursionError:  # valid JSON nested deeper than the parser's stack
                yield f"line-{n}", _BadSample("malformed JSON: nested too deeply")


def _skip_line(f: Any) -> int:
    """Read past the rest of the current line, a chunk at a time; returns the bytes skipped."""
    skipped = 0
    while chunk := f.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _json_array_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Parses the whole array now (a broken file raises here), then iterates `(item-<n>, record)`."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); a .json dataset must be one JSON array") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json dataset must be a JSON array of samples, got {type(data).__name__}")
    return ((f"item-{n}", rec) for n, rec in enumerate(data))


_RECORD_KEYS = {"id", "image", "images", "conversations"}


def _sample_from_record(rec: Any, where: str, path: Path, root: Path, max_pixels: int) -> Sample:
    sid = where
    refs: list[str] = []
    try:
        if isinstance(rec, _BadSample):
            raise rec
        if not isinstance(rec, dict):
            raise _BadSample(f"expected a JSON object, got {type(rec).__name__}")
        sid = _sample_id(rec.get("id"), where)
        refs = _image_refs(rec.get("image", rec.get("images")))
        images = [_read_image_file(ref, root) for ref in refs]
        sample = _build(sid, rec.get("conversations"), images, refs, max_pixels)
        sample.extra = {k: v for k, v in rec.items() if k not in _RECORD_KEYS}
        _check_unicode(sample.extra, "a field")
        sample.where = where
        return sample
    except _BadSample as e:
        return _error_sample(sid, refs, f"sample {sid!r} ({path}, {where}): {e}", where)
    except Exception as e:  # the contract is "never raise per sample": report anything unforeseen too
        return _error_sample(sid, refs, f"sample {sid!r} ({path}, {where}): unexpected {type(e).__name__}: {e}",
                             where)


def _error_sample(sid: str, refs: list[str], error: str, where: str) -> Sample:
    """An error row that can always be stored: text that is not valid UTF-8 is escaped (`\\udXXX`)."""
    safe = lambda t: t.encode("utf-8", "backslashreplace").decode("utf-8")  # noqa: E731
    return Sample(sid, [], [], [safe(r) for r in refs], error=safe(error), where=where)


def _image_refs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _BadSample(f"'image' must be a path or a list of paths, got {_describe(value)}")


def _read_image_file(ref: str, root: Path) -> bytes:
    try:
        target = (root / ref).resolve()  # resolve() also follows symlinks, so links cannot escape either
    except (OSError, ValueError) as e:  # e.g. a NUL byte in the path
        raise _BadSample(f"invalid image path {ref!r}: {e}") from None
    if not target.is_relative_to(root):
        raise _BadSample(f"image path {ref!r} points outside the image root {root}; "
                         f"keep images under the image root or pass a wider --image-root (image_root=... in Python)")
    if not target.is_file():
        raise _BadSample(f"image file not found: {target} (from {ref!r}, resolved against image_root={root}; "
                         f"fix the path or pass --image-root)")
    try:
        size = target.stat().st_size
        if size > MAX_IMAGE_BYTES:  # checked before reading: a huge file must not fill the memory
            raise _BadSample(f"image file {target} is {size} bytes, above the {MAX_IMAGE_BYTES}-byte limit")
        return target.read_bytes()
    except OSError as e:
        raise _BadSample(f"cannot read image file {target}: {e}") from None


# --- Parquet -----------------------------------------------------------------------------------

def _parquet_samples(path: Path, max_pixels: int) -> Iterator[Sample]:
    """Opens the file and checks its schema now (raising), then returns the row iterator."""
    import pyarrow.parquet as pq  # only Parquet users pay for the import

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for non-Parquet data
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    if "conversations" not in names:
        raise ValueError(f"{path}: Parquet dataset has no 'conversations' column (columns: {sorted(names)}); "
                         f"see genrecal_cache.data for the schema")
    return _parquet_rows(path, pf, [c for c in ("id", "conversations", "images") if c in names], max_pixels)


def _parquet_rows(path: Path, pf: Any, columns: list[str], max_pixels: int) -> Iterator[Sample]:
    n = 0
    for batch in pf.iter_batches(batch_size=256, columns=columns):  # bounded memory for big files
        for row in batch.to_pylist():
            where = f"row-{n}"
            n += 1
            sid = where
            try:
                sid = _sample_id(row.get("id"), where)
                convs = row["conversations"]
                if isinstance(convs, (str, bytes)):
                    try:
                        convs = json.loads(convs)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise _BadSample(f"'conversations' is not valid JSON: {e}") from None
                images, refs = _embedded_images(row.get("images"))
                sample = _build(sid, convs, images, refs, max_pixels)
                sample.where = where
                yield sample
            except _BadSample as e:
                yield _error_sample(sid, [], f"sample {sid!r} ({path}, {where}): {e}", where)
            except Exception as e:  # never raise per sample (see the JSONL reader)
                yield _error_sample(sid, [], f"sample {sid!r} ({path}, {where}): unexpected {type(e).__name__}: {e}",
                                    where)


def _embedded_images(value: Any) -> tuple[list[bytes], list[str]]:
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise _BadSample(f"'images' must be a list of encoded images, got {_describe(value)}")
    images, refs = [], []
    for i, item in enumerate(value):
        if isinstance(item, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
            data, ref = item.get("bytes"), item.get("path")
            if ref:
                refs.append(str(ref))
        else:
            data = item
        if not isinstance(data, (bytes, bytearray)):
            raise _BadSample(f"images[{i}] is {_describe(data)}, expected encoded image bytes")
        images.append(bytes(data))
    return images, refs if len(refs) == len(images) else []


# --- shared validation -------------------------------------------------------------------------

def _sample_id(value: Any, where: str) -> str:
    if value is None or value == "":
        return where
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadSample(f"'id' must be a string or an integer, got {_describe(value)}")
    _check_unicode(str(value), "'id'")
    return str(value)


def _check_unicode(value: Any, what: str) -> None:
    """Raise `_BadSample` when some text in `value` cannot be written as UTF-8 (a lone surrogate)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadSample(f"{what} is not valid Unicode: {e.reason} {e.object[e.start:e.end]!r} (a lone surrogate, "
                         f"e.g. '\\ud800' in the JSON, is not a character); fix or drop the text") from None


def _build(sid: str, conversations: Any, images: list[bytes], refs: list[str], max_pixels: int) -> Sample:
    """Validate and normalise one conversation; raises `_BadSample` on any problem."""
    messages = _messages(conversations)
    n_markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if m["role"] == "user")
    if any(IMAGE_MARKER in m["content"] for m in messages if m["role"] != "user"):
        raise _BadSample(f"'{IMAGE_MARKER}' appears outside a user turn; images can only be in user turns")
    if images and n_markers == 0:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_MARKER}\n" * len(images) + first_user["content"]
    elif n_markers != len(images):
        raise _BadSample(f"{n_markers} '{IMAGE_MARKER}' marker(s) in the conversation but {len(images)} "
                         f"image(s); every image needs exactly one marker")
    for i, data in enumerate(images):
        try:
            decode_image(data, max_pixels=max_pixels)
        except ImageError as e:
            label = refs[i] if i < len(refs) else f"images[{i}]"
            raise _BadSample(f"image {label}: {e}") from None
    return Sample(sid, messages, images, refs)


def _messages(conversations: Any) -> list[dict]:
    if not isinstance(conversations, list) or not conversations:
        raise _BadSample(f"'conversations' must be a non-empty list of turns, got {_describe(conversations)}")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _BadSample(f"turn {i} must be an object with 'from' and 'value', got {_describe(turn)}")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = _ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            raise _BadSample(f"turn {i} has speaker {who!r}; expected one of {sorted(_ROLES)}")
        if not isinstance(text, str):
            raise _BadSample(f"turn {i} ({role}) text must be a string, got {_describe(text)}")
        _check_unicode(text, f"turn {i} ({role}) text")
        if role == "assistant" and not text.strip():
            raise _BadSample(f"turn {i} is an empty assistant answer; there is nothing to learn from it")
        messages.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadSample("conversation has no assistant turn; there is no answer to distil")
    if not any(m["role"] == "user" for m in messages):
        raise _BadSample("conversation has no user turn")
    return messages


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_MARKER", "MAX_LINE_BYTES", "ImageError", "Sample", "check_data_file",
           "decode_image", "read_samples"]
