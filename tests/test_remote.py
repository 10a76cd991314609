"""Remote caches over a real HTTP server on 127.0.0.1 (tests/_http.py): retries on injected faults,
clear errors when they run out, the local read-through cache, `pull`, the CLI, and a full stage-1
training run streamed from the server.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _http import FaultPlan, serve
from cli.cache_cli import app as cache_app
from genrecal_cache.format.manifest import CacheFormatError
from genrecal_cache import open_cache
from genrecal_cache.reader import TeacherCache
from genrecal_cache.io.pull import pull
from genrecal_cache.io.remote import url_to_fs
from genrecal_cache.io.retry import RemoteReadError, RetryPolicy, is_transient
from genrecal_cache.verify import verify
from genrecal_train.config import TrainConfig
from genrecal_train.trainer import train
from test_cache_format import D, V, make_samples, write_cache, synthetic_head

FAST = {"genrecal_retries": 4, "genrecal_retry_backoff": 0.01}  # storage_options: quick retries in tests
FIELDS = ("token_ids", "answer_mask", "hidden", "topk_ids", "topk_logprobs")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A small multi-shard bf16 cache with synthetic features (no model needed)."""
    head = synthetic_head()
    path = tmp_path_factory.mktemp("remote") / "cache"
    write_cache(path, head, make_samples(head, n=30), shard_tokens=64, chunk_tokens=16)
    return path


def assert_same(local: TeacherCache, remote: TeacherCache) -> None:
    assert remote.manifest == local.manifest and remote.index.equals(local.index)
    pairs = list(zip(local.iter_samples("shuffled", seed=3, status="all"),
                     remote.iter_samples("shuffled", seed=3, status="all"), strict=True))
    assert len(pairs) == len(local)
    for a, b in pairs:
        assert (a.id, a.messages, a.images, a.extra) == (b.id, b.messages, b.images, b.extra)
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    torch.testing.assert_close(remote.head().lm_head_weight, local.head().lm_head_weight, rtol=0, atol=0)


def corrupt_copy(cache_dir: Path, out: Path) -> Path:
    """A copy of the cache with one byte of the shard hidden/c/1/0 flipped (its manifest unchanged)."""
    shutil.copytree(cache_dir, out)
    shard = out / "features.zarr" / "hidden" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    return out


def faults() -> FaultPlan:
    """Every kind of read the reader makes fails at first: manifest, parquet, zarr metadata, shards, head."""
    return (FaultPlan().add(r"/manifest\.json$", "503", 2).add(r"samples\.parquet", "drop").add(r"samples\.parquet", "truncate")
            .add(r"token_ids/zarr\.json", "drop").add(r"hidden/c/0/0", "503", 2).add(r"hidden/c/1/0", "truncate")
            .add(r"topk_ids/c/2/0", "reset").add(r"answer_mask/c/0$", "500").add(r"teacher_head", "reset")
            .add(r"teacher_head", "503"))


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
def test_transient_faults_are_retried_and_data_is_identical(cache_dir, ranges):
    plan = faults()
    total = plan.pending()
    with serve(cache_dir, ranges=ranges, plan=plan) as (url, handler), open_cache(url, FAST) as remote:
        assert_same(open_cache(cache_dir), remote)
        assert plan.pending() == 0 and plan.injected == total  # every fault was hit, and survived
        assert verify(url, FAST) == []


def test_exhausted_retries_raise_a_clear_error_naming_the_url(cache_dir):
    plan = FaultPlan().add(r"samples\.parquet", "503", 1000)
    with serve(cache_dir, plan=plan) as (url, _):
        with pytest.raises(RemoteReadError, match=rf"{url}/samples\.parquet.*still failing after 3 attempts.*503"):
            open_cache(url, {"genrecal_retries": 2, "genrecal_retry_backoff": 0.01})
        result = CliRunner().invoke(cache_app, ["info", url], env={"GENRECAL_RETRIES": "1",
                                                                   "GENRECAL_RETRY_BACKOFF": "0.01"})
        assert result.exit_code == 2 and "still failing after 2 attempts" in result.output
    # nothing listening: connection refused is transient too, then a clear error
    with pytest.raises(RemoteReadError, match=rf"{url}/manifest\.json: still failing after 2 attempts"):
        open_cache(url, {"genrecal_retries": 1, "genrecal_retry_backoff": 0.01})


def test_permanent_errors_are_not_retried(cache_dir):
    plan = FaultPlan().add(r"nothing-here", "503", 0)
    with serve(cache_dir, plan=plan) as (url, handler):
        with pytest.raises(CacheFormatError, match="does not exist|missing"):
            open_cache(f"{url}/nothing-here", FAST)
        assert len([r for r in handler.requests if "nothing-here/manifest.json" in r[1]]) <= 2  # 404: no retries
    assert not is_transient(FileNotFoundError("x")) and is_transient(ConnectionResetError())


