"""Extraction across many jobs as launchers start them (docs/vllm.md recipes): each `extract` process takes
its shard from a SLURM job array's or torchrun's variables, the parts land in one shared folder, and the
folder reads as one cache, verifies, and is pushed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer

from cli.cache_cli import shard_from_env
from genrecal_cache import open_cache
from genrecal_cache.push import push
from genrecal_cache.verify import verify

REPO = Path(__file__).resolve().parents[1]


def test_shard_from_env_reads_slurm_arrays_then_torchrun_variables():
    assert shard_from_env({}) == (1, 0, "")
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == (4, 3, "RANK=3 WORLD_SIZE=4")
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
             "SLURM_ARRAY_TASK_STEP": "2", "RANK": "0", "WORLD_SIZE": "1"}  # the array wins over RANK
    assert shard_from_env(slurm)[:2] == (4, 1)
    with pytest.raises(typer.BadParameter, match="gives shard 5 of 4: use a contiguous array"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4"})


def _extract_jobs(teacher_dir: Path, data: Path, out: Path, envs: list[dict[str, str]]) -> list[str]:
    """Run one `genrecal-cache extract` process per environment, all at once, as a launcher would."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")])
    code = "import sys; from cli.cache_cli import main; sys.argv[0] = 'genrecal-cache'; main()"
    procs = [subprocess.Popen([sys.executable, "-c", code, "extract", "--teacher", str(teacher_dir), "--data",
                               str(data), "--out", str(out), "--backend", "transformers", "--hidden-codec", "fp32"],
                              env={**base, **env}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for env in envs]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    return outputs


@pytest.mark.parametrize("launcher", ["slurm-array", "torchrun"])
def test_jobs_take_their_shard_from_the_launcher_and_the_parts_read_as_one_cache(launcher, teacher_dir, tmp_path):
    from genrecal_cache.demo_data import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", n=6, seed=3)
    if launcher == "slurm-array":  # sbatch --array=4-6: tasks 4, 5, 6
        envs = [{"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4",
                 "SLURM_ARRAY_JOB_ID": "77"} for t in (4, 5, 6)]
        said = [f"shard {i} of 3 (from SLURM_ARRAY_TASK_ID={4 + i} SLURM_ARRAY_TASK_COUNT=3 SLURM_ARRAY_TASK_MIN=4)"
                for i in range(3)]
    else:
        envs = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)} for r in range(2)]
        said = [f"shard {r} of 2 (from RANK={r} WORLD_SIZE=2)" for r in range(2)]
    out = tmp_path / "shared" / "cache"
    outputs = _extract_jobs(teacher_dir, data, out, envs)
    for line, output in zip(said, outputs):
        assert line in output, output[-2000:]
    n = len(envs)
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:05d}-of-{n:05d}" for i in range(n)]
    assert verify(out) == []
    with open_cache(out) as cache:  # the parts as one cache: every input sample once, in part order
        ids = cache.index.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 6 and type(cache).__name__ == "MultiPartCache"
        inputs = [json.loads(line)["id"] for line in data.read_text().splitlines()]
        for i, part in enumerate(cache.parts):  # job i took the input lines i, i + n, ...
            assert part.index.column("id").to_pylist() == inputs[i::n]
        samples = {s.id: s for s in cache.iter_samples(status="all")}
    # the recipe's last step: publish the shared folder (a local path here; s3:// in tests/test_remote_s3.py)
    report = push(out, tmp_path / "published")
    assert report.faults == [] and report.files == sum(len(open_cache(p).manifest.checksums) + 1
                                                       for p in sorted(out.iterdir()))
    with open_cache(tmp_path / "published") as published:
        for s in published.iter_samples(status="all"):
            np.testing.assert_array_equal(s.hidden, samples[s.id].hidden)
            np.testing.assert_array_equal(s.token_ids, samples[s.id].token_ids)
