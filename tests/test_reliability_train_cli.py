"""Issue 23, training: one run per --out (a second is refused naming the holder, a dead holder's lock is
taken over), a resume refuses another cache or other settings, config values and files are checked before
anything is written, a full disk and SIGINT/SIGTERM end with one line (where, what was saved, the command
that resumes). Every case runs `genrecal-train` for real, as a user would."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _caches import rewrite_cache

from genrecal_cache import open_cache
from genrecal_cache.writer import SampleArrays
from genrecal_train.config import TrainConfig
from genrecal_train.trainer import train

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.train_cli"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _args(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return ["--cache", str(cache), "--student", str(student), "--out", str(out), "--device", "cpu", "--stages", "1",
            "--batch-size", "2", "--prefetch", "2", *extra]


def _run(args: list[str], preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec_fn)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _one_line(r: subprocess.CompletedProcess | str) -> str:
    """The one line the run ended with (progress bars share stderr); never a traceback."""
    err = r if isinstance(r, str) else r.stderr
    assert "Traceback" not in err, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def _wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, f"ended (rc {proc.returncode}) before step {n}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {n} after {timeout} s"
        time.sleep(0.02)


def _steps(out: Path) -> list[tuple[int, int]]:
    return [(r["stage"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _resume_cli(line: str, *extra: str) -> list[str]:
    """The printed resume command, run from this checkout (`genrecal-train` is `python -m cli.train_cli`)."""
    cmd = shlex.split(line.split("resume with: ", 1)[1])
    assert cmd[0] == "genrecal-train" and cmd[-1] == "--resume", cmd
    return [*cmd[1:], *extra]


# ---- 1. one run per --out --------------------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, train_cache,
                                                                                       student_dir):
    out = tmp_path / "run"
    first = _start(_args(train_cache, student_dir, out, "--max-steps", "500", "--checkpoint-every", "1000"))
    try:
        _wait_for_steps(first, out / "metrics.jsonl", 1)
        first.send_signal(signal.SIGSTOP)  # paused, it still holds the folder (and leaves the CPU to the others)
        config = (out / "config.json").read_text()
        second = _run(_args(train_cache, student_dir, out, "--max-steps", "2", "--seed", "1"))
        assert second.returncode == 2, second.stderr[-3000:]
        line = _one_line(second)
        assert f"{out} is being written by another training run (pid {first.pid} on {socket.gethostname()}, since " \
               in line and "--out" in line, line
        assert (out / "config.json").read_text() == config  # the second run wrote nothing there
        assert first.poll() is None
    finally:
        first.kill()  # SIGKILL (stopped or not): the holder dies without releasing anything
        first.communicate(timeout=60)
    assert (out / "_lock").exists()
    third = _run(_args(train_cache, student_dir, out, "--max-steps", "1"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert _steps(out) == [(1, 1)] and json.loads((out / "config.json").read_text())["max_steps"] == 1


# ---- 2. a resume continues the same run on the same inputs -------------------------------------------

def _rewritten(src: Path, out: Path, topk: int) -> Path:
    """The same samples and features with only the first `topk` teacher logprobs (as `extract --topk` writes)."""
    return rewrite_cache(src, out, lambda s: SampleArrays(
        token_ids=s.token_ids, answer_mask=s.answer_mask, hidden=s.hidden,
        topk_ids=np.ascontiguousarray(s.topk_ids[:, :topk]),
        topk_logprobs=np.ascontiguousarray(s.topk_logprobs[:, :topk])), topk=topk)


@pytest.fixture()
def stopped_run(tmp_path, train_cache, student_dir) -> tuple[Path, Path]:
    """A run on a copy of the cache, as a kill after its step-2 checkpoint (of 3) leaves it: (cache, out)."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(train_cache, cache)
    train(TrainConfig(cache=str(cache), student=str(student_dir), out=str(out), device="cpu", stages=[1],
                      max_steps=3, checkpoint_every=2, batch_size=2, prefetch=2))
    (out / "checkpoints" / "latest").write_text("stage1-step0000002")
    return cache, out