def test_retry_settings_from_environment_and_options(monkeypatch):
    monkeypatch.setenv("GENRECAL_RETRIES", "7")
    policy, rest = RetryPolicy.from_options({"genrecal_retry_backoff": 0.1, "anon": True})
    assert (policy.retries, policy.backoff, rest) == (7, 0.1, {"anon": True})
    monkeypatch.setenv("GENRECAL_RETRIES", "many")
    with pytest.raises(ValueError, match="GENRECAL_RETRIES"):
        RetryPolicy.from_options(None)


@pytest.mark.parametrize("url,package", [("s3://bucket/cache", "s3fs"), ("gs://bucket/cache", "gcsfs")])
def test_cloud_urls_say_which_package_is_missing(url, package):
    pytest.importorskip("fsspec")
    try:
        __import__(package)
        pytest.skip(f"{package} is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=rf"needs the `{package}` package: pip install {package}"):
        open_cache(url)
    with pytest.raises(ImportError, match=package):
        url_to_fs(url)


def test_local_cache_reads_each_file_once_and_verifies_it(cache_dir, tmp_path):
    local = open_cache(cache_dir)
    lc = tmp_path / "lc"
    with serve(cache_dir, plan=faults()) as (url, handler):
        with open_cache(url, FAST, local_cache=lc) as remote:
            assert_same(local, remote)
        files = {f"/{rel}" for rel in local.manifest.checksums}
        first = [r for r in handler.requests if r[1] != "/manifest.json"]
        assert {r[1] for r in first} <= files
        handler.requests.clear()
        with open_cache(url, FAST, local_cache=lc) as again:  # second epoch / run: disk only
            assert_same(local, again)
        assert [r[1] for r in handler.requests] == ["/manifest.json"]
    # a remote file that does not match the manifest is refused, and never stored
    bad = corrupt_copy(cache_dir, tmp_path / "bad")
    with serve(bad) as (url, _), open_cache(url, FAST, local_cache=tmp_path / "lc2") as remote:
        with pytest.raises(CacheFormatError, match=r"hidden/c/1/0: downloaded file has sha256 .* the manifest says"):
            list(remote.iter_samples())
    # only the corrupt file is kept out: valid chunks fetched alongside it (read-ahead) may be stored
    assert not list((tmp_path / "lc2").rglob("hidden/c/1/0*"))


@pytest.mark.parametrize("local_cache", [False, True], ids=["http", "local-cache"])
def test_a_failed_read_cancels_its_other_requests_and_nothing_is_sent_after_close(cache_dir, tmp_path, local_cache):
    """One shard is corrupt while other shards of the same read keep failing with 503 (a retry every
    ~10 ms for seconds): the first error cancels the retrying siblings. Over plain HTTP
    no request starts once the error is raised (the cancelled requests are awaited); through the
    local cache (downloads on threads) none once `close()` has returned. Requests are counted where
    the client starts them (aiohttp's trace hooks) and where the server receives them."""
    bad = corrupt_copy(cache_dir, tmp_path / "bad")
    started: list[str] = []

    async def on_request_start(session, ctx, params) -> None:
        started.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    options = {"genrecal_retries": 1000, "genrecal_retry_backoff": 0.01, "genrecal_retry_max_backoff": 0.01,
               "client_kwargs": {"trace_configs": [trace]}}
    # siblings of the same read: another shard of the same array (zarr's own fan-out) and another array
    plan = FaultPlan().add(r"/features\.zarr/(hidden/c/0/0|token_ids/c/0)$", "503", 10**6)
    with serve(bad, plan=plan) as (url, handler):
        with open_cache(url, options, local_cache=tmp_path / "lc" if local_cache else None) as c:
            with pytest.raises(CacheFormatError, match="downloaded file has sha256" if local_cache else "unreadable"):
                list(c.iter_samples(readahead=0))
            assert plan.injected  # the siblings were retrying when the error came
            at_error = len(started)
            time.sleep(0.5)  # before the fix, the siblings' retries went on here every ~10 ms
            if not local_cache:  # cancelled and awaited before the error was raised
                assert len(started) == at_error, started[at_error:]
        at_close = len(started)
        time.sleep(1.0)  # ... and here, after close() (and after the server was gone)
        assert len(started) == at_close, started[at_close:]
        assert len(handler.requests) <= len(started)  # the server saw nothing the client had not started by then
    assert not list((tmp_path / "lc").rglob("hidden/c/1/0"))


def test_pull_is_verified_and_resumable(cache_dir, tmp_path):
    out = tmp_path / "pulled"
    with serve(cache_dir, plan=faults()) as (url, handler):
        result = CliRunner().invoke(cache_app, ["pull", url, str(out), "--quiet"],
                                    env={"GENRECAL_RETRY_BACKOFF": "0.01"})
        assert result.exit_code == 0, result.output
        assert verify(out) == [] and (out / "manifest.json").read_text() == (cache_dir / "manifest.json").read_text()
        # interrupted: one file gone, another half-downloaded; a re-run fetches only what is missing
        (out / "manifest.json").unlink()
        (out / "teacher_head.safetensors").unlink()
        shard = "features.zarr/hidden/c/2/0"
        full = (cache_dir / shard).read_bytes()
        (out / shard).unlink()
        (out / f"{shard}.part").write_bytes(full[: len(full) // 2])
        handler.requests.clear()
        report = pull(url, out, FAST)
        assert (report.fetched, report.bytes) == (2, (cache_dir / "teacher_head.safetensors").stat().st_size
                                                  + len(full) - len(full) // 2)
        assert ("GET", f"/{shard}", f"bytes={len(full) // 2}-{len(full) - 1}") in handler.requests
        assert verify(out) == []
    assert_same(open_cache(cache_dir), open_cache(out))


def test_pull_and_push_to_a_file_or_under_one_are_one_line(cache_dir, tmp_path):
    """A destination where a file is (a typo, a stale download), or under one: one line naming it, status 2, the
    file untouched (was a FileExistsError / NotADirectoryError traceback)."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for dest, says in [(afile, f"{afile}: a file is there, not a folder"),
                       (afile / "sub", f"{afile / 'sub'}: {afile} is a file, not a folder")]:
        for command, verb in (["pull", "pull into a folder"], ["push", "push to a folder"]):
            r = CliRunner().invoke(cache_app, [command, str(cache_dir), str(dest), "--quiet"])
            out = " ".join(r.output.split())
            assert r.exit_code == 2 and f"error: {says}; {verb}" in out and "Traceback" not in out, (command, out)
    r = CliRunner().invoke(cache_app, ["info", str(afile)])  # and read as a cache: not a cache folder
    assert r.exit_code == 2 and f"error: {afile}: not a cache folder ({afile}: a file is there, not a folder)" \
        in " ".join(r.output.split()), r.output
    assert afile.read_text() == "keep me"


def test_info_and_verify_cli_over_http(cache_dir, tmp_path):
    runner = CliRunner()
    with serve(cache_dir, plan=faults()) as (url, _):
        result = runner.invoke(cache_app, ["info", url, "--json"], env={"GENRECAL_RETRY_BACKOFF": "0.01"})
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output)
        assert summary["url"] == url and summary["counts"]["samples"] == 30
        result = runner.invoke(cache_app, ["info", url, "--local-cache", str(tmp_path / "lc")],
                               env={"GENRECAL_RETRY_BACKOFF": "0.01"})
        assert result.exit_code == 0 and "samples      30" in result.output
        result = runner.invoke(cache_app, ["verify", url], env={"GENRECAL_RETRY_BACKOFF": "0.01"})
        assert result.exit_code == 0 and result.output.strip().endswith(f"{url}: OK")


def test_info_takes_stored_sizes_from_the_manifest_not_a_request_per_file(cache_dir):
    from genrecal_cache.info import summarize

    files = open_cache(cache_dir).manifest.checksums
    on_disk = sum((cache_dir / rel).stat().st_size for rel in files)
    with serve(cache_dir) as (url, handler), open_cache(url) as remote:
        handler.requests.clear()
        assert summarize(remote)["bytes_total"] == on_disk
        assert not [r for r in handler.requests if "/c/" in r[1]]  # no request to any shard file


# ---- acceptance: a full stage-1 run from a cache served on 127.0.0.1 ------------------------------

def test_full_stage1_run_from_a_cache_served_over_http(train_cache, student_dir, tmp_path):
    local = open_cache(train_cache)
    n_ok = local.manifest.counts["ok"]
    plan = (FaultPlan().add(r"hidden/c/0", "503", 2).add(r"samples\.parquet", "drop").add(r"teacher_head", "truncate")
            .add(r"topk_logprobs/c/0", "reset"))
    with serve(train_cache, plan=plan) as (url, handler):
        cfg = TrainConfig(cache=url, student=str(student_dir), out=str(tmp_path / "run"), stages=[1], epochs=1.0,
                          batch_size=4, device="cpu", prefetch=2, checkpoint_every=1000, lr=3e-3)
        final = train(cfg)
        assert plan.pending() == 0
        ranged = [r for r in handler.requests if r[1].startswith("/features.zarr/hidden/c/") and r[2]]
        assert ranged, "shards were not read by byte range"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, math.ceil(n_ok / 4) + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    seen = sorted(i for r in records for i in r["sample_indices"])
    assert len(seen) == n_ok  # one epoch: every ok sample once, streamed from the server
    assert (final / "config.json").exists()
    assert (tmp_path / "run" / "checkpoints" / f"stage1-step{len(records):07d}").is_dir()
