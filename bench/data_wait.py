"""Trainer data wait: the fraction of each optimizer step the trainer spends waiting for data.

    python bench/data_wait.py                        # d=2048 teacher cache (bf16), tiny student, 30 steps of stage 1
    python bench/data_wait.py --codecs bf16,ecq --steps 40

A random-weight Qwen2-VL teacher with a realistic hidden size (few layers, so extraction runs on a
CPU) is extracted over demo questions into a cache per hidden codec; then the real trainer
(`genrecal_train.trainer.train`) runs stage 1 on it with the tiny LLaVA student and a Recalibrator
at the teacher's width. The trainer streams the cache (TeacherCache.iter_samples in its prefetch
thread: read, decode, re-encode the images and text for the student) and logs `data_wait_frac`
per step in metrics.jsonl: the time `next(batch)` blocked divided by the step's wall time. The
first step (the stream starting up) is reported separately. Target (issue 6): < 5%.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from _machine import machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=160)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--codecs", default="bf16")
    p.add_argument("--cache", help="train on this cache instead (with --student)")
    p.add_argument("--student", help="student folder (default: the tiny test student)")
    args = p.parse_args()

    from genrecal_cache.demo_data import write_demo_dataset
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_cache.testing import build_tiny_student, build_tiny_teacher
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import train

    print(f"# bench/data_wait.py on {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="genrecal-wait-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # models and caches: hundreds of MB
    student = args.student or str(build_tiny_student(tmp / "student"))
    caches = {}
    if args.cache:
        caches["given"] = args.cache
    else:
        teacher = str(build_tiny_teacher(tmp / "teacher", hidden_size=args.hidden_size, layers=args.layers, head_dim=64))
        data = str(write_demo_dataset(tmp / "demo", n=args.samples, seed=0))
        for codec in args.codecs.split(","):
            m = extract(ExtractConfig(teacher=teacher, data=data, out=str(tmp / f"cache-{codec}"), backend="transformers",
                                      topk=64, hidden_codec=codec, dtype="float32", device="cpu", progress=False))
            caches[codec] = str(tmp / f"cache-{codec}")
            print(f"cache {codec}: {m.counts['ok']} samples, {m.counts['tokens']} tokens, d={m.hidden_size}")

    print(f"\n{'cache':<8} {'steps':>5} {'step 1 wait':>11} {'mean wait':>10} {'median':>8} {'max':>7} "
          f"{'tokens/s':>9}  (steps 2.., target mean < 5%)")
    for name, cache in caches.items():
        run = tmp / f"run-{name}"
        train(TrainConfig(cache=cache, student=student, out=str(run), stages=[1], max_steps=args.steps,
                          batch_size=args.batch_size, device="cpu", prefetch=8, checkpoint_every=10 ** 9, log_every=1))
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "data_wait_frac" in r]
        waits = np.array([r["data_wait_frac"] for r in recs[1:]])
        tps = np.array([r["tokens_per_s"] for r in recs[1:]])
        print(f"{name:<8} {len(recs):>5} {100 * recs[0]['data_wait_frac']:>10.1f}% {100 * waits.mean():>9.2f}% "
              f"{100 * np.median(waits):>7.2f}% {100 * waits.max():>6.1f}% {np.median(tps):>9.0f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
