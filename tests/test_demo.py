"""The demo's quick path end to end (scripts/demo.sh --quick): every step runs and it ends with the
comparison table and the PNGs (the accuracies of a 6-step run mean nothing and are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_path_ends_with_the_table_and_the_plots(tmp_path: Path):
    out = tmp_path / "demo"
    env = dict(os.environ, GENRECAL_BIN=str(Path(sys.executable).parent),  # this interpreter's genrecal-*, no set-up
               GENRECAL_DEMO_BACKEND="transformers",  # vLLM's engine start is tests/test_vllm_backend.py's job
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), TQDM_DISABLE="1",
               OMP_NUM_THREADS="3", MKL_NUM_THREADS="3")  # a user's own setting: the demo pins its thread counts
    r = subprocess.run(["bash", "scripts/demo.sh", str(out), "--quick"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    assert header == "| run | all (n=18) | colour (2) | compare (2) | count (2) | digit (6) | multi (2) | shape (2) | side (2) |"
    rows = [line.split(" | ")[0] for line in lines[lines.index(header) + 2:] if line.startswith("| ")]
    assert rows == ["| teacher", "| sft", "| genrecal"]
    pngs = [out / "runs" / "genrecal" / "curves.png", out / "runs" / "sft" / "curves.png",
            out / "teacher" / "curves.png", out / "accuracy_by_type.png"]
    for png in pngs:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 400, png
        assert str(png.relative_to(tmp_path)) in r.stdout.replace(str(tmp_path) + "/", "")  # the demo says where
    for run in ("genrecal", "sft"):  # TQDM_DISABLE=1 (set above) silences the trainer's progress bar
        assert "it/s" not in (out / "runs" / f"{run}.log").read_text(), run
    # same budget: both students ran 10 optimizer steps of 4 samples
    for run, stages in (("genrecal", {1, 2, 3}), ("sft", {3})):
        metrics = [json.loads(m) for m in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 10 and {m["stage"] for m in metrics} == stages
    # the figures depend on thread counts: the demo's, not the environment's (2 alone, 1 each side by side)
    for run, threads in (("teacher", 2), ("runs/genrecal", 1), ("runs/sft", 1)):
        metrics = [json.loads(m) for m in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert {m["torch_threads"] for m in metrics if "torch_threads" in m} == {threads}, run


def test_demo_reuses_its_teacher_for_another_seed_and_refuses_other_settings_in_one_line(tmp_path: Path):
    """GENRECAL_DEMO_SEED=1 into an OUT that seed 0 made reuses its data and teacher (the README's seed table
    is made that way); the full demo into a --quick OUT is refused at step 1, in one line, and stops there."""
    out = tmp_path / "demo"
    env = dict(os.environ, GENRECAL_BIN=str(Path(sys.executable).parent), GENRECAL_DEMO_BACKEND="transformers",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), TQDM_DISABLE="1")
    demo_task = [sys.executable, "scripts/demo_task.py", str(out), "--quick"]
    first = subprocess.run(demo_task, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    teacher = out / "teacher" / "final" / "model.safetensors"
    made = teacher.stat().st_mtime_ns
    again = subprocess.run(demo_task + ["--seed", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert teacher.stat().st_mtime_ns == made  # reused, not trained again
    assert (out / "students" / "seed1" / "config.json").is_file()

    r = subprocess.run(["bash", "scripts/demo.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0
    assert "made with other settings" in r.stderr and "fresh --out" in r.stderr
    assert "2/5" not in r.stdout and "unbound variable" not in r.stderr  # stopped at step 1
