"""Issue 14, extraction: one writer per output folder, bad input lines become error rows (and a
resume still works), an input with nothing usable fails, bounded memory for queued images, the
engine context from the model, and resume with the teacher spelled another way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from genrecal_cache.extract import ExtractConfig, ExtractError, extract
from genrecal_cache import open_cache
from genrecal_cache.verify import verify

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.cache_cli"]


def _cfg(teacher: Path | str, data: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(teacher=str(teacher), data=str(data), out=str(out), backend="transformers", topk=4,
                         progress=False, **{"hidden_codec": "bf16", "batch_tokens": 1, **kw})


def _extract_cli(teacher: Path | str, data: Path, out: Path, env: dict | None = None, cwd: Path = REPO,
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "extract", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                           "--backend", "transformers", "--topk", "4", "--batch-tokens", "1", "--commit-seconds", "0",
                           "--hidden-codec", "bf16", "--shard-tokens", "64", *extra],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})


def _error_line(r: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error (progress bars share stderr); never a traceback."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    return line


def _lines(demo_jsonl: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in demo_jsonl.read_text().splitlines()[:n]]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def data_dir(demo_jsonl: Path, tmp_path: Path) -> Path:
    """A copy of the demo data folder (images/ + train.jsonl) to add bad lines to."""
    shutil.copytree(demo_jsonl.parent, tmp_path / "data")
    return tmp_path / "data"


def test_a_second_extraction_on_the_same_folder_is_refused_and_a_dead_holders_lock_is_taken_over(
        teacher_dir, demo_jsonl, data_dir, tmp_path):
    data = _write(data_dir / "few.jsonl", [json.dumps(r) for r in _lines(demo_jsonl, 3)])
    out = tmp_path / "cache"
    # another process holds the folder (as a running extraction does) until it is killed
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from genrecal_cache.journal import DirLock
        DirLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _extract_cli(teacher_dir, data, out)
        assert r.returncode == 2, r.stderr[-2000:]
        line = _error_line(r)
        assert "being written by another extraction" in line and f"pid {holder.pid}" in line and str(out) in line
        assert sorted(p.name for p in out.iterdir()) == ["_lock"]  # nothing of the holder's was touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without cleaning up: its lock file is still there, but no longer held
    assert (out / "_lock").exists()
    r = _extract_cli(teacher_dir, data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 samples (3 ok, 0 error)" in r.stdout
    assert not (out / "_lock").exists() and verify(out) == []


def test_a_killed_extraction_is_resumed_through_its_stale_lock(teacher_dir, demo_jsonl, data_dir, tmp_path):
    data = _write(data_dir / "few.jsonl", [json.dumps(r) for r in _lines(demo_jsonl, 6)])
    out = tmp_path / "cache"
    r = _extract_cli(teacher_dir, data, out, env={"GENRECAL_KILL_AT": "committed:2"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert (out / "_lock").exists() and (out / "_progress.json").exists()
    r = _extract_cli(teacher_dir, data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "_lock").exists() and verify(out) == []
    assert open_cache(out).manifest.counts["ok"] == 6


def _bad_lines(demo_jsonl: Path) -> tuple[list[str], dict[str, str]]:
    """Good demo lines with bad ones among them; {row id: words its error must contain}."""
    good = _lines(demo_jsonl, 6)
    q = lambda text: [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]  # noqa: E731
    dup = dict(good[1])
    surrogate_text = json.dumps({"id": "lone-surrogate", "conversations": q("Which colour?")}).replace(
        "Which colour?", "Which \\ud800 colour?")  # valid JSON, but not a Unicode string
    surrogate_id = json.dumps({"id": "x", "conversations": q("Which colour?")}).replace('"x"', '"id\\udfff"')
    lines = [json.dumps(good[0]), json.dumps(good[1]), surrogate_text, json.dumps(good[2]), json.dumps(dup),
             json.dumps({"id": "placeholder", "conversations": q("What is <|image_pad|> here?")}),
             json.dumps(good[3]), surrogate_id, json.dumps(good[4]), json.dumps(good[5])]
    expected = {
        "lone-surrogate": "turn 0 (user) text is not valid Unicode",
        f"{dup['id']}@line-5": f"duplicate id: line-2 has the same id",
        "placeholder": "literal text '<|image_pad|>'",
        "line-8": "'id' is not valid Unicode",
    }
    return lines, expected


def test_bad_lines_become_error_rows_named_by_their_sample_and_resume_works(teacher_dir, demo_jsonl, data_dir,
                                                                            tmp_path):
    lines, expected = _bad_lines(demo_jsonl)
    data = _write(data_dir / "bad.jsonl", lines)
    out = tmp_path / "cache"
    r = _extract_cli(teacher_dir, data, out, env={"GENRECAL_KILL_AT": "committed:2"})  # killed mid-run
    assert r.returncode == -9, r.stderr[-3000:]
    r = _extract_cli(teacher_dir, data, out)  # resumed
    assert r.returncode == 0, r.stderr[-3000:]
    assert "10 samples (6 ok, 4 error)" in r.stdout
    assert verify(out) == []
    cache = open_cache(out)
    rows = {row["id"]: row for row in cache.index.to_pylist()}
    assert len(rows) == 10
    for sid, words in expected.items():
        assert rows[sid]["status"] == "error", (sid, rows[sid])
        assert words in rows[sid]["error"], rows[sid]["error"]
    assert "'lone-surrogate'" in rows["lone-surrogate"]["error"] and "line-3" in rows["lone-surrogate"]["error"]
    assert sorted(sid for sid, row in rows.items() if row["status"] == "ok") == sorted(
        json.loads(line)["id"] for line in [lines[i] for i in (0, 1, 3, 6, 8, 9)])
    # the first sample of the repeated id kept its id and its features
    first = json.loads(lines[1])["id"]
    assert rows[first]["status"] == "ok" and cache.by_id(first).hidden.shape[0] > 0


def test_an_input_with_no_usable_sample_fails_with_one_line(teacher_dir, demo_jsonl, data_dir, tmp_path):
    rows = _lines(demo_jsonl, 2)
    for r in rows:
        r["image"] = "images/missing.png"
    data = _write(data_dir / "none.jsonl", [json.dumps(r) for r in rows])
    out = tmp_path / "cache"
    r = _extract_cli(teacher_dir, data, out)
    assert r.returncode == 2, (r.stdout, r.stderr[-3000:])
    line = _error_line(r)
    assert "no usable sample: 2 sample(s)" in line and "missing.png" in line, line
    assert "wrote" not in r.stdout
    with pytest.raises(ExtractError, match="no usable sample"):  # a re-run does not report success either
        extract(_cfg(teacher_dir, data, out))


def test_queued_samples_hold_encoded_images_not_decoded_ones(teacher, data_dir, tmp_path):
    """A big image is decoded for the processor and dropped: what waits in the queue is the encoded file
    plus the processor's (resized) pixels, whatever the image's resolution."""
    import numpy as np
    from PIL import Image

    from genrecal_cache.data import read_samples
    from genrecal_cache.extract import _encode_all

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8)).save(
        data_dir / "images" / "big.png")
    rec = {"id": "big", "image": "images/big.png",
           "conversations": [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": "red"}]}
    data = _write(data_dir / "big.jsonl", [json.dumps(rec)])
    [(s, enc, err)] = list(_encode_all(read_samples(data), teacher.adapter, teacher.processor, 4096, str(data)))
    assert err is None and enc.images == []
    assert not any(isinstance(v, Image.Image) for v in vars(enc).values())
    pixels = enc.model_inputs["pixel_values"]
    assert pixels.numel() * pixels.element_size() < 2048 * 2048 * 3  # the processor's size, not the image's
    assert s.images and isinstance(s.images[0], bytes)


def test_default_max_len_is_the_teachers_context_when_shorter(teacher_dir, demo_jsonl, tmp_path):
    from transformers import AutoConfig

    from genrecal_cache.extract import resolve_max_len

    short = tmp_path / "teacher_1k"
    shutil.copytree(teacher_dir, short)
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 1024
    (short / "config.json").write_text(json.dumps(config))
    assert resolve_max_len(None, AutoConfig.from_pretrained(short)) == 1024
    assert resolve_max_len(None, AutoConfig.from_pretrained(teacher_dir)) == 4096
    assert resolve_max_len(300, AutoConfig.from_pretrained(short)) == 300
    m = extract(_cfg(short, demo_jsonl, tmp_path / "cache", limit=2))
    assert m.extra["extract"]["max_len"] == 1024


def test_resume_accepts_the_teacher_spelled_relative_or_absolute(teacher_dir, demo_jsonl, data_dir, tmp_path):
    data = _write(data_dir / "few.jsonl", [json.dumps(r) for r in _lines(demo_jsonl, 5)])
    out = tmp_path / "cache"
    r = _extract_cli(teacher_dir.resolve(), data, out, env={"GENRECAL_KILL_AT": "committed:2"})
    assert r.returncode == -9, r.stderr[-2000:]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = _extract_cli(Path("./") / teacher_dir.name, data, out, env=env, cwd=teacher_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert verify(out) == [] and open_cache(out).manifest.counts["ok"] == 5


# --- issue 23: bounded input, early refusal of what is not a dataset ----------------------------------

def _cli_peak_mib(args: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `genrecal-cache ARGS` in a fresh process; its result and its peak resident memory (MiB)."""
    code = textwrap.dedent("""
        import atexit, re, sys
        # VmHWM: this process's own peak (ru_maxrss also counts the parent's peak, inherited through exec)
        atexit.register(lambda: print("peak-rss-kib " + re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())
                                      .group(1), file=sys.stderr))
        from cli.cache_cli import main
        sys.argv = ["genrecal-cache", *sys.argv[1:]]
        main()
        """)
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, **(env or {})}, timeout=300)
    [peak] = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("peak-rss-kib ")]
    return r, peak / 1024


