"""Issue 23, cache side: runs that stop early. A full disk (for real: RLIMIT_FSIZE makes writes past the
limit fail with EFBIG) and SIGINT/SIGTERM end `extract` with one line naming the folder, what is kept and
the command that resumes; `merge` takes the folder lock, and a merge killed half way is finished by
running it again (readers and the writer name merge, not extract, for its half output)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from genrecal_cache import open_cache
from genrecal_cache.format.manifest import CacheFormatError
from genrecal_cache.verify import verify

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.cache_cli"]


def _run(args: list[str], env: dict | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    """`genrecal-cache ARGS` in a fresh process; `fsize`: its largest writable file in bytes (RLIMIT_FSIZE)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, **(env or {})}, preexec_fn=limit if fsize else None)


def _one_line(r: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of stderr (progress bars share it); never a traceback."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    return line


def _extract_args(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--backend",
            "transformers", "--topk", "4", "--batch-tokens", "1", "--hidden-codec", "fp32", *extra]


def _committed(out: Path) -> int:
    try:
        return json.loads((out / "_progress.json").read_bytes())["counts"]["samples"]
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def data100(tmp_path_factory) -> Path:
    """100 demo samples (~5000 teacher tokens)."""
    from genrecal_cache.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data100"), n=100, seed=5)


def test_a_full_disk_is_one_line_and_the_same_command_resumes_to_the_uninterrupted_cache(teacher_dir, data100,
                                                                                         tmp_path):
    # fp32 shards of 2048 tokens are ~500 KB, the head ~430 KB: a 470 KB file limit lets the head be written
    # and the next shard fail; 300 KB fails the head itself (what a resume rewrites first)
    args = ["--shard-tokens", "2048", "--commit-seconds", "0", "--context", "full", "--topk-rows", "all"]
    ref = tmp_path / "ref"
    assert _run(_extract_args(teacher_dir, data100, ref, *args)).returncode == 0
    head = (ref / "teacher_head.safetensors").stat().st_size
    shard = max(p.stat().st_size for p in (ref / "features.zarr" / "hidden").rglob("c/*/*"))  # a full one
    assert 300_000 < head < 470_000 < shard, (head, shard)

    out = tmp_path / "cache"
    cmd = _extract_args(teacher_dir, data100, out, *args)
    r = _run(cmd, env={"GENRECAL_KILL_AT": "committed:1"})  # a first run got one shard committed
    assert r.returncode == -9, r.stderr[-3000:]
    kept = _committed(out)
    assert kept > 0
    for fsize in (470_000, 300_000):  # the next shard does not fit; then not even the head (a resume's first write)
        r = _run(cmd, fsize=fsize)
        assert r.returncode == 2, r.stderr[-3000:]
        line = _one_line(r)
        assert f"{out}: the disk is full (File too large) while writing the extraction" in line, line
        assert f"the {kept} sample(s) committed are kept" in line, line
        assert "run the same command again to resume: genrecal-cache extract --teacher" in line, line
        assert _committed(out) == kept and not (out / "manifest.json").exists()
    r = _run(cmd)  # space again: the same command finishes the cache
    assert r.returncode == 0, r.stderr[-3000:]
    assert verify(out) == []
    m_ref, m_out = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert m_out["checksums"] == m_ref["checksums"] and m_out["counts"] == m_ref["counts"]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _signal_after_first_commit(p: subprocess.Popen, out: Path, signum: int, before: int = 0) -> tuple[int, str]:
    """Send `signum` once a commit beyond `before` samples is in place; the exit status and stderr."""
    deadline = time.monotonic() + 120
    while _committed(out) <= before and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signum)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def test_sigterm_and_sigint_to_extract_print_one_line_and_the_same_command_resumes(teacher_dir, data100, tmp_path):
    out = tmp_path / "cache"
    args = _extract_args(teacher_dir, data100, out, "--shard-tokens", "64", "--commit-seconds", "0")
    code, err = _signal_after_first_commit(_start(args), out, signal.SIGTERM)
    assert code == 143, err[-3000:]
    line = _one_line(subprocess.CompletedProcess([], code, "", err))
    kept = _committed(out)
    assert f"{out}: extraction interrupted (SIGTERM) at sample " in line, line
    assert f"the {kept} sample(s) committed are kept" in line and kept > 0, line
    assert "run the same command again to resume: genrecal-cache extract --teacher" in line, line
    code, err = _signal_after_first_commit(_start(args), out, signal.SIGINT, before=kept)
    assert code == 130, err[-3000:]
    line = _one_line(subprocess.CompletedProcess([], code, "", err))
    assert "extraction interrupted (SIGINT) at sample " in line and f"committed are kept" in line, line
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "100 samples (100 ok, 0 error)" in r.stdout and verify(out) == []


