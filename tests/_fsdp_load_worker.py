"""One rank of tests/test_fsdp.py's loading test, under `torchrun --nproc_per_node 2` (gloo).

Builds the model exactly as `genrecal-train --strategy fsdp` does (`trainer.build_model`) and writes
to OUT/rank{r}.pt what this rank held: the bytes of student and Recalibrator parameters that were not
on the meta device when `shard_model` was called (its whole fp32 model on rank 0; none elsewhere),
its local shards' bytes and parameter count after loading, whether lm_head is still embed_tokens,
its non-persistent buffers, and (rank 0) the weights gathered from both ranks' shards.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_fsdp_load_worker.py CACHE STUDENT OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from genrecal_cache.families import adapter_for
from genrecal_cache import open_cache
from genrecal_train import distributed
from genrecal_train.config import TrainConfig
from genrecal_train.trainer import build_model


def _materialised_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)


def main(cache_dir: str, student_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, device = dist.get_rank(), torch.device("cpu")
    cfg = TrainConfig(cache=cache_dir, student=student_dir, out=out, device="cpu", strategy="fsdp",
                      param_dtype="float32")
    adapter = adapter_for(Path(student_dir))
    seen = {}
    shard_model = distributed.shard_model

    def observed(model, *args, **kwargs):  # what this rank holds at the moment it shards
        seen["before_shard"] = _materialised_bytes(model.student) + _materialised_bytes(model.recalibrator)
        seen["full"] = sum(p.numel() * 4 for p in [*model.student.parameters(), *model.recalibrator.parameters()])
        return shard_model(model, *args, **kwargs)

    distributed.shard_model = observed
    try:
        model = build_model(cfg, adapter, open_cache(cache_dir).head(), "fsdp", device, rank)
    finally:
        distributed.shard_model = shard_model
    lm_head = adapter.lm_head(model.student).weight
    result = {**seen,
              "local_params": distributed._storage_bytes(model.parameters()),
              "parameters": len(list(model.parameters())),
              "tied": lm_head is adapter.text_model(model.student).embed_tokens.weight,
              "buffers": {n: b.clone() for n, b in model.named_buffers() if not n.startswith("head.")},
              "weights": {k: distributed.full_state_dict(getattr(model, k)) for k in ("student", "recalibrator")}}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