def test_a_huge_line_is_an_error_row_in_seconds_without_tokenizing_it(teacher_dir, demo_jsonl, data_dir, tmp_path):
    """A line above the line cap is skipped unread; a text too long for --max-len by its characters alone
    is refused before tokenizing. Both rows name the file and the line; the run stays small and fast."""
    import time

    from genrecal_cache.data import MAX_LINE_BYTES

    good = [json.dumps(r) for r in _lines(demo_jsonl, 3)]
    q = lambda text: json.dumps({"id": "long", "conversations": [  # noqa: E731
        {"from": "human", "value": text}, {"from": "gpt", "value": "red"}]})
    long_text = "What colour is it? " * (2 * 2**20 // 19)  # 2 MB: under the line cap, far above max_len
    huge_text = "x" * (MAX_LINE_BYTES + 2**20)
    data = _write(data_dir / "huge.jsonl", [good[0], q(long_text), good[1],
                                            q(huge_text).replace('"long"', '"huge"'), good[2]])
    out = tmp_path / "cache"
    t0 = time.monotonic()
    r, peak = _cli_peak_mib(["extract", "--teacher", str(teacher_dir), "--data", str(data), "--out", str(out),
                             "--backend", "transformers", "--topk", "4", "--hidden-codec", "bf16"])
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 samples (3 ok, 2 error)" in r.stdout
    rows = {row["id"]: row for row in open_cache(out).index.to_pylist()}
    long_err = rows["long"]["error"]
    assert f"({data}, line-2)" in long_err and "characters of text cannot fit in max_len=4096" in long_err, long_err
    huge_err = rows["line-4"]["error"]  # its id is never read: the line is skipped unread
    assert f"({data}, line-4)" in huge_err and f"above the limit of {MAX_LINE_BYTES} bytes" in huge_err, huge_err
    assert elapsed < 60 and peak < 1024, (elapsed, peak)  # ~12 s, ~670 MiB here; was: 14 GB and 3.5 min for 50 MB


def test_an_input_that_is_not_a_dataset_is_refused_before_anything_is_written(teacher_dir, data_dir, tmp_path):
    junk = data_dir / "junk.jsonl"
    junk.write_bytes(os.urandom(256 * 1024))
    out = tmp_path / "cache"
    r = _extract_cli(teacher_dir, junk, out)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _error_line(r)
    assert str(junk) in line and "not JSONL: binary data, and none of its first 16 non-blank lines" in line, line
    assert not out.exists()
    text = data_dir / "notes.jsonl"  # text, but no line is a JSON object
    text.write_text("".join(f"note {i}: not json\n" for i in range(200)))
    r = _extract_cli(teacher_dir, text, out)
    assert r.returncode == 2 and "not JSONL: none of its first 16 non-blank lines is a JSON object" in _error_line(r)
    assert not out.exists()


def test_a_teacher_that_is_not_there_is_refused_before_anything_is_written(data_dir, demo_jsonl, tmp_path):
    out = tmp_path / "cache"
    for teacher, says in [(tmp_path / "no-teacher", "no such folder; give a model folder or a hub id"),
                          (data_dir, "no config.json in this folder")]:  # a folder that is not a model
        r = _extract_cli(teacher, demo_jsonl, out)
        line = _error_line(r)
        assert r.returncode == 2 and f"--teacher {teacher}: {says}" in line and "nothing was written" in line, line
        assert "Traceback" not in r.stderr and not out.exists()
    r = _extract_cli(data_dir, demo_jsonl, out, extra=("--backend", "nosuch"))  # the flag is checked first
    assert r.returncode == 2 and "Invalid value for --backend: 'nosuch' is not one of auto, transformers, vllm" \
        in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    r = _extract_cli(data_dir, data_dir, out)  # a folder given as --data
    assert r.returncode == 2 and f"{data_dir} is a folder; give the dataset file in it" in _error_line(r)
    assert not out.exists()


def test_the_image_root_advice_names_the_flag(teacher_dir, demo_jsonl, data_dir, tmp_path):
    rec = _lines(demo_jsonl, 1)[0]
    data = _write(data_dir / "escape.jsonl", [json.dumps({**rec, "id": "esc", "image": "../outside.png"}),
                                              *[json.dumps(r) for r in _lines(demo_jsonl, 2)]])
    r = _extract_cli(teacher_dir, data, tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    err = open_cache(tmp_path / "cache").by_id("esc").error
    assert "pass a wider --image-root" in err, err
    r = _extract_cli(teacher_dir, data, tmp_path / "cache2", extra=("--image-root", str(tmp_path / "nowhere")))
    assert r.returncode == 2 and "pass --image-root" in _error_line(r)


def test_the_installed_command_extracts_without_pythonpath(teacher_dir, demo_jsonl, tmp_path):
    """`genrecal-cache extract` as installed, with a clean environment: no PYTHONPATH (so no compat
    `sitecustomize` at start-up) on this CPU machine without torchvision. The console script's own
    code (`from cli.cache_cli import main; main()`) is run from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import sys; from cli.cache_cli import main; sys.argv[0] = 'genrecal-cache'; sys.exit(main())"
    out = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", script, "extract", "--teacher", str(teacher_dir), "--data",
                        str(demo_jsonl), "--out", str(out), "--backend", "transformers", "--topk", "4", "--limit", "3"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # was: rc 1, "OSError: Can't load video processor"
    assert "3 samples (3 ok, 0 error)" in r.stdout and verify(out) == []


def test_a_json_array_that_is_not_json_is_refused_before_anything_is_written(teacher_dir, data_dir, tmp_path):
    bad = data_dir / "broken.json"
    bad.write_text('[{"id": "a", "conversations": [')
    out = tmp_path / "cache"
    r = _extract_cli(teacher_dir, bad, out)
    assert r.returncode == 2 and "not valid JSON" in _error_line(r) and not out.exists()
