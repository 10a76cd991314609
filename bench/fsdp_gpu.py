"""FSDP2 on GPUs (NCCL, bf16): the real trainer under torchrun, its memory against `genrecal-train plan`.

    python bench/fsdp_gpu.py                      # every visible GPU, tiny pair built here, stages 1,2
    python bench/fsdp_gpu.py --student S --cache C --steps 20 --batch-size 2
    python bench/fsdp_gpu.py --device cpu --gpus 2   # the same script on gloo (a check without a GPU)

For each of `--strategy ddp` (fp32 weights, bf16 autocast) and `--strategy fsdp --param-dtype
bfloat16` it launches `torchrun -m cli.train_cli` and reads back from metrics.jsonl, per rank,
the bytes of weights / grads / AdamW state / head it held after its first stage-2 step, the peak
CUDA memory allocated, and tokens/s; next to them the plan's figures for the same student, head
and world size. Without --student/--cache a tiny random pair and a cache are built first
(genrecal_cache.testing, the transformers backend), so the script needs nothing downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_inputs(root: Path) -> tuple[Path, Path]:
    from genrecal_cache.demo_data import write_demo_dataset
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_cache.testing import tiny_pair

    teacher, student = tiny_pair(root / "models")
    data = write_demo_dataset(root / "data", n=64, seed=1)
    extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(root / "cache"), backend="transformers",
                          hidden_codec="bf16", progress=False))
    return student, root / "cache"


def run(args, student: Path, cache: Path, out: Path, strategy: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.gpus),
           "-m", "cli.train_cli", "--cache", str(cache), "--student", str(student), "--out", str(out),
           "--stages", "1,2", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--checkpoint-every", "1000000", "--device", "auto" if args.device == "cuda" else "cpu", *strategy]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student")
    p.add_argument("--cache")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run where a GPU is lent, or pass --device cpu for a gloo check")
    from transformers import AutoConfig

    from genrecal_train import memory_plan as plan

    with tempfile.TemporaryDirectory(prefix="genrecal-fsdp-bench-") as tmp:
        root = Path(tmp)
        student, cache = ((Path(args.student), Path(args.cache)) if args.student and args.cache
                          else tiny_inputs(root))
        m = plan.teacher_dims(str(cache))
        meta = plan.meta_model(AutoConfig.from_pretrained(student), m[0], m[1], 2)
        dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (gloo)"
        print(f"# bench/fsdp_gpu.py: {args.gpus} x {dev}, torch {torch.__version__}; student {student}; "
              f"batch {args.batch_size}/rank, {args.steps} steps per stage")
        print(f"{'strategy':14s}{'rank':>5s}{'weights MB':>12s}{'plan':>9s}{'grads MB':>10s}{'plan':>9s}"
              f"{'optim MB':>10s}{'plan':>9s}{'head MB':>9s}{'plan':>9s}{'peak MB':>9s}{'tok/s':>9s}")
        for name, flags, strat, dtype in (("ddp", ["--strategy", "ddp"], "ddp", torch.float32),
                                          ("fsdp bf16", ["--strategy", "fsdp", "--param-dtype", "bfloat16"],
                                           "fsdp", torch.bfloat16)):
            if name == "ddp" and args.gpus == 1:
                flags = ["--strategy", "single"]
            recs = run(args, student, cache, root / name.replace(" ", "-"), flags)
            first = next(r for r in recs if r["stage"] == 2 and "rank_state_bytes" in r)
            tps = sum(r["tokens_per_s"] for r in recs if r["stage"] == 2 and r["step"] > 1) / max(1, args.steps - 1)
            for rank, got in enumerate(first["rank_state_bytes"]):
                want = plan.state_bytes(meta, strat, args.gpus, rank, dtype)
                mb = lambda k: f"{got[k] / 2**20:10.2f}{want[k] / 2**20:9.2f}"  # noqa: E731
                peak = got.get("cuda_peak", 0) / 2**20
                print(f"{name:14s}{rank:5d}  {mb('params')}{mb('grads')}{mb('optimizer')}{mb('head')}"
                      f"{peak:9.1f}{tps:9.0f}")


if __name__ == "__main__":
    main()
