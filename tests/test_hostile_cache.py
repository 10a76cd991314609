"""Hostile local caches (issue 14): a cache is data from another lab, so it may not make a reader open
files outside it, block on a FIFO, read /dev/zero, loop over a declared count or allocate a declared
size. Each case is refused before the data is read, with a CacheFormatError naming the file (or
sample) and the fix, and `verify` reports it without hanging.

Cases that hang today's code run in a daemon thread with a generous deadline: the deadline only
decides whether a hang is reported, never whether a working reader passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

from genrecal_cache.format.manifest import CacheFormatError, sha256_bytes
from genrecal_cache import open_cache
from genrecal_cache.verify import verify
from test_cache_format import D, V, make_samples, write_cache, synthetic_head

HANG_DEADLINE = 120.0  # seconds; a fixed reader answers these cases in well under one


def finishes(fn: Callable[[], Any]) -> Any:
    """fn()'s result or exception, failing the test if it does not return (today's code hangs)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_DEADLINE)
    assert not t.is_alive(), f"{fn} did not return within {HANG_DEADLINE}s (it hangs)"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    head = synthetic_head()
    path = tmp_path_factory.mktemp("hostile") / "cache"
    write_cache(path, head, make_samples(head, n=12), shard_tokens=64, chunk_tokens=32)
    return path