@pytest.mark.parametrize("change", ["other-data", "other-topk"])
def test_resume_on_another_cache_at_the_same_path_is_refused_naming_what_differs(change, stopped_run, train_cache,
                                                                                 heldout_cache, student_dir):
    cache, out = stopped_run
    shutil.rmtree(cache)
    if change == "other-data":  # extracted again at the same path, from other data
        shutil.copytree(heldout_cache, cache)
        words = "counts.samples 32 (this cache: 12)"
    else:  # extracted again with another --topk
        _rewritten(train_cache, cache, topk=2)
        words = f"topk {open_cache(train_cache).manifest.topk} (this cache: 2)"
    r = _run(_args(cache, student_dir, out, "--max-steps", "3", "--checkpoint-every", "2", "--resume"))
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_line(r)
    assert f"stage1-step0000002 was trained on another cache than {cache}: " in line and words in line, line
    assert "Give --cache the cache it trained on, or start a new --out" in line
    assert _steps(out) == [(1, 1), (1, 2), (1, 3)]  # nothing of the refused run was logged


def test_resume_with_other_settings_is_refused_and_the_same_cache_moved_elsewhere_continues(stopped_run, tmp_path,
                                                                                          student_dir):
    cache, out = stopped_run
    r = _run(_args(cache, student_dir, out, "--max-steps", "3", "--checkpoint-every", "2", "--resume",
                   "--lr", "0.01", "--w-kl", "0.5"))
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_line(r)
    assert "stage1-step0000002 is stage 1 step 2 of a run with --lr 0.0001 (this run: 0.01), --w-kl 1.0 " \
           "(this run: 0.5)" in line, line
    moved = tmp_path / "moved cache"  # the identity is the cache's content, not its path
    cache.rename(moved)
    r = _run(_args(moved, student_dir, out, "--max-steps", "3", "--checkpoint-every", "2", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(out) == [(1, 1), (1, 2), (1, 3)]


# ---- 4. config files and values ------------------------------------------------------------------------

CONFIG_CASES = {  # name: (file name, its text or None for no file, extra flags, words of the one line)
    "yaml-text-for-an-int": ("c.yaml", 'max_steps: "lots"\n', [],
                             "c.yaml: max_steps: got 'lots', must be a whole number >= 1 (fix it in the file, or give "
                             "--max-steps)"),
    "toml-fraction-for-an-int": ("c.toml", "batch_size = 2.5\n", [], "c.toml: batch_size: got 2.5, must be a whole "
                                                                      "number >= 1"),
    "toml-text-for-a-float": ("c.toml", 'lr = "fast"\n', [], "c.toml: lr: got 'fast', must be a number > 0"),
    "malformed-yaml": ("c.yaml", "stages: [1, 2\nmax_steps: 3\n", [], "c.yaml: not valid YAML (expected ',' or ']'"),
    "malformed-toml": ("c.toml", "max_steps = \n", [], "c.toml: not valid TOML (Invalid value (at line 1"),
    "missing-file": ("absent.yaml", None, [], "absent.yaml: not found; check the path given to --config"),
    "negative-in-file": ("c.yaml", "max_steps: -3\n", [], "c.yaml: max_steps: got -3, must be a whole number >= 1"),
    "negative-flag": ("c.yaml", "max_steps: 3\n", ["--max-steps", "-3"], "--max-steps: got -3, must be a whole "
                                                                          "number >= 1"),
    "zero-batch-flag": ("c.yaml", "lr: 1e-4\n", ["--batch-size", "0"],
                        "--batch-size: got 0, must be a whole number >= 1"),
    "unknown-stage": ("c.yaml", "stages: [1, 4]\n", [], "stages: got [1, 4], must be a comma-separated list, each "
                                                         "one of 1, 2, 3"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values_and_files_are_one_line_before_anything_is_written(case, tmp_path):
    name, text, flags, words = CONFIG_CASES[case]
    config = tmp_path / name
    if text is not None:
        config.write_text(text)
    out = tmp_path / "run"
    r = _run(["--config", str(config), "--cache", str(tmp_path / "c"), "--student", str(tmp_path / "s"),
              "--out", str(out), *flags])
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = _one_line(r)
    assert words in line, line
    assert r.stderr.strip() == line and not out.exists()


@pytest.mark.parametrize("missing", ["student", "cache"])
def test_a_missing_student_or_cache_is_one_line_and_leaves_no_out_folder(missing, tmp_path, train_cache,
                                                                        student_dir):
    paths = {"student": student_dir, "cache": train_cache, missing: tmp_path / "absent"}
    out = tmp_path / "run"
    r = _run(_args(paths["cache"], paths["student"], out, "--max-steps", "1"))
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = _one_line(r)
    assert str(tmp_path / "absent") in line and ("no such folder" in line or "does not exist" in line), line
    assert not out.exists()  # the lock it took went with the folder it made


def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, train_cache, student_dir):
    """A file where --out should be (a typo, a stale file), or a path under one: one line naming it, status 2."""
    (tmp_path / "afile").write_text("not a folder")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        r = _run(_args(train_cache, student_dir, out, "--max-steps", "1"))
        assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
        line = _one_line(r)
        assert line.startswith(f"error: {out}: cannot be the training run's folder (") and "give a folder" in line, line
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_resume_with_no_checkpoint_yet_says_it_starts_from_the_beginning(tmp_path, train_cache, student_dir):
    """A requeued job's first try (or a typo in --out): --resume with nothing to resume trains from step 0 and says so."""
    out = tmp_path / "run"
    r = _run(_args(train_cache, student_dir, out, "--max-steps", "1", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--resume: no checkpoint in {out} yet, so the run starts from the beginning" in r.stderr
    assert (out / "final" / "config.json").is_file()
    r = _run(_args(train_cache, student_dir, out, "--max-steps", "1", "--resume"))  # now there is one: no such line
    assert r.returncode == 0 and "no checkpoint in" not in r.stderr, r.stderr[-3000:]


def test_values_written_as_text_in_a_config_file_are_read_as_their_type(tmp_path):
    """YAML reads `1e-4` as text: it is a number all the same, as are "3" and 1e3 for whole numbers."""
    from genrecal_train.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text('lr: 1e-4\nmax_steps: 1e3\nbatch_size: "3"\nstages: "1,3"\nuse_reg_pass: false\n')
    cfg = load_config(str(config), {"cache": "c", "student": "s", "out": "o"})
    assert (cfg.lr, cfg.max_steps, cfg.batch_size, cfg.stages, cfg.use_reg_pass) == (1e-4, 1000, 3, [1, 3], False)


# ---- 5. a full disk -----------------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_names_the_folder_what_was_saved_and_the_resume_command(
        tmp_path, train_cache, student_dir):
    """A real write failure, without root: RLIMIT_FSIZE makes every write past the limit fail with EFBIG (as
    ENOSPC or EDQUOT would on a full disk or quota). Twice the student's weights: every file of a stage-1
    checkpoint fits, stage 2's AdamW state (two values per trained student weight) does not."""
    limit = 2 * (student_dir / "model.safetensors").stat().st_size

    def file_size_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "run"
    args = _args(train_cache, student_dir, out, "--stages", "1,2", "--max-steps", "2", "--checkpoint-every", "1")
    r = _run(args, preexec_fn=file_size_limit)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = _one_line(r)
    assert line.startswith(f"error: out of space writing to {out} (File too large) at stage 2 step 1: the disk "
                           f"mounted at "), line
    assert f"saved: checkpoint {out}/checkpoints/stage1-step0000002 (stage 1 step 2); free some space" in line, line
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # the partial one went
    resumed = _run(_resume_cli(line))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(out) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_a_full_disk_on_rank_0_of_a_torchrun_run_ends_each_rank_with_one_line_and_resumes_with_torchrun(
        tmp_path, train_cache, student_dir):
    """Two ranks (DDP, gloo). Rank 0 fills the disk while checkpointing: it says so in one line, with the torchrun
    command that resumes the run; rank 1, whose next collective fails for want of rank 0, says in one line that it
    stopped because another rank did (or is stopped by torchrun first). No traceback of ours; torchrun's own
    summary of the failed workers follows, and cannot be changed from inside them."""
    limit = 2 * (student_dir / "model.safetensors").stat().st_size

    def file_size_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "cli.train_cli"]
    args = _args(train_cache, student_dir, out, "--stages", "1,2", "--max-steps", "2", "--checkpoint-every", "1")
    r = subprocess.run([*launch, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=file_size_limit)
    assert r.returncode != 0
    ours = r.stderr.split("elastic/multiprocessing/api.py")[0]  # what the ranks wrote, before torchrun's own lines
    assert "Traceback" not in ours and "\u2502" not in ours, ours[-3000:]  # no plain or rich traceback
    lines = [line for line in ours.splitlines() if line.startswith("error: ")]
    assert lines[0].startswith(f"error: out of space writing to {out} (File too large) at stage 2 step 1"), lines
    assert lines[1:] in ([], ["error: rank 1: stopped because another rank did (Connection closed by peer); "
                              "that rank's error says why"]), lines
    resume = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert resume == [*launch, *args, "--resume"], resume  # the torchrun command as it was given
    resumed = subprocess.run(resume, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(out) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_only_torchs_own_errors_of_a_lost_peer_count_as_another_rank_stopping(monkeypatch):
    """`peer_lost`: a collective's error (gloo's plain RuntimeError, NCCL's DistError) that says a peer is gone, in a
    run of several processes; not the project's own errors that happen to quote a reset connection (a remote read
    fails with its own one line), not a single process."""
    import torch.distributed as dist

    from genrecal_cache.io.retry import RemoteReadError
    from genrecal_train.distributed import peer_lost

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:24448. This is ...")
    nccl = dist.DistBackendError("NCCL error: remote process exited or there was a network error")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert peer_lost(gloo) == "Connection closed by peer" and peer_lost(nccl) == "remote process exited"
    assert peer_lost(RemoteReadError("https://x/c: ClientOSError: [Errno 104] Connection reset by peer")) is None
    assert peer_lost(RuntimeError("CUDA out of memory")) is None and peer_lost(ValueError("Broken pipe")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_lost(gloo) is None


# ---- 6. interrupts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_says_where_the_run_stopped_what_was_saved_and_how_to_resume(sig, tmp_path, train_cache,
                                                                                  student_dir):
    out = tmp_path / "run"
    proc = _start(_args(train_cache, student_dir, out, "--max-steps", "500", "--checkpoint-every", "2"))
    try:
        _wait_for_steps(proc, out / "metrics.jsonl", 3)  # the step-2 checkpoint is written before step 3 runs
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    line = _one_line(err)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    saved = json.loads((out / "checkpoints" / latest / "state.json").read_text())["step"]
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert line.startswith(f"error: {out}: training interrupted ({sig.name}) at stage 1 step {steps}; saved: "
                           f"checkpoint {out}/checkpoints/{latest} (stage 1 step {saved}); resume with: "
                           f"genrecal-train "), line
    assert not (out / "final").exists()
    # the printed command continues the run (here to two steps past its checkpoint: --max-steps may change)
    resumed = _run(_resume_cli(line, "--max-steps", str(saved + 2)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _steps(out) == [(1, i) for i in range(1, saved + 3)]
