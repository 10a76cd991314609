"""The training step's work on the regularization pass's context rows, per storage: Proj-pre over them, forward
and backward, as `model.reg_prefix` does it.

    python bench/context_step.py                         # d_t=4096 and 8192, d_s=512 and 2048, 8192 rows, rank 64

- full: the rows' d_t-wide states (read as bf16, widened in the step) through Proj-pre;
- lowrank, rebuilt: what a float32 read of a low-rank cache hands over: the states rebuilt from their coefficients
  (`ContextBasis.decode_tensor`, timed here in the step; the eager reader does the same GEMM on its thread), then
  Proj-pre;
- lowrank, folded: what training does: the coefficients through `Recalibrator.project_lowrank` (the basis folded
  into Proj-pre), never rebuilt.

Each figure is the median of --repeats runs of forward + backward (the gradient reaching Proj-pre's weight), in
milliseconds per step and as a ratio to `full`, side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from _machine import machine

from genrecal_cache.format.roles import ContextBasis
from genrecal_train.recalibrator import Recalibrator


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, autograd graph
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(runs)


def measure(d_t: int, d_s: int, rows: int, rank: int, repeats: int) -> dict[str, float]:
    cfg = LlamaConfig(hidden_size=d_s, intermediate_size=d_s, num_attention_heads=8, num_key_value_heads=8,
                      head_dim=d_s // 8, num_hidden_layers=1, vocab_size=16)
    rec = Recalibrator(cfg, LlamaDecoderLayer, LlamaRotaryEmbedding, d_t, num_layers=1).train()
    g = torch.Generator().manual_seed(0)
    basis = ContextBasis(np.random.default_rng(0).standard_normal(d_t).astype(np.float32),
                         np.linalg.qr(np.random.default_rng(1).standard_normal((d_t, rank)))[0].T.astype(np.float32))
    coefficients = torch.randn(rows, rank, generator=g)
    states = basis.decode_tensor(coefficients).to(torch.bfloat16)  # as a bf16 cache stores the same rows in full
    cpu = torch.device("cpu")

    def full() -> None:
        rec.zero_grad(set_to_none=True)
        rec.proj_pre(states.float()).sum().backward()

    def rebuilt() -> None:
        rec.zero_grad(set_to_none=True)
        rec.proj_pre(basis.decode_tensor(coefficients)).sum().backward()

    def folded() -> None:
        rec.zero_grad(set_to_none=True)
        rec.project_lowrank(coefficients, *basis.tensors(cpu)).sum().backward()

    return {name: timed(fn, repeats) for name, fn in (("full", full), ("lowrank, rebuilt", rebuilt),
                                                      ("lowrank, folded", folded))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-sizes", default="4096,8192", help="d_t values")
    p.add_argument("--student-sizes", default="512,2048", help="d_s values")
    p.add_argument("--rows", type=int, default=8192, help="context rows per step")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench/context_step.py on {machine()}, torch threads {torch.get_num_threads()}")
    print(f"Proj-pre forward + backward over {args.rows} context rows, rank {args.rank}; ms per step (x of full)")
    print(f"{'d_t':>5} {'d_s':>5} {'full':>12} {'lowrank, rebuilt':>20} {'lowrank, folded':>20}")
    for d_t in map(int, args.teacher_sizes.split(",")):
        for d_s in map(int, args.student_sizes.split(",")):
            ms = measure(d_t, d_s, args.rows, args.rank, args.repeats)
            f = ms["full"]
            print(f"{d_t:>5} {d_s:>5} {f:>9.1f} ms {ms['lowrank, rebuilt']:>9.1f} ms ({ms['lowrank, rebuilt'] / f:.2f}x) "
                  f"{ms['lowrank, folded']:>9.1f} ms ({ms['lowrank, folded'] / f:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
