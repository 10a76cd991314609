"""Check a cache (local or remote) against its manifest: sizes, checksums, file set and structure.

`verify` returns a list of faults, one line each, naming the file, the problem and the fix; an
empty list means the cache is sound. It reads every byte once (checksums) and the small arrays
(answer_mask) shard by shard, so memory stays bounded for large caches.

Long as a list of short checks, one per kind of fault, that share one walk over the files and the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import warnings
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from .format.codecs import hidden_codec
from .format.roles import row_flags
from .format.manifest import (
    FEATURES_NAME, HEAD_NAME, MANIFEST_NAME, SAMPLES_NAME, CacheFormatError, Manifest,
    sha256_stream,
)
from .format import safety
from .io.fastread import NonFiniteError, ShardedArrayReader, read_ranges
from .io.remote import is_http, read_capped, size_mismatch
from .io.locate import load_manifest, locate, open_fs, open_parquet, zarr_store
from .parts import check_same_identity
from .reader import INDEX_COLUMNS, load_head, open_feature_arrays

__all__ = ["REFETCH", "file_sha256", "verify", "verify_parts"]

REFETCH = "re-download it or re-extract the cache"


def verify(path_or_url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Faults of the cache at a local path or fsspec URL, each naming the file and the fix; [] = sound."""
    fs, root, url = open_fs(path_or_url, storage_options)
    try:
        found = locate(fs, root, url)
    except CacheFormatError as e:
        return [str(e)]
    if isinstance(found, list):  # a cache written in parts: verify each, and them together
        return verify_parts(fs, root, url, found, storage_options)
    manifest = found
    faults, unsafe = _check_files(fs, root, manifest)
    if unsafe:  # links out of the cache, FIFOs, devices: nothing more is opened
        return faults
    head_faults = _check_head(fs, root, manifest)
    faults += head_faults
    if not head_faults and HEAD_NAME in manifest.checksums:
        try:  # values too: a NaN in the norm or lm_head makes every teacher logit NaN
            load_head(fs, root, url, manifest)
        except FileNotFoundError:
            pass  # reported by the file checks
        except CacheFormatError as e:
            faults.append(_relative(str(e), url))
    store = zarr_store(fs, f"{root}/{FEATURES_NAME}", storage_options, f"{url}/{FEATURES_NAME}", manifest)
    try:
        try:
            arrays = open_feature_arrays(store, manifest, url)
        except CacheFormatError as e:
            return faults + [_relative(str(e), url)]
        faults += _check_array_specs(arrays, manifest)
        try:
            pf = open_parquet(fs, f"{root}/{SAMPLES_NAME}", manifest.sizes.get(SAMPLES_NAME))
            safety.check_schema(pf.schema_arrow, SAMPLES_NAME)  # column types first: the checks below index with them
            table = safety.read_index(pf, INDEX_COLUMNS, SAMPLES_NAME)  # sizes before values
            image_faults = _check_images(pf)
        except FileNotFoundError:
            return faults  # already reported as a missing file
        except CacheFormatError as e:
            return faults + [str(e)]
        except (pa.ArrowException, OSError, ValueError) as e:
            return faults + [f"{SAMPLES_NAME}: unreadable ({e}): the file is truncated or corrupt; {REFETCH}"]
        faults += image_faults + _check_index(table, arrays, manifest) + _check_row_json(table)
        if "row_flags" in arrays and not any(f.startswith(tuple(f"{FEATURES_NAME}/{n}/" for n in
                                                                 ("token_ids", "answer_mask", "row_flags")))
                                             for f in faults):  # those shards' faults are reported already
            faults += _check_row_flags(arrays, table, manifest)
        faults += _check_hidden_values(fs, root, arrays["hidden"], manifest, {f.split(":")[0] for f in faults})
        try:
            stored = (_stored_feature_bytes(fs, root, manifest) if isinstance(fs, LocalFileSystem)
                      else safety.listed_feature_bytes(manifest))
            safety.check_read_budget(manifest, table.column("id").to_pylist(), table.column("num_tokens").to_numpy(),
                                     stored, SAMPLES_NAME)
        except CacheFormatError as e:
            faults.append(str(e))
        return faults
    finally:
        store.close()


