"""Hostile or broken servers (issue 14), against a real HTTP server on 127.0.0.1 (tests/_http.py): a
server that stalls after its headers, one that sends an endless body, one that refuses ranges, and a
cache whose files change while a run reads it. Each ends in a clear error (or a working fallback)
within bounded time and memory.

Cases that hang today's code run in a daemon thread with a generous deadline: the deadline only
decides whether a hang is reported, never whether a working reader passes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from _http import ENDLESS_CAP, FaultPlan, serve
from genrecal_cache.format.manifest import CacheFormatError
from genrecal_cache import open_cache
from genrecal_cache.io.pull import pull
from genrecal_cache.io.retry import RemoteReadError, RetryPolicy
from genrecal_cache.verify import verify
from test_cache_format import D, V, make_samples, write_cache, synthetic_head
from test_hostile_cache import finishes


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    head = synthetic_head()
    path = tmp_path_factory.mktemp("remote-hostile") / "cache"
    write_cache(path, head, make_samples(head, n=16), shard_tokens=64, chunk_tokens=16)
    return path


@pytest.fixture()
def cache(made, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(made, root)
    return root


@pytest.fixture()
def fast_failures(monkeypatch):
    """One retry, short waits, a 1 s read timeout: a stall must fail fast, not after minutes."""
    monkeypatch.setenv("GENRECAL_RETRIES", "1")
    monkeypatch.setenv("GENRECAL_RETRY_BACKOFF", "0.01")
    monkeypatch.setenv("GENRECAL_READ_TIMEOUT", "1")


def _hidden(url) -> list[np.ndarray]:
    with open_cache(url) as c:
        return [s.hidden.copy() for s in c.iter_samples(readahead=0)]


def test_the_default_read_timeout_is_seconds_not_minutes():
    assert 0 < RetryPolicy().read_timeout <= 60


@pytest.mark.parametrize("target", [r"/manifest\.json$", r"/features\.zarr/hidden/zarr\.json$",
                                    r"/features\.zarr/hidden/c/1/0$"])
def test_a_server_that_stalls_after_its_headers_fails_in_seconds(cache, fast_failures, target):
    plan = FaultPlan().add(target, "stall", count=1000)
    with serve(cache, plan=plan) as (url, _):
        with pytest.raises(RemoteReadError, match="still failing after 2 attempts"):
            finishes(lambda: _hidden(url))


def test_stalls_that_clear_are_retried(cache, monkeypatch, made):
    monkeypatch.setenv("GENRECAL_RETRY_BACKOFF", "0.01")
    monkeypatch.setenv("GENRECAL_READ_TIMEOUT", "1")
    plan = FaultPlan().add(r"/manifest\.json$", "stall").add(r"/hidden/c/0/0$", "stall")
    with serve(cache, plan=plan) as (url, _):
        got = finishes(lambda: _hidden(url))
    assert plan.pending() == 0
    assert all(np.array_equal(a, b) for a, b in zip(got, _hidden(made)))


def _without_sizes(root: Path) -> None:
    """Make `root` a cache as genrecal wrote them before manifests listed file sizes."""
    m = json.loads((root / "manifest.json").read_text())
    del m["extra"]["sizes"]
    (root / "manifest.json").write_text(json.dumps(m))


def _listed_size(root: Path, rel: str) -> int:
    return json.loads((root / "manifest.json").read_text())["extra"]["sizes"][rel]


@pytest.mark.parametrize("target,rel", [(r"/manifest\.json$", None),
                                        (r"/features\.zarr/hidden/zarr\.json$", "features.zarr/hidden/zarr.json")])
@pytest.mark.parametrize("sizes", [True, False], ids=["sizes", "no-sizes"])
def test_an_endless_body_is_cut_at_the_files_limit(cache, fast_failures, target, rel, sizes):
    """manifest.json at 64 MiB; a zarr.json at its size in the manifest, or at 1 MiB in an older cache."""
    limit = 64 << 20 if rel is None else _listed_size(cache, rel) if sizes else 1 << 20
    if not sizes:
        _without_sizes(cache)
    plan = FaultPlan().add(target, "endless", count=1000)
    with serve(cache, plan=plan) as (url, _):
        with pytest.raises(CacheFormatError, match=f"larger than the {limit}-byte limit"):
            finishes(lambda: open_cache(url))
        faults = finishes(lambda: verify(url))
        assert faults and all(f"{limit}-byte limit" in f for f in faults), faults


def test_a_server_without_range_support_still_reads(cache, made):
    """`Accept-Ranges: none` (and Range ignored): whole files instead, never 'corrupt parquet'."""
    with serve(cache, accept_ranges="none") as (url, _):
        got = finishes(lambda: _hidden(url))
        with open_cache(url) as c:
            assert c[3].images == open_cache(made)[3].images
        assert finishes(lambda: verify(url)) == []
    assert all(np.array_equal(a, b) for a, b in zip(got, _hidden(made)))


def test_a_file_changed_during_a_run_stops_it(cache):
    """A shard replaced on the server while a run reads the cache (same size, valid chunks: another
    cache's bytes): the run stops with an error instead of training on them."""
    other = cache.parent / "other"
    shutil.copytree(cache, other)
    with serve(cache) as (url, _), open_cache(url) as c:
        it = c.iter_samples(readahead=0)
        next(it)  # shard 0 of every array read: its identity (ETag) is now known
        for rel in ("features.zarr/hidden/c/0/0", "samples.parquet"):
            src = cache / rel
            data = bytearray(src.read_bytes())
            data[len(data) // 2] ^= 0xFF
            src.write_bytes(bytes(data))  # a new version of the file
            st = src.stat()
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(CacheFormatError, match="changed on the server"):
            for _ in range(3):
                c[0]


def test_an_endless_head_download_is_cut_at_its_size_limit(cache, fast_failures):
    plan = FaultPlan().add(r"/teacher_head\.safetensors$", "endless", count=1000)
    with serve(cache, plan=plan) as (url, _), open_cache(url) as c:
        with pytest.raises(CacheFormatError, match="teacher_head.safetensors: larger than the"):
            finishes(lambda: c.head())


# ---- bodies longer than asked: every read of a cache file is bounded ------------------------------------

# What an endless answer may cost a reader: the bound of the file or range (kilobytes here) plus what
# the kernel buffers on loopback (up to its tcp_rmem + tcp_wmem maxima, 36 MiB here); far below the
# ENDLESS_CAP an unbounded reader takes before the server gives up.
SENT_BOUND = 64 << 20
CUT = r"larger than the \d+-byte limit for (this file|the range asked for)"
# a range answer whose Content-Range states another file size than the manifest lists is refused before its body
STATED = r"size mismatch \(the server says the file has 1099511627776 bytes, the manifest lists \d+\)"


@pytest.mark.parametrize("kind", ["endless", "endless206"])
@pytest.mark.parametrize("sizes", [True, False], ids=["sizes", "no-sizes"])
def test_an_endless_answer_to_a_shard_range_is_cut(cache, fast_failures, kind, sizes):
    """A shard's range request answered with a body that never ends: 200 with Range ignored (cut at
    the size the manifest lists, else the one the server declared, within what the manifest's layout
    allows), or 206 (refused for the file size it states when the manifest lists another, else cut at
    the range)."""
    if not sizes:
        _without_sizes(cache)
    plan = FaultPlan().add(r"/features\.zarr/hidden/c/1/0$", kind, count=1000)
    with serve(cache, plan=plan) as (url, handler):
        cut = STATED if sizes and kind == "endless206" else CUT
        with pytest.raises(CacheFormatError, match=r"hidden/c/1/0: " + cut):
            finishes(lambda: _hidden(url))
        assert plan.injected and handler.sent[0] < SENT_BOUND < ENDLESS_CAP


@pytest.mark.parametrize("kind,accept_ranges,what", [("endless", None, "this file"),
                                                      ("endless206", None, "the range asked for"),
                                                      ("endless", "none", "this file")])
def test_an_endless_answer_for_the_index_is_cut(cache, fast_failures, kind, accept_ranges, what):
    """samples.parquet: its block reads (206 that never ends: cut at the block) and the whole-file
    fallback for servers that ignore Range (cut at the size the server declared)."""
    plan = FaultPlan().add(r"/samples\.parquet$", kind, count=1000)
    with serve(cache, plan=plan, accept_ranges=accept_ranges) as (url, handler):
        with pytest.raises(CacheFormatError, match=rf"samples\.parquet: larger than the \d+-byte limit for {what}"):
            finishes(lambda: open_cache(url))
        assert plan.injected and handler.sent[0] < SENT_BOUND


@pytest.mark.parametrize("target", [r"/features\.zarr/hidden/c/1/0$", r"/teacher_head\.safetensors$",
                                    r"/samples\.parquet$"])
@pytest.mark.parametrize("kind", ["endless", "endless206"])
def test_mirror_and_pull_downloads_are_cut(cache, fast_failures, tmp_path, target, kind):
    """`pull` and the read-through mirror (`local_cache=`): a download is refused past the size the
    server declared / the range asked, and nothing of it is kept as a cache file."""
    def read_through() -> None:
        with open_cache(url, local_cache=tmp_path / "lc") as c:
            c.head()
            list(c.iter_samples(readahead=0))

    rel = target.strip("/$").replace("\\", "")
    name = rel.rsplit("/", 1)[-1]
    plan = FaultPlan().add(target, kind, count=1000)
    with serve(cache, plan=plan) as (url, handler):
        for run in (lambda: pull(url, tmp_path / "pulled"), read_through):
            handler.sent[0] = 0
            with pytest.raises(CacheFormatError, match=rf"{name}: " + (CUT if kind == "endless" else STATED)):
                finishes(run)
            assert handler.sent[0] < SENT_BOUND
    for folder in (tmp_path / "pulled", tmp_path / "lc"):
        assert not list(folder.rglob(rel)) and not list(folder.rglob("manifest.json"))  # only ever a .part


# ---- sizes in the manifest: every file read or downloaded at exactly its listed size ---------------------

def test_an_endless_index_without_a_declared_size_is_cut_at_its_listed_size(cache, fast_failures, tmp_path):
    """The case layout bounds could not cover (docs/security.md): a server that declares no size for
    samples.parquet and streams it without end. `pull`, the read-through mirror and a direct read stop at
    the size the manifest lists; what reaches the disk is at most that many bytes, and nothing becomes a
    cache file."""
    n = _listed_size(cache, "samples.parquet")
    pulled, mirror = tmp_path / "pulled", tmp_path / "lc"
    plan = FaultPlan().add(r"/samples\.parquet$", "undeclared", count=1000)
    cut = rf"samples\.parquet: larger than the {n}-byte limit for this file, its size in the manifest"
    with serve(cache, plan=plan) as (url, handler):
        for run in (lambda: pull(url, pulled), lambda: open_cache(url, local_cache=mirror),
                    lambda: open_cache(url)):
            handler.sent[0] = 0
            with pytest.raises(CacheFormatError, match=cut):
                finishes(run)
            assert handler.sent[0] < SENT_BOUND  # (kernel buffers; an unbounded reader takes ENDLESS_CAP)
    assert plan.injected
    for folder in (pulled, mirror):
        written = [p.stat().st_size for p in folder.rglob("samples.parquet*")]
        assert all(size <= n for size in written), (written, n)  # bytes on disk: never more than listed
        assert not list(folder.rglob("samples.parquet")) and not list(folder.rglob("manifest.json"))


def test_a_server_stating_or_sending_another_size_is_refused(cache, fast_failures, tmp_path):
    """A manifest listing one size and a server holding a file of another (a stale or tampered copy): every
    path names the URL, both sizes and the fix, before the file is hashed or parsed."""
    n = _listed_size(cache, "samples.parquet")
    m = json.loads((cache / "manifest.json").read_text())
    m["extra"]["sizes"]["samples.parquet"] = n + 7  # the server's copy is 7 bytes shorter than listed
    (cache / "manifest.json").write_text(json.dumps(m))
    stated = rf"/samples\.parquet: size mismatch \(the server says the file has {n} bytes, the manifest lists {n + 7}\)"
    with serve(cache) as (url, _):
        with pytest.raises(CacheFormatError, match=stated + ".*re-download the cache"):
            finishes(lambda: pull(url, tmp_path / "pulled"))
        with pytest.raises(CacheFormatError, match=stated):
            finishes(lambda: open_cache(url))
        faults = finishes(lambda: verify(url))
        assert any(f.startswith(f"samples.parquet: size mismatch (the server says the file has {n} bytes")
                   for f in faults), faults
    # a server that declares no size and sends the whole (short) file: refused for what it sent
    plan = FaultPlan().add(r"/samples\.parquet$", "undeclared-whole", count=1000)
    with serve(cache, plan=plan) as (url, _):
        with pytest.raises(CacheFormatError, match=rf"samples\.parquet: size mismatch \(the server sent {n} bytes, "
                                                   rf"the manifest lists {n + 7}\)"):
            finishes(lambda: pull(url, tmp_path / "pulled2"))
    pulled = tmp_path / "pulled2"
    assert not list(pulled.rglob("samples.parquet")) and not list(pulled.rglob("manifest.json"))


def test_an_older_cache_without_sizes_still_opens_verifies_and_pulls(cache, made, fast_failures, tmp_path):
    _without_sizes(cache)
    with serve(cache) as (url, _):
        with open_cache(url) as c:
            assert "sizes" not in c.manifest.extra and c.manifest.sizes == {}
            got = [s.hidden.copy() for s in c.iter_samples(readahead=0)]
        assert finishes(lambda: verify(url)) == []
        report = finishes(lambda: pull(url, tmp_path / "pulled"))
    assert report.fetched == report.files and verify(tmp_path / "pulled") == []
    assert all(np.array_equal(a, b) for a, b in zip(got, _hidden(made)))