@pytest.fixture()
def cache(small_cache, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(small_cache, root)
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def _rehash(root: Path, m: dict, *rels: str) -> None:
    """Checksums and sizes of `rels` recomputed, as the maker of a hostile cache would."""
    for rel in rels:
        m["checksums"][rel] = sha256_bytes((root / rel).read_bytes())
        m["extra"]["sizes"][rel] = (root / rel).stat().st_size


def _refused(root: Path, *needles: str) -> str:
    with pytest.raises(CacheFormatError) as e:
        finishes(lambda: open_cache(root))
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---- files that are not regular files inside the cache ------------------------------------------------

def test_symlink_to_a_file_outside_the_cache_is_refused(cache, tmp_path):
    """Same bytes, so every checksum matches: only the link itself is wrong."""
    outside = tmp_path / "elsewhere.parquet"
    shutil.move(cache / "samples.parquet", outside)
    (cache / "samples.parquet").symlink_to(outside)
    _refused(cache, "samples.parquet", "symbolic link")
    faults = finishes(lambda: verify(cache))
    assert any("samples.parquet" in f and "symbolic link" in f for f in faults), faults


def test_symlinked_folder_is_refused(cache, tmp_path):
    shutil.move(cache / "features.zarr" / "hidden", tmp_path / "hidden")
    (cache / "features.zarr" / "hidden").symlink_to(tmp_path / "hidden", target_is_directory=True)
    _refused(cache, "features.zarr/hidden", "symbolic link")
    assert any("features.zarr/hidden" in f for f in finishes(lambda: verify(cache)))


def test_fifo_instead_of_a_shard_neither_blocks_open_nor_verify(cache):
    shard = cache / "features.zarr" / "hidden" / "c" / "0" / "0"
    shard.unlink()
    os.mkfifo(shard)
    _refused(cache, "features.zarr/hidden/c/0/0", "FIFO")
    faults = finishes(lambda: verify(cache))
    assert any("hidden/c/0/0" in f and "FIFO" in f for f in faults), faults


def test_link_to_dev_zero_is_refused_before_reading(cache):
    for rel in ("features.zarr/hidden/c/1/0", "teacher_head.safetensors"):
        (cache / rel).unlink()
        (cache / rel).symlink_to("/dev/zero")
    _refused(cache, "symbolic link", "/dev/zero")
    faults = finishes(lambda: verify(cache))
    assert any("/dev/zero" in f for f in faults) and len(faults) == 2, faults


def test_fifo_manifest_does_not_block(cache):
    (cache / "manifest.json").unlink()
    os.mkfifo(cache / "manifest.json")
    _refused(cache, "manifest.json", "FIFO")
    assert any("manifest.json" in f for f in finishes(lambda: verify(cache)))


# ---- declared sizes ---------------------------------------------------------------------------------------

def test_huge_token_count_is_refused_at_once(cache):
    m = _manifest(cache)
    m["counts"]["tokens"] = 2**40
    _write_manifest(cache, m)
    _refused(cache, "counts.tokens", "shard files")
    faults = finishes(lambda: verify(cache))
    assert len(faults) == 1 and "counts.tokens=1099511627776" in faults[0], faults


def _claim_tokens(root: Path, first_len: int) -> str:
    """Make the first ok sample claim `first_len` tokens, with everything else made consistent (index,
    counts, array shapes, shard layout, checksums) the way a hostile cache would be: id of that sample."""
    table = pq.read_table(root / "samples.parquet")
    off = table.column("token_offset").to_numpy().copy()
    length = table.column("num_tokens").to_numpy().copy()
    ok = np.flatnonzero(np.asarray(table.column("status").to_pylist()) == "ok")
    first = int(ok[0])
    delta = first_len - int(length[first])
    length[first] = first_len
    off[ok[1:]] += delta
    import pyarrow as pa
    table = table.set_column(table.schema.get_field_index("token_offset"), "token_offset", pa.array(off))
    table = table.set_column(table.schema.get_field_index("num_tokens"), "num_tokens", pa.array(length))
    pq.write_table(table, root / "samples.parquet")
    m = _manifest(root)
    T = m["counts"]["tokens"] + delta
    S = 1 << 25  # one shard holds every token: few files, so nothing looks missing
    m["counts"]["tokens"] = T
    rels = ["samples.parquet"]
    for name, spec in m["arrays"].items():
        rel = f"features.zarr/{name}/zarr.json"
        meta = json.loads((root / rel).read_text())
        meta["shape"][0] = T
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = S
        meta["codecs"][0]["configuration"]["chunk_shape"][0] = S >> 16
        (root / rel).write_text(json.dumps(meta))
        spec.update(shard_tokens=S, chunk_tokens=S >> 16)
        rels.append(rel)
    _rehash(root, m, *rels)
    _write_manifest(root, m)
    return table.column("id")[first].as_py()


def test_a_sample_claiming_2_to_the_24_tokens_is_refused_before_any_read(cache):
    sid = _claim_tokens(cache, 1 << 24)
    _refused(cache, repr(sid), "GENRECAL_MAX_READ_BYTES")
    faults = finishes(lambda: verify(cache))
    assert any(repr(sid) in f and "GiB" in f for f in faults), faults


def test_declared_tokens_must_be_backed_by_the_files(cache, monkeypatch):
    """With the per-read limit raised (a user trusting a genuine long-sample cache), a 100 KB cache still
    cannot claim 2^24 tokens: its decoded size is checked against the size of its feature files."""
    monkeypatch.setenv("GENRECAL_MAX_READ_BYTES", str(1 << 40))
    _claim_tokens(cache, 1 << 24)
    _refused(cache, "counts.tokens", "feature files hold only")


def test_the_read_limit_is_a_setting(cache, monkeypatch):
    monkeypatch.setenv("GENRECAL_MAX_READ_BYTES", "1000")
    _refused(cache, "GENRECAL_MAX_READ_BYTES")
    monkeypatch.setenv("GENRECAL_MAX_READ_BYTES", str(1 << 30))
    with open_cache(cache) as c:
        assert len(list(c.iter_samples())) > 0
    assert verify(cache) == []


# ---- codec chains and decoded sizes ---------------------------------------------------------------------

def _reencode_hidden(root: Path, compressors) -> None:
    """Rewrite `hidden` with other inner compressors (data, shapes and serializer kept) and rehash it."""
    import zarr

    group = zarr.open_group(root / "features.zarr", mode="r+")
    a = group["hidden"]
    data, sh = a[...], a.metadata.codecs[0]
    shutil.rmtree(root / "features.zarr" / "hidden")
    b = group.create_array("hidden", shape=a.shape, dtype=a.dtype, chunks=a.chunks, shards=a.shards,
                           serializer=sh.codecs[0], compressors=compressors, fill_value=0,
                           dimension_names=a.metadata.dimension_names, attributes=dict(a.attrs),
                           config={"write_empty_chunks": True})
    b[...] = data
    m = _manifest(root)
    m["checksums"] = {k: v for k, v in m["checksums"].items() if not k.startswith("features.zarr/hidden/")}
    m["extra"]["sizes"] = {k: v for k, v in m["extra"]["sizes"].items() if k in m["checksums"]}
    _rehash(root, m, *(p.relative_to(root).as_posix() for p in (root / "features.zarr" / "hidden").rglob("*")
                       if p.is_file()))
    _write_manifest(root, m)


def test_codec_chain_switched_to_gzip_is_refused(cache):
    """gzip has no declared size a reader could check (1 MB can inflate to 1 GiB per chunk)."""
    from zarr.codecs import GzipCodec

    _reencode_hidden(cache, (GzipCodec(level=1),))
    _refused(cache, "features.zarr/hidden/zarr.json", "gzip", "differs from the manifest")
    faults = verify(cache)
    assert len(faults) == 1 and "gzip" in faults[0], faults
    m = _manifest(cache)  # the manifest changed to match: still not a chain genrecal writes
    from genrecal_cache.format.codecs import describe_chain
    import zarr
    m["arrays"]["hidden"]["codec"] = describe_chain(zarr.open_array(cache / "features.zarr", path="hidden"))
    _write_manifest(cache, m)
    _refused(cache, "features.zarr/hidden/zarr.json", "not one genrecal writes")


def _declare_blosc_size(root: Path, rel: str, nbytes: int) -> None:
    """Make the first inner chunk of shard `rel` declare `nbytes` decoded bytes (crc32c and sha256 fixed)."""
    import google_crc32c
    import struct

    path = root / rel
    data = bytearray(path.read_bytes())
    m = _manifest(root)
    name = rel.split("/")[1]
    chunks = m["arrays"][name]["shard_tokens"] // m["arrays"][name]["chunk_tokens"]
    off, n = np.frombuffer(bytes(data[-(16 * chunks + 4):-4]), "<u8").reshape(chunks, 2)[0]
    off, n = int(off), int(n)
    struct.pack_into("<I", data, off + 4, nbytes)
    data[off + n - 4:off + n] = np.uint32(google_crc32c.value(bytes(data[off:off + n - 4]))).tobytes()
    path.write_bytes(bytes(data))
    _rehash(root, m, rel)
    _write_manifest(root, m)


def test_blosc_header_declaring_2_gib_is_refused_before_allocating(cache):
    from _http import serve

    _declare_blosc_size(cache, "features.zarr/hidden/c/0/0", (2 << 30) - 64)
    for served in (contextlib.nullcontext((cache, None)), serve(cache)):  # local (fastread), then HTTP (zarr)
        with served as (url, _), pytest.raises(CacheFormatError, match=r"declares 2147483584 decoded bytes"):
            with open_cache(url) as c:
                c[0]
    assert any("declares 2147483584" in f for f in verify(cache))


def _rewrite_parquet(root: Path, **columns) -> None:
    import pyarrow as pa

    table = pq.read_table(root / "samples.parquet")
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))
    pq.write_table(table, root / "samples.parquet", compression="zstd", use_dictionary=True)
    m = _manifest(root)
    _rehash(root, m, "samples.parquet")
    _write_manifest(root, m)


def test_parquet_dictionary_bomb_is_refused_before_decoding(cache):
    """One 30 MB value stored once and referenced by every row: a few KB of file, 360 MB of strings."""
    n = pq.read_metadata(cache / "samples.parquet").num_rows
    big = json.dumps([{"role": "user", "content": "x" * (30 << 20)}])
    _rewrite_parquet(cache, messages=[big] * n)
    assert (cache / "samples.parquet").stat().st_size < 200_000
    _refused(cache, "samples.parquet", "stored once and repeated", "hostile")
    faults = verify(cache)
    assert len(faults) == 1 and "samples.parquet" in faults[0], faults


def test_images_repeated_from_one_stored_copy_are_refused_before_decoding(cache):
    """A 96 MiB image stored once and referenced by all 12 rows of the row group: 1.1 GiB once decoded."""
    n = pq.read_metadata(cache / "samples.parquet").num_rows
    image = bytes(96 << 20)
    _rewrite_parquet(cache, images=[[image]] * n)
    del image
    with open_cache(cache) as c, pytest.raises(CacheFormatError, match="bytes of images once decoded"):
        c[0]
    faults = verify(cache)
    assert any("bytes of images once decoded" in f for f in faults), faults