def _relative(msg: str, url: str) -> str:
    return msg.replace(url + "/", "", 1)


def _stored_feature_bytes(fs: fsspec.AbstractFileSystem, root: str, m: Manifest) -> int:
    return sum(os.lstat(f"{root}/{rel}").st_size for rel in m.checksums
               if rel.startswith(f"{FEATURES_NAME}/") and os.path.isfile(f"{root}/{rel}"))


def _local_files(root: str) -> tuple[set[str], list[str]]:
    """(regular files under root, faults for everything else: links, FIFOs, devices), links not followed."""
    files, faults = set(), []
    for d, dirs, names in os.walk(root, followlinks=False):
        for name in sorted(dirs + names):
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                files.add(rel)
            elif not stat.S_ISDIR(st.st_mode):
                faults.append(f"{safety.local_file_problem(root, rel)}: a cache holds only regular files (no links, "
                              f"FIFOs or devices); the cache is corrupt or hostile: delete it and {REFETCH}")
    return files - {MANIFEST_NAME}, faults


def file_sha256(fs: fsspec.AbstractFileSystem, path: str, limit: int, where: str, size: int | None) -> str:
    """sha256 of a cache file, refused (CacheFormatError) past `limit` bytes: a server's endless answer
    is read only that far. With `size` (the manifest lists one), a file of another size is refused
    before it is hashed (its size on disk, or the one a server states) and after (the bytes read)."""
    if isinstance(fs, LocalFileSystem):  # never a link or FIFO (refused before), read without following one
        with os.fdopen(safety.open_regular(path, path), "rb") as f:
            got = os.fstat(f.fileno()).st_size
            if size is not None and got != size:
                raise size_mismatch(where, got, size, "the file has")
            return sha256_stream(f)
    try:
        h, n = hashlib.sha256(), 0
        with fs.open(path, "rb", **({"size": size} if is_http(fs) and size is not None else {})) as f:
            stated = fs.size(path) if size is not None else None
            if size is not None and stated is not None and stated != size:
                raise size_mismatch(where, stated, size, "the server says the file has")
            while block := f.read(8 << 20):
                h.update(block)
                n += len(block)
                if n > limit:
                    raise CacheFormatError(f"{where}: larger than the {limit}-byte limit for this file (an endless "
                                           f"or hostile answer); {REFETCH}")
        if size is not None and n != size:
            raise size_mismatch(where, n, size, "the server sent")
        return h.hexdigest()
    except ValueError as e:  # an HTTP server without Range support: fetch the file in one request
        if isinstance(e, CacheFormatError) or ("range" not in str(e).lower() and "seek" not in str(e).lower()):
            raise
        return hashlib.sha256(read_capped(fs, path, limit, where, size=size)).hexdigest()


def _check_files(fs: fsspec.AbstractFileSystem, root: str, m: Manifest) -> tuple[list[str], bool]:
    """(faults, whether a file is unsafe to open: a link, FIFO or device, which then stops the checks)."""
    faults: list[str] = []
    if isinstance(fs, LocalFileSystem):
        stored, faults = _local_files(root)
        if faults:
            return faults, True
    else:
        try:
            stored = {p[len(root) + 1:] for p in fs.find(root)} - {MANIFEST_NAME}
        except Exception as e:  # noqa: BLE001 - e.g. a web server without directory listings
            warnings.warn(f"{root}: cannot list files ({e}); stray files will not be detected", stacklevel=3)
            stored = None
    try:  # every shard the token count implies must be listed (first: a hostile count is refused at once)
        shards = safety.shard_files(m, MANIFEST_NAME)
    except CacheFormatError as e:
        return [str(e)], True
    for rel, expected in m.checksums.items():
        if stored is not None and rel not in stored:
            faults.append(f"{rel}: listed in the manifest but missing: the cache is incomplete; {REFETCH}")
            continue
        try:
            got = file_sha256(fs, f"{root}/{rel}", safety.file_limit(rel, m), rel, m.sizes.get(rel))
        except FileNotFoundError:
            faults.append(f"{rel}: listed in the manifest but missing: the cache is incomplete; {REFETCH}")
            continue
        except CacheFormatError as e:
            faults.append(str(e))
            continue
        if got != expected:
            faults.append(f"{rel}: sha256 mismatch (expected {expected}, got {got}): the file is corrupt; "
                          f"re-extract or re-download it")
    for rel in sorted((stored or set()) - set(m.checksums)):
        faults.append(f"{rel}: stored but not listed in the manifest (a stray file, e.g. from an interrupted "
                      f"copy): delete it")
    # every shard the token count implies must be checksummed, so a manifest that lost one is caught too
    for rel, name, s in shards:
        if rel not in m.checksums:
            S, T = m.arrays[name]["shard_tokens"], m.counts["tokens"]
            faults.append(f"{rel}: shard for tokens [{s * S}, {min((s + 1) * S, T)}) has no checksum "
                          f"in the manifest: the manifest is incomplete; {REFETCH}")
    return faults, False