@pytest.fixture(scope="module")
def parts(teacher_dir, tmp_path_factory) -> Path:
    """A cache written in two parts (40 demo samples, bf16, 64-token shards)."""
    from genrecal_cache.demo_data import write_demo_dataset
    from genrecal_cache.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("parts")
    data = write_demo_dataset(root / "data", n=40, seed=6)
    for i in range(2):
        extract(ExtractConfig(teacher=str(teacher_dir), data=str(data), out=str(root / "cache"),
                              backend="transformers", topk=4, hidden_codec="bf16", shard_tokens=64, progress=False,
                              num_shards=2, shard_index=i))
    return root / "cache"


def test_a_second_merge_into_the_same_out_is_refused_with_one_line(parts, tmp_path):
    out = tmp_path / "merged"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from genrecal_cache.journal import DirLock
        DirLock({str(out)!r}, what="merge").acquire()
        print("locked", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        r = _run(["merge", str(parts), "--out", str(out)])
        assert r.returncode == 2, r.stderr[-3000:]
        line = _one_line(r)
        assert f"{out} is being written by another merge (pid {holder.pid} on " in line, line
        assert time.monotonic() - t0 < 60 and sorted(p.name for p in out.iterdir()) == ["_lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_merge_killed_half_way_is_finished_by_running_it_again(parts, tmp_path):
    ref = tmp_path / "ref"
    assert _run(["merge", str(parts), "--out", str(ref)]).returncode == 0
    out = tmp_path / "merged"
    cmd = ["merge", str(parts), "--out", str(out)]
    r = _run(cmd, env={"GENRECAL_KILL_AT": "flush-array:12"})  # killed while writing its shards
    assert r.returncode == -9, r.stderr[-3000:]
    assert (out / "features.zarr").exists() and not (out / "manifest.json").exists()
    # what a reader says about the half output: a merge, and the command that finishes it
    with pytest.raises(CacheFormatError) as e:
        open_cache(out)
    msg = str(e.value)
    assert "a merge is running here or was interrupted" in msg and "extract" not in msg.replace(str(out), ""), msg
    assert f"run `genrecal-cache merge {parts} --out {out}` again to resume it" in msg, msg
    # the writer's refusal (a writer not asked to resume) gives the same advice
    from genrecal_cache.writer import CacheWriter, CacheWriteError

    src = open_cache(parts)
    m = src.manifest
    with pytest.raises(CacheWriteError) as e:
        CacheWriter(out, hidden_size=m.hidden_size, vocab_size=m.vocab_size, topk=m.topk, hidden_codec=m.hidden_codec,
                    teacher=dict(m.teacher), tokenizer_sha256=m.tokenizer_sha256,
                    chat_template_sha256=m.chat_template_sha256, head=src.head("cpu"), command="x")
    assert f"run the same command again: genrecal-cache merge {parts} --out {out}" in str(e.value), str(e.value)
    assert "extract" not in str(e.value).replace(str(out), "")
    r = _run(cmd, fsize=300_000)  # a full disk (the head does not fit): one line, the half output kept
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_line(r)
    assert f"{out}: the disk is full (File too large) while writing the merge" in line, line
    assert f"run the same command again to resume: genrecal-cache merge {parts} --out {out}" in line, line
    r = _run(cmd)  # the same merge again: finishes the cache
    assert r.returncode == 0, r.stderr[-3000:]
    assert "40 samples (40 ok, 0 error)" in r.stdout and verify(out) == []
    m_ref, m_out = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert m_out["checksums"] == m_ref["checksums"]
    r = _run(cmd)  # and once more: the cache is complete, said in one line
    assert r.returncode == 2 and "already holds a complete cache" in _one_line(r)
