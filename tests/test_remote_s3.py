"""Publishing to and reading from a real S3-compatible server on 127.0.0.1 (moto's threaded server, as
s3fs's own tests use it): `push` (order, resume after SIGKILL, refusals, --replace), `open_cache`,
`verify`, `pull` and `genrecal-train --local-cache` over s3://, and faults injected by a TCP proxy
between s3fs and the server (tests/_proxy.py): retried, bounded, never hanging.

The endpoint reaches s3fs/botocore the way a user's would: `AWS_ENDPOINT_URL` in the environment (or
storage_options client_kwargs.endpoint_url, which the proxy tests use).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from _proxy import Proxy  # noqa: E402
from cli.cache_cli import app as cache_app  # noqa: E402
from genrecal_cache import open_cache  # noqa: E402
from genrecal_cache.format.manifest import CacheFormatError  # noqa: E402
from genrecal_cache.io.locate import open_fs  # noqa: E402
from genrecal_cache.io.pull import pull  # noqa: E402
from genrecal_cache.push import PushError, push  # noqa: E402
from genrecal_cache.io.retry import RemoteReadError  # noqa: E402
from genrecal_cache.verify import verify  # noqa: E402
from test_cache_format import D, V, make_samples, write_cache, synthetic_head  # noqa: E402
from test_remote import assert_same  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "caches"
FAST = {"genrecal_retry_backoff": 0.01}


@dataclass
class S3:
    endpoint: str
    port: int
    log: list[str]  # the server's request lines, in the order the answers completed ("PUT /caches/x HTTP/1.1" 200)

    def puts(self, prefix: str) -> list[str]:
        """Keys under `prefix` stored by PUT, in the order the server finished them."""
        out = []
        for line in list(self.log):
            parts = line.split('"')
            if len(parts) > 2 and parts[1].startswith(f"PUT /{BUCKET}/{prefix}/") and parts[2].split()[0] == "200":
                out.append(parts[1].split()[1][len(f"/{BUCKET}/{prefix}/"):].split("?")[0])
        return out


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    lines: list[str] = []
    werkzeug = logging.getLogger("werkzeug")
    handler = _Lines(lines)
    werkzeug.addHandler(handler)
    mp.setattr(werkzeug, "propagate", False)
    mp.setattr(werkzeug, "level", logging.INFO)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    try:
        yield S3(endpoint, port, lines)
    finally:
        werkzeug.removeHandler(handler)
        mp.undo()
        server.stop()


def synthetic_cache(path: Path, seed: int, n: int = 30) -> Path:
    head = synthetic_head(seed)
    write_cache(path, head, make_samples(head, n=n), shard_tokens=64, chunk_tokens=16)
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """Two different small multi-shard caches (no model needed)."""
    root = tmp_path_factory.mktemp("s3caches")
    return synthetic_cache(root / "a", seed=0), synthetic_cache(root / "b", seed=1)


def listed(cache: Path) -> set[str]:
    return set(json.loads((cache / "manifest.json").read_text())["checksums"])


def run_cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    code = "import sys; from cli.{0} import main; sys.argv[0] = '{1}'; main()"
    module, name = ("train_cli", "genrecal-train") if args[0] == "train" else ("cache_cli", "genrecal-cache")
    argv = list(args[1:]) if args[0] == "train" else list(args)
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code.format(module, name), *argv], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# ---- push, then read, verify, pull -------------------------------------------------------------------------

def test_push_publishes_the_manifest_last_and_the_cache_reads_verifies_and_pulls_as_the_local_one(
        s3, caches, tmp_path):
    a, _ = caches
    url = f"s3://{BUCKET}/pushed"
    result = CliRunner().invoke(cache_app, ["push", str(a), url, "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"verified at {url}: OK" in result.output
    order = s3.puts("pushed")
    assert sorted(order) == sorted(listed(a) | {"manifest.json"}) and order[-1] == "manifest.json"
    with open_cache(url) as remote, open_cache(a) as local:
        assert_same(local, remote)
    assert verify(url) == []
    out = tmp_path / "pulled"
    report = pull(url, out)
    assert report.fetched == len(listed(a)) and verify(out) == []
    assert (out / "manifest.json").read_bytes() == (a / "manifest.json").read_bytes()
    # pushed again: nothing is sent, everything is checked
    again = push(a, url)
    assert (again.uploaded, again.faults) == (0, []) and s3.puts("pushed") == order


def test_a_cache_in_parts_is_pushed_with_every_manifest_after_every_file(s3, tmp_path):
    head = synthetic_head(2)
    samples = make_samples(head, n=20)
    local = tmp_path / "parts"
    for i in range(2):  # as `extract --num-shards 2` lays them out
        write_cache(local / f"part-{i:05d}-of-00002", head, samples[i::2], shard_tokens=64, chunk_tokens=16)
    url = f"s3://{BUCKET}/parts"
    assert push(local, url).faults == []
    order = s3.puts("parts")
    manifests = [i for i, key in enumerate(order) if key.endswith("/manifest.json")]
    assert len(manifests) == 2 and min(manifests) == len(order) - 2  # both manifests after every other file
    with open_cache(url) as remote, open_cache(local) as mine:
        assert type(remote).__name__ == "MultiPartCache" and len(remote) == 20
        for a, b in zip(mine.iter_samples(status="all"), remote.iter_samples(status="all"), strict=True):
            assert a.id == b.id and (a.hidden == b.hidden).all()
    assert verify(url) == []


def test_push_refuses_another_cache_and_a_replaced_cache_stops_its_readers(s3, caches, tmp_path):
    a, b = caches
    url = f"s3://{BUCKET}/replaced"
    assert push(a, url).faults == []
    with pytest.raises(PushError, match=r"already holds a different cache \(manifest\.json differs.*--replace"):
        push(b, url)
    result = CliRunner().invoke(cache_app, ["push", str(b), url, "--quiet"])
    assert result.exit_code == 2 and "already holds a different cache" in result.output
    with open_cache(url) as reader, open_cache(url, local_cache=tmp_path / "lc") as mirrored:
        first = reader[0].hidden.copy()
        assert (mirrored[0].hidden == first).all()
        report = push(b, url, replace=True)
        assert report.faults == [] and report.uploaded > 0
        # readers that opened the old cache must not mix it with the new files under the same names
        for r in (reader, mirrored):
            with pytest.raises(CacheFormatError, match=r"changed|size mismatch|sha256|unreadable|crc"):
                [s.hidden for s in r.iter_samples(status="all")]
    with open_cache(url) as now, open_cache(b) as local:
        assert_same(local, now)
    # a location holding files that are not a cache's is refused too, then cleared by --replace
    fs, root, _ = open_fs(f"s3://{BUCKET}/other")
    fs.pipe_file(f"{root}/notes.txt", b"not a cache file")
    with pytest.raises(PushError, match=r"1 file\(s\) that are not part of this cache \(e\.g\. notes\.txt\)"):
        push(a, f"s3://{BUCKET}/other")
    assert push(a, f"s3://{BUCKET}/other", replace=True).faults == []


def test_a_push_killed_half_way_resumes_and_no_reader_sees_a_manifest_early(s3, caches, tmp_path):
    """The upload runs in its own process through a slow link and is SIGKILLed after a few files; what
    it left is no cache (no manifest); the re-run keeps what arrived intact, completes and verifies. A
    reader polling the store throughout never finds a manifest before every file it lists."""
    a, _ = caches
    url, files = f"s3://{BUCKET}/killed", listed(a)
    fs, root, _ = open_fs(url)
    seen_early: list[str] = []
    stop = threading.Event()

    def poll() -> None:  # a reader: whenever a manifest is there, every file it lists must be there too
        while not stop.is_set():
            fs.invalidate_cache()
            try:
                if fs.exists(f"{root}/manifest.json"):
                    fs.invalidate_cache()
                    present = {p[len(root) + 1:] for p in fs.find(root)}
                    seen_early.extend(sorted(files - present))
                    return
            except Exception:  # noqa: BLE001 - the store is busy; look again
                pass
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with Proxy(s3.port, delay=0.05) as proxy:
        proxy.plan("slow", 10**6)
        upload = run_cli("push", str(a), url, "--workers", "2", "--quiet", env={"AWS_ENDPOINT_URL": proxy.url})
        deadline = time.monotonic() + 120
        while len(s3.puts("killed")) < 6 and upload.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        upload.send_signal(signal.SIGKILL)
        output = upload.communicate(timeout=30)[0]
        assert upload.returncode == -signal.SIGKILL, output
    arrived = s3.puts("killed")
    assert 6 <= len(arrived) < len(files) and "manifest.json" not in arrived
    with pytest.raises(CacheFormatError, match="manifest.json: missing, so the cache is incomplete"):
        open_cache(url)
    assert "missing, so the cache is incomplete" in verify(url)[0]
    report = push(a, url)
    assert report.faults == [] and report.files - report.uploaded >= len(set(arrived)) - 2  # two may be cut short
    order = s3.puts("killed")
    assert order[-1] == "manifest.json" and order.count("manifest.json") == 1
    poller.join(timeout=30)
    stop.set()
    assert seen_early == []
    with open_cache(url) as remote, open_cache(a) as local:
        assert_same(local, remote)


# ---- faults between s3fs and the server ------------------------------------------------------------

def test_dropped_and_delayed_answers_are_retried_and_a_stalled_store_fails_in_bounded_time(s3, caches, tmp_path):
    a, _ = caches
    url = f"s3://{BUCKET}/faults"
    with Proxy(s3.port, delay=0.5) as proxy:
        options = {**FAST, "client_kwargs": {"endpoint_url": proxy.url}}
        proxy.plan("drop", 3).plan("delay", 2)
        assert push(a, url, options).faults == []
        proxy.plan("drop", 3).plan("delay", 2)
        with open_cache(url, options) as remote, open_cache(a) as local:
            assert_same(local, remote)
        proxy.plan("drop", 2)
        assert pull(url, tmp_path / "pulled", options).fetched == len(listed(a))
        assert proxy.pending() == 0 and proxy.injected == 12
        # a store that accepts connections and never answers: each attempt times out, then a clear error
        proxy.plan("stall", 10**6)
        started = time.monotonic()
        stalled = {**options, "genrecal_retries": 1, "genrecal_read_timeout": 1}
        with pytest.raises(RemoteReadError, match=rf"{url}/manifest\.json: still failing after 2 attempts.*timeout"):
            open_cache(url, stalled)
        with pytest.raises(RemoteReadError, match="still failing after 2 attempts"):
            push(a, f"{url}-2", stalled)
        assert time.monotonic() - started < 40
    assert verify(tmp_path / "pulled") == []


# ---- training from s3:// -------------------------------------------------------------------------------

def test_training_from_s3_with_a_local_cache_is_bit_identical_to_the_local_cache(s3, train_cache, student_dir,
                                                                                  tmp_path):
    url = f"s3://{BUCKET}/train"
    assert push(train_cache, url).faults == []
    flags = ["--student", str(student_dir), "--stages", "1", "--max-steps", "3", "--batch-size", "4", "--device",
             "cpu", "--checkpoint-every", "1000", "--lr", "3e-3", "--prefetch", "1"]
    runs = {"local": ["--cache", str(train_cache)],
            "s3": ["--cache", url, "--local-cache", str(tmp_path / "lc")]}
    for name, where in runs.items():
        proc = run_cli("train", *where, *flags, "--out", str(tmp_path / name))
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
    timing = ("data_wait_frac", "tokens_per_s")  # measured durations: the rest must be equal
    metrics = {n: [{k: v for k, v in json.loads(line).items() if k not in timing}
                   for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in runs}
    assert metrics["s3"] == metrics["local"] and len(metrics["local"]) == 3
    weights = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local" / "final").rglob("*.safetensors"))
    assert weights
    for rel in weights:
        assert (tmp_path / "s3" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel
    mirror = [d for d in (tmp_path / "lc").iterdir() if d.name != ".locks"]  # the s3 run read its local copy
    assert len(mirror) == 1 and (mirror[0] / "teacher_head.safetensors").is_file()