def _check_head(fs: fsspec.AbstractFileSystem, root: str, m: Manifest) -> list[str]:
    """Shapes from the safetensors header alone (8-byte length + JSON), no tensor data is read."""
    try:
        with fs.open(f"{root}/{HEAD_NAME}", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n < (100 << 20) else None
    except FileNotFoundError:
        return []  # reported by the file checks
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        return [f"{HEAD_NAME}: unreadable safetensors header ({e}): the file is corrupt; {REFETCH}"]
    if not isinstance(header, dict):
        return [f"{HEAD_NAME}: not a safetensors file (bad header): the file is corrupt; {REFETCH}"]
    faults = []
    want = {"lm_head.weight": [m.vocab_size, m.hidden_size], "norm.weight": [m.hidden_size]}
    for name, shape in want.items():
        entry = header.get(name)
        got = entry.get("shape") if isinstance(entry, dict) else None
        if got != shape:
            faults.append(f"{HEAD_NAME}: tensor {name} has shape {got}, expected {shape} from the manifest "
                          f"(hidden_size={m.hidden_size}, vocab_size={m.vocab_size}): the head belongs to another "
                          f"teacher; re-extract the cache")
    meta = header.get("__metadata__")
    try:
        cfg = json.loads((meta if isinstance(meta, dict) else {}).get("genrecal_head_config", "null") or "null")
    except (TypeError, ValueError, RecursionError):
        cfg = "unparseable"
    if not isinstance(cfg, dict) or (cfg.get("hidden_size"), cfg.get("vocab_size")) != (m.hidden_size, m.vocab_size):
        faults.append(f"{HEAD_NAME}: head config {cfg} does not match the manifest's hidden_size={m.hidden_size}, "
                      f"vocab_size={m.vocab_size}; re-extract the cache")
    return faults


def _check_array_specs(arrays: dict[str, Any], m: Manifest) -> list[str]:
    faults = []
    want_tail = {"token_ids": [], "answer_mask": [], "hidden": [m.hidden_size], "topk_ids": [m.topk],
                 "topk_logprobs": [m.topk], "row_flags": [], "context": [m.roles.rank]}
    for name in sorted(set(m.arrays) - set(m.array_names)):
        faults.append(f"{MANIFEST_NAME}: unknown array {name!r} in 'arrays'; this cache is not format version "
                      f"{m.format_version}")
    for name in m.array_names:
        a, spec = arrays[name], m.arrays[name]
        rel = f"{FEATURES_NAME}/{name}/zarr.json"
        if spec["shape_tail"] != want_tail[name]:
            faults.append(f"{MANIFEST_NAME}: arrays.{name}.shape_tail is {spec['shape_tail']}, expected {want_tail[name]} "
                          f"from hidden_size/topk; the manifest is inconsistent; re-extract the cache")
        shards = a.shards or a.chunks
        if shards[0] != spec["shard_tokens"] or a.chunks[0] != spec["chunk_tokens"]:
            faults.append(f"{rel}: shards/chunks of {shards[0]}/{a.chunks[0]} tokens but the manifest says "
                          f"{spec['shard_tokens']}/{spec['chunk_tokens']}; {REFETCH}")
        encoding = a.attrs.get("genrecal_encoding")
        if (spec["dtype"] == "bfloat16") != (encoding == "bfloat16"):
            faults.append(f"{rel}: attribute genrecal_encoding={encoding!r} but the manifest says dtype {spec['dtype']}; "
                          f"the values would be misread; {REFETCH}")
    faults += _check_hidden_codec(arrays["hidden"], m)
    return faults


def _check_hidden_codec(a: Any, m: Manifest) -> list[str]:
    """`hidden` is stored the way the manifest's hidden_codec says (dtypes, serializer, attribute)."""
    codec = hidden_codec(m.hidden_codec)
    spec, rel = m.arrays["hidden"], f"{FEATURES_NAME}/hidden/zarr.json"
    faults = []
    if (spec["dtype"], spec["stored_dtype"]) != (codec.logical_dtype, codec.stored_dtype):
        faults.append(f"{MANIFEST_NAME}: arrays.hidden is {spec['dtype']} stored as {spec['stored_dtype']}, but "
                      f"hidden_codec {codec.name!r} stores {codec.logical_dtype} as {codec.stored_dtype}; the manifest "
                      f"is inconsistent; {REFETCH}")
    got = a.serializer.to_dict().get("name") if a.serializer is not None else None
    want = codec.serializer().to_dict()["name"]
    if got != want:
        faults.append(f"{rel}: hidden is encoded with {got!r} but the manifest's hidden_codec {codec.name!r} needs "
                      f"{want!r}; the values would be misread; {REFETCH}")
    return faults


def _check_index(table: pa.Table, arrays: dict[str, Any], m: Manifest) -> list[str]:
    faults: list[str] = []
    P = SAMPLES_NAME
    n, T = table.num_rows, m.counts["tokens"]
    if n != m.counts["samples"]:
        faults.append(f"{P}: {n} rows but the manifest counts {m.counts['samples']} samples; {REFETCH}")
    idx = table.column("index").to_numpy()
    if not np.array_equal(idx, np.arange(n)):
        faults.append(f"{P}: column 'index' is not 0..{n - 1} in order; {REFETCH}")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != n:
        dup = next(i for i, k in Counter(ids).items() if k > 1)
        faults.append(f"{P}: duplicate sample id {dup!r}; ids must be unique; re-extract the cache")
    status = table.column("status").to_pylist()
    errors = table.column("error").to_pylist()
    offsets = table.column("token_offset").to_numpy()
    lengths = table.column("num_tokens").to_numpy()
    spans = table.column("answer_spans").to_pylist()
    expected_offset, n_ok, n_err, answer_tokens = 0, 0, 0, 0
    starts, ends = [], []  # absolute answer spans, for the answer_mask comparison
    for i in range(n):
        name = f"{P}: row {i} (sample {ids[i]!r})"
        if status[i] == "error":
            n_err += 1
            if offsets[i] != 0 or lengths[i] != 0 or spans[i]:
                faults.append(f"{name}: an error row must have token_offset 0, num_tokens 0 and no spans; {REFETCH}")
            if not errors[i]:
                faults.append(f"{name}: status 'error' without an error message; re-extract the cache")
            continue
        if status[i] != "ok":
            faults.append(f"{name}: status {status[i]!r} is neither 'ok' nor 'error'; {REFETCH}")
            continue
        n_ok += 1
        if lengths[i] < 1:
            faults.append(f"{name}: an ok sample with {lengths[i]} tokens; {REFETCH}")
        if offsets[i] != expected_offset:
            faults.append(f"{name}: token_offset {offsets[i]} but the previous ok samples end at {expected_offset} "
                          f"(offsets must be contiguous); {REFETCH}")
        prev_end = 0
        for s, e in spans[i]:
            if not (prev_end <= s < e <= lengths[i]):
                faults.append(f"{name}: answer span [{s}, {e}) is empty, unsorted, overlapping or outside the "
                              f"sample's {lengths[i]} tokens; {REFETCH}")
                break
            prev_end = e
            starts.append(offsets[i] + s)
            ends.append(offsets[i] + e)
            answer_tokens += e - s
        expected_offset = offsets[i] + lengths[i]
    if expected_offset != T or int(lengths.sum()) != T:
        faults.append(f"{P}: the samples' num_tokens sum to {int(lengths.sum())} (last ok sample ends at "
                      f"{expected_offset}) but the feature arrays hold T={T} tokens; {REFETCH}")
    c = m.counts
    if (n_ok, n_err, answer_tokens) != (c["ok"], c["error"], c["answer_tokens"]):
        faults.append(f"{MANIFEST_NAME}: counts ok={c['ok']}, error={c['error']}, answer_tokens={c['answer_tokens']} but "
                      f"{P} has {n_ok}, {n_err}, {answer_tokens}; {REFETCH}")
    faults += _check_answer_mask(arrays["answer_mask"], np.asarray(starts, np.int64), np.asarray(ends, np.int64), m)
    return faults


def _check_images(pf: Any) -> list[str]:
    """Every row group's images within the limits readers apply (sizes computed before decoding)."""
    for g in range(pf.metadata.num_row_groups):
        try:
            safety.read_images(pf, g, SAMPLES_NAME)
        except CacheFormatError as e:
            return [str(e)]
    return []


def _check_row_json(table: pa.Table) -> list[str]:
    """`messages` and `extra` of every row parse to the documented shapes (the reader checks a row when it
    reads it; this finds them all)."""
    faults = []
    ids = table.column("id").to_pylist()
    for i, (msgs, extra) in enumerate(zip(table.column("messages").to_pylist(), table.column("extra").to_pylist())):
        where = f"{SAMPLES_NAME}: row {i} (sample {ids[i]!r:.60})"
        try:
            safety.parse_messages(msgs, where)
            safety.parse_extra(extra, where)
        except CacheFormatError as e:
            faults.append(str(e))
            if len(faults) >= 20:
                faults.append(f"{SAMPLES_NAME}: more rows with malformed messages/extra not listed")
                break
    return faults


def _check_hidden_values(fs: fsspec.AbstractFileSystem, root: str, a: Any, m: Manifest, reported: set[str]
                         ) -> list[str]:
    """Every value of `hidden` decodes and is finite (the chunks' crc32c checked on the way), one shard at
    a time, so memory stays bounded. Shards already `reported` (e.g. a sha256 mismatch) are skipped."""
    codec = hidden_codec(m.hidden_codec)
    reader = (ShardedArrayReader.for_array(a, f"{root}/{FEATURES_NAME}/hidden", check_finite=True)
              if type(fs) is LocalFileSystem else None)
    S, T = m.arrays["hidden"]["shard_tokens"], m.counts["tokens"]
    for lo in range(0, T, S):
        hi = min(lo + S, T)
        rel = f"{FEATURES_NAME}/hidden/c/{lo // S}/0"
        if rel in reported:
            continue
        try:
            if reader is not None:
                read_ranges([(reader, lo, hi, codec.name == "bf16")])
            elif not codec.finite(np.asarray(a[lo:hi])):
                return [f"{rel}: hidden holds NaN or inf in tokens [{lo}, {hi}); the teacher's forward pass was broken "
                        f"or the file was altered; re-extract the cache"]
        except NonFiniteError as e:
            return [f"{rel}: {str(e).split(': ', 1)[-1]}"]
        except Exception as e:  # noqa: BLE001 - a corrupt shard fails its crc32c or decompression
            return [f"{rel}: unreadable ({type(e).__name__}: {str(e)[:200]}): the file is corrupt; {REFETCH}"]
    return []


def _check_answer_mask(mask: Any, starts: np.ndarray, ends: np.ndarray, m: Manifest) -> list[str]:
    """Compare answer_mask with the spans, one shard at a time."""
    S, T = m.arrays["answer_mask"]["shard_tokens"], m.counts["tokens"]
    for lo in range(0, T, S):
        hi = min(lo + S, T)
        expected = np.zeros(hi - lo, dtype=np.int8)
        # spans are sorted and disjoint: only those with end > lo and start < hi touch this shard
        first = np.searchsorted(ends, lo, side="right")
        last = np.searchsorted(starts, hi, side="left")
        for s, e in zip(starts[first:last], ends[first:last]):
            expected[max(s, lo) - lo:min(e, hi) - lo] = 1
        try:
            got = np.asarray(mask[lo:hi])
        except Exception as e:  # noqa: BLE001 - a corrupt shard fails its crc32c or decompression
            return [f"{FEATURES_NAME}/answer_mask/c/{lo // S}: unreadable ({type(e).__name__}: {e}): the file is "
                    f"corrupt; {REFETCH}"]
        if not np.array_equal(got, expected.astype(bool)):
            bad = lo + int(np.flatnonzero(got != expected.astype(bool))[0])
            rel = f"{FEATURES_NAME}/answer_mask/c/{lo // S}"
            return [f"{rel}: answer_mask disagrees with samples.parquet answer_spans (first at token {bad}); "
                    f"one of the two is corrupt; {REFETCH}"]
    return []


def _check_row_flags(arrays: dict[str, Any], table: pa.Table, m: Manifest) -> list[str]:
    """`row_flags` is what the manifest's storage gives for each sample's tokens and answer mask (format/roles.py),
    read a shard's worth of samples at a time."""
    storage, S = m.roles, m.arrays["row_flags"]["shard_tokens"]
    ok = [i for i, st in enumerate(table.column("status").to_pylist()) if st == "ok"]
    offsets, lengths = table.column("token_offset").to_numpy(), table.column("num_tokens").to_numpy()
    ids = table.column("id").to_pylist()
    j = 0
    while j < len(ok):
        k, lo = j, int(offsets[ok[j]])
        while k < len(ok) and (k == j or offsets[ok[k]] + lengths[ok[k]] - lo <= S):
            k += 1
        hi = int(offsets[ok[k - 1]] + lengths[ok[k - 1]])
        try:
            got = {n: np.asarray(arrays[n][lo:hi]) for n in ("token_ids", "answer_mask", "row_flags")}
        except Exception as e:  # noqa: BLE001 - a corrupt shard fails its crc32c or decompression
            return [f"{FEATURES_NAME}: tokens [{lo}, {hi}) unreadable ({type(e).__name__}: {e}); {REFETCH}"]
        for i in ok[j:k]:
            a, b = int(offsets[i]) - lo, int(offsets[i] + lengths[i]) - lo
            want = row_flags(got["token_ids"][a:b], got["answer_mask"][a:b], storage)
            if not np.array_equal(got["row_flags"][a:b], want):
                bad = int(offsets[i]) + int(np.flatnonzero(got["row_flags"][a:b] != want)[0])
                return [f"{FEATURES_NAME}/row_flags/c/{bad // S}: row_flags of sample {ids[i]!r:.60} (first at token "
                        f"{bad}) disagree with the manifest's storage {storage.context!r}/{storage.topk_rows!r} and "
                        f"the answer mask; the cache is corrupt; {REFETCH}"]
        j = k
    return []


def verify_parts(fs: fsspec.AbstractFileSystem, root: str, url: str, names: list[str],
                 storage_options: dict[str, Any] | None) -> list[str]:
    """Faults of a cache written in parts `names` (each part verified, plus cross-part checks)."""
    faults = [f"{n}/{f}" for n in names for f in verify(f"{url}/{n}", storage_options)]
    try:
        manifests = [load_manifest(fs, f"{root}/{n}", f"{url}/{n}") for n in names]
        check_same_identity(url, names, manifests)
    except CacheFormatError as e:
        return faults + [str(e)]
    try:
        stray = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) 
        for s in stray:
            if s not in names:
                faults.append(f"{s}: stored next to the parts but not a part (a stray file, or a part of another "
                              f"--num-shards): delete or move it")
    except Exception:  # noqa: BLE001
        pass
    ids: Counter[str] = Counter()
    for n, m in zip(names, manifests):
        try:
            pf = open_parquet(fs, f"{root}/{n}/{SAMPLES_NAME}", m.sizes.get(SAMPLES_NAME))
            ids.update(pf.read(columns=["id"]).column("id").to_pylist())
        except Exception:  # noqa: BLE001 - reported by the part's own verify
            pass
    dup = [k for k, c in ids.items() if c > 1]
    if dup:
        faults.append(f"sample id {dup[0]!r} (and {len(dup) - 1} more) is in more than one part; ids must be unique "
                      f"across parts (was a part extracted with another --num-shards?); re-extract the parts")
    return faults
