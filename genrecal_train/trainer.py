"""The training recipe: stages 1-3 of GenRecal over a streamed teacher cache.

    stage 1  Recalibrator only                  main + regularization pass (L_ar + L_kl each)
    stage 2  student LLM body + Recalibrator    stage-1 losses + L_s (vision encoder frozen)
    stage 3  student without Recalibrator       L_s

Each stage has its own AdamW and linear LR decay lr -> lr_end, gradient accumulation, bf16
autocast on GPU, checkpoints every N steps and at its end; `resume` continues from the latest.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from genrecal_cache.families import adapter_for, model_config
from genrecal_cache.format.manifest import identity_diff
from genrecal_cache.io.durable import atomic_write
from genrecal_cache.journal import DirLock, DirLockedError
from genrecal_cache.stops import disk_full
from genrecal_cache import open_cache
from genrecal_train import checkpoint as ckpt
from genrecal_train import distributed
from genrecal_train import sharded_checkpoint as sharded
from genrecal_train.config import TrainConfig
from genrecal_train.batches import CacheStream
from genrecal_train.errors import OutOfSpace, RunInterrupted, RunRefused, TrainError
from genrecal_train.model import GenRecal
from genrecal_train.plots import plot_curves
from genrecal_train.preflight import check_cache_matches, load_teacher_tokenizer

__all__ = ["MetricsLog", "Progress", "build_model", "run_stage", "stage_steps", "train"]


def _dist_setup(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return rank, world, dev


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed); rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, truncate_to: int | None = None):
        """`truncate_to`: a resumed run first drops the lines its checkpoint does not cover (written by
        the killed run after it), so every (stage, step) is logged once."""
        self.enabled = enabled
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True) if enabled and path.exists() else []
        if truncate_to is not None and len(lines) > truncate_to:
            lines = lines[:truncate_to]
            atomic_write(path, "".join(lines).encode())
        self.lines = len(lines)  # records in the file: checkpoints store it for the above
        self.file = open(path, "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines += 1
        if self.tb is not None:
            gstep = record["stage"] * 1_000_000 + record["step"]
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"stage{record['stage']}/{k}", v, gstep)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def stage_steps(cfg: TrainConfig, stream: CacheStream, world: int, stage: int) -> int:
    if cfg.stage_steps:
        return cfg.stage_steps[cfg.stages.index(stage)]
    if cfg.epochs is None:
        return cfg.max_steps
    # From the whole cache, not this rank's slice: slices differ by one sample, and every rank must
    # run the same number of steps (DDP hangs otherwise).
    per_step = cfg.batch_size * cfg.grad_accum * world
    total = sum(len(p) for p in stream.cache.plan())
    return max(1, math.ceil(cfg.epochs * total / per_step))


@dataclass
class Progress:
    """Where a run is (for the message when it stops): the stage it runs (None: not training yet) and the
    optimizer steps done in it."""
    stage: int | None = None
    step: int = 0


def train(cfg: TrainConfig) -> Path:
    """Run the configured stages; returns the folder holding the final student (save_pretrained).

    The run folder is locked for the run (`DirLock`: a second run on it is refused, naming the holder).
    An interrupt (KeyboardInterrupt, which `genrecal-train` also makes of SIGTERM) becomes `RunInterrupted`,
    a full disk `OutOfSpace`; both say where the run stopped and what it saved."""
    run_dir, progress, lock = Path(cfg.out), Progress(), None
    created = not run_dir.exists()
    try:
        rank, world, device = _dist_setup(cfg.device)
        strategy = distributed.resolve_strategy(cfg.strategy, world)
        if strategy == "fsdp":
            distributed.init_single_process_group(device)  # no-op under torchrun
        lock = _lock_run_dir(run_dir, rank, world)
        return _train(cfg, rank, world, device, strategy, run_dir, progress)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM where the caller made one of it (stops.raise_on_signals)
        if isinstance(e, RunInterrupted):
            raise
        raise RunInterrupted(getattr(e, "signum", signal.SIGINT), progress.stage, progress.step,
                             _last_checkpoint(run_dir)) from None
    except BaseException as e:  # BaseException: DCP's CheckpointException is one
        why = disk_full(e)
        if why is None:
            raise
        raise OutOfSpace(_out_of_space_message(why, run_dir, progress), _last_checkpoint(run_dir)) from e
    finally:
        if lock is not None:
            _release(lock, run_dir, created)


def _release(lock: DirLock, run_dir: Path, created: bool) -> None:
    """Unlock the run folder; a folder this run created and left empty but for the lock goes too (a run
    refused before its first write leaves nothing; the file is unlinked while still held, as DirLock does)."""
    empty = created and [p.name for p in run_dir.iterdir()] == [lock.path.name]
    if empty:
        lock.path.unlink(missing_ok=True)
    lock.release()
    if empty:
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def _lock_run_dir(run_dir: Path, rank: int, world: int) -> DirLock | None:
    """Rank 0 locks the run folder before anything is written there (it alone writes config.json, the
    metrics and the published checkpoints); every rank gets its refusal, so all stop together."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = DirLock(run_dir, what="training run", done_marker=None,
                           advice="wait for it to end or stop it (then --resume continues it), or give another "
                                  "--out").acquire()
        except DirLockedError as e:
            refusal = str(e)
    if world > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise DirLockedError(refusal)
    return lock


def _last_checkpoint(run_dir: Path) -> Path | None:
    """The latest complete checkpoint, or None (none, or `latest` names one that is gone)."""
    try:
        return ckpt.latest_checkpoint(run_dir)
    except (OSError, TrainError):
        return None


def _out_of_space_message(why: str, run_dir: Path, progress: Progress) -> str:
    where = "before training began" if progress.stage is None else f"at stage {progress.stage} step {progress.step}"
    disk = run_dir.resolve()
    while not os.path.ismount(disk):
        disk = disk.parent
    free = shutil.disk_usage(run_dir).free / 2**30
    saved = ckpt.describe(_last_checkpoint(run_dir))
    return (f"out of space writing to {run_dir} ({why}) {where}: the disk mounted at {disk} has "
            f"{free:.1f} GiB free (a quota or `ulimit -f` may be lower); saved: {saved}")


def _load_student_processor(student: str):
    """The student's family adapter and processor; a folder or hub id that is not a model is RunRefused."""
    try:
        adapter = adapter_for(model_config(student, "--student"))
        return adapter, adapter.load_processor(student)
    except ValueError as e:
        raise RunRefused(str(e)) from None
    except OSError as e:  # a config but no processor files
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RunRefused(f"--student {student}: cannot be loaded ({first[:300]}); give a student model folder "
                         f"(config.json, weights, processor) or a hub id") from e


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, strategy: str, run_dir: Path,
           progress: Progress) -> Path:
    torch.manual_seed(cfg.seed)

    cache = open_cache(cfg.cache, local_cache=cfg.local_cache)
    # FSDP places (and casts) the head itself: load it in host memory first
    head = cache.head(device=torch.device("cpu") if strategy == "fsdp" else device)
    adapter, processor = _load_student_processor(cfg.student)
    check_cache_matches(cache, head, cfg)
    # the student-aligned main pass aligns answers by their text: the data thread needs the teacher's tokenizer
    aligned = cfg.main_pass_answer == "student_aligned" and bool({1, 2} & set(cfg.stages))
    teacher_tokenizer = load_teacher_tokenizer(cfg, cache) if aligned else None
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None and rank == 0:  # a requeued job's first try; or a typo in --out
        print(f"--resume: no checkpoint in {run_dir} yet, so the run starts from the beginning", file=sys.stderr,
              flush=True)
    st = ckpt.load_state(resume_from) if resume_from is not None else {}
    if resume_from is not None:  # refused before the student is loaded
        _check_resumable(resume_from, st, cfg, cache, strategy, world)
    model = build_model(cfg, adapter, head, strategy, device, rank)

    start_stage_pos, step0, position0, metrics_lines = 0, 0, 0, None
    from_checkpoint = resume_from is not None
    if resume_from is not None:
        if strategy == "fsdp":
            sharded.load_model(resume_from, model)
        else:
            ckpt.load_weights(resume_from, student=model.student, recalibrator=model.recalibrator)
        metrics_lines = st.get("metrics_lines")
        # Every rank resumes at its own position: ranks skip different unusable samples.
        positions = st.get("positions", [st["position"]])
        if len(positions) != world:  # FSDP only (_check_resumable): DCP re-shards the weights; the data cannot
            positions = distributed.remap_positions(positions, world)  # be replayed exactly: see there
        step0, position0 = st["step"], positions[rank]
        if st["stage"] in cfg.stages:
            start_stage_pos = cfg.stages.index(st["stage"])
            if st.get("stage_done"):
                start_stage_pos, step0, position0, resume_from = start_stage_pos + 1, 0, 0, None
        else:  # a finished earlier run (e.g. --stages 1, now --stages 2,3): its weights, our stages from the start
            start_stage_pos, step0, position0, resume_from = 0, 0, 0, None
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    # no checkpoint to continue from: the run starts over, and so does its log (a run killed before its
    # first checkpoint left records that the new one would log a second time)
    log = MetricsLog(run_dir, enabled=rank == 0, truncate_to=metrics_lines if from_checkpoint else 0)
    identity = ckpt.cache_identity(cache.manifest)  # recorded in every checkpoint (_check_same_cache)
    try:
        for stage in cfg.stages[start_stage_pos:]:
            stream = CacheStream(cache, adapter, processor, batch_size=cfg.batch_size, max_len=cfg.max_len,
                                 seed=cfg.seed + 1000 * stage, rank=rank, world_size=world, prefetch=cfg.prefetch,
                                 teacher_tokenizer=teacher_tokenizer if stage in (1, 2) else None,
                                 # teacher states in the cache's precision (bf16 widened on the device; low-rank
                                 # context rows as coefficients, folded into Proj-pre: model.reg_prefix), pinned on a GPU
                                 precision="stored", context=cfg.reads_context(stage),
                                 pin_memory=device.type == "cuda")
            try:
                run_stage(stage, model, stream, cfg, run_dir, log, device, rank, world,
                          step0=step0, position0=position0, resume_from=resume_from, progress=progress,
                          cache_identity=identity)
            finally:  # stops and joins the data thread, also after an error: none is left at interpreter exit
                stream.close()
            step0, position0, resume_from = 0, 0, None
            if rank == 0:  # the loss curves so far, beside metrics.jsonl (skipped, said once, without matplotlib)
                plot_curves(run_dir / "metrics.jsonl")
    finally:
        log.close()
    final = run_dir / "final"
    if strategy == "fsdp":  # gather the shards (a collective); rank 0 saves them in the compute dtype
        distributed.save_pretrained(model.student, final, distributed.param_dtype(cfg.param_dtype))
        if rank == 0:
            processor.save_pretrained(final)
    elif rank == 0:
        model.student.save_pretrained(final)
        processor.save_pretrained(final)
    if dist.is_initialized():
        dist.barrier()
        # an undestroyed gloo group can abort the process at interpreter exit ("terminate called ...")
        dist.destroy_process_group()
    return final


def build_model(cfg: TrainConfig, adapter, head, strategy: str, device: torch.device, rank: int) -> GenRecal:
    """The student (pretrained, fp32) with a fresh Recalibrator, placed for `strategy`.

    Under FSDP only rank 0 reads the student into host memory (and initialises the Recalibrator);
    the other ranks build both on the meta device, every rank shards, then rank 0's weights are
    broadcast into the shards (`distributed.load_from_rank0`): host memory per rank is the teacher
    head plus one tensor in flight, not the whole fp32 model."""
    on_meta = strategy == "fsdp" and rank != 0
    if on_meta:
        student = distributed.meta_student(adapter, cfg.student)
    else:
        student = adapter.load_model(cfg.student, dtype=torch.float32,
                                     device="cpu" if strategy == "fsdp" else str(device))
    torch.manual_seed(cfg.seed)  # the Recalibrator's init depends on the seed only (the same in every run)
    model = GenRecal(student, adapter, head, cfg)
    if strategy != "fsdp":
        return model.to(device)
    full = distributed.full_weights(model) if rank == 0 else {}
    distributed.shard_model(model, distributed.param_dtype(cfg.param_dtype), device, cfg.cpu_offload,
                            checkpoint_recalibrator=cfg.gradient_checkpointing)
    distributed.load_from_rank0(model, full, device, cfg.cpu_offload)
    return model


def _check_resumable(path: Path, st: dict, cfg: TrainConfig, cache, strategy: str, world: int) -> None:
    """Refuse (RunRefused) a resume that would not continue the run its checkpoint `path` (state `st`) began."""
    _check_same_cache(path, st, cache)
    if st["stage"] not in cfg.stages and not st.get("stage_done"):
        raise RunRefused(f"{path} is an unfinished stage {st['stage']}, which --stages "
                         f"{','.join(map(str, cfg.stages))} does not run; include it to finish it")
    if sharded.is_sharded(path) != (strategy == "fsdp"):
        raise RunRefused(f"{path} was written by a run with strategy "
                         f"{'fsdp' if sharded.is_sharded(path) else 'single/ddp'}; resume it with "
                         f"the same strategy (this run: {strategy})")
    ranks = len(st.get("positions", [st["position"]]))
    if ranks != world and strategy != "fsdp":
        raise RunRefused(f"{path} was written by a run with {ranks} rank(s); resume it "
                         f"with the same number of processes (this run has {world})")
    if not st.get("stage_done"):
        _check_same_stream(path, st, cfg)


def _check_same_stream(path: Path, state: dict, cfg: TrainConfig) -> None:
    """A stage resumed mid-way must go on as the interrupted run would have: the same batches (its position
    counts samples of a stream whose order depends on the seed and whose steps on the batch size) and the same
    updates (LR, loss weights, ...): the settings `TrainConfig` marks `same_on_resume`. Checkpoints written
    before `settings` was saved hold batch_size, grad_accum and seed beside the stage."""
    saved = state.get("settings") or {k: state[k] for k in ("batch_size", "grad_accum", "seed") if k in state}
    now = cfg.resume_settings()
    diff = [f"--{k.replace('_', '-')} {_flag_value(v)} (this run: {_flag_value(now[k])})"
            for k, v in saved.items() if k in now and v != now[k]]
    if diff:
        raise RunRefused(f"{path} is stage {state['stage']} step {state['step']} of a run with {', '.join(diff)}; "
                         f"resuming it differently would not continue that run (other samples, other steps). "
                         f"Resume with the same settings, or start a new --out")


def _flag_value(v: object) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _check_same_cache(path: Path, state: dict, cache) -> None:
    """A resumed run trains on the cache its checkpoint trained on (the same features, samples, teacher and
    settings: `checkpoint.cache_identity`), wherever it now lies; checkpoints from before it was recorded pass."""
    saved = state.get("cache")
    if saved is None:
        return
    now = ckpt.cache_identity(cache.manifest)
    diff = [f"{k} {a!r:.80} (this cache: {b!r:.80})" for k, a, b in identity_diff(saved, now) if k != "files sha256"]
    if not diff and saved.get("files sha256") != now.get("files sha256"):
        diff = ["other files (the same teacher, settings and counts: another extraction or other data)"]
    if diff:
        raise RunRefused(f"{path} was trained on another cache than {cache.url}: {'; '.join(diff)}; resuming on "
                         f"this one would not continue that run. Give --cache the cache it trained on, or start a "
                         f"new --out")


def _non_finite(sums: dict[str, float], grad_norms: list[torch.Tensor]) -> str | None:
    """What is not finite in this step (loss terms, gradient norms), or None."""
    bad = [f"{k}={v}" for k, v in sums.items() if not math.isfinite(v)]
    bad += [f"gradient norm {float(n)}" for n in grad_norms if not torch.isfinite(n)]
    return ", ".join(bad) or None


def get_lr(cfg: TrainConfig, step: int, total: int) -> float:
    """The LR of a stage's step (0-based) out of `total`: a linear warm-up 0 -> lr over the first `warmup` of the
    stage (a fresh AdamW's first steps move every weight by ~lr whatever its gradient), then a linear decay
    lr -> lr_end to the stage's last step."""
    n_warm = round(cfg.warmup * total)
    if step < n_warm:
        return cfg.lr * (step + 1) / n_warm
    return cfg.lr + (cfg.lr_end - cfg.lr) * ((step - n_warm) / max(1, total - 1 - n_warm))


def run_stage(stage: int, model: GenRecal, stream: CacheStream, cfg: TrainConfig, run_dir: Path, log: MetricsLog,
              device: torch.device, rank: int, world: int, *, step0: int, position0: int,
              resume_from: Path | None, progress: Progress | None = None,
              cache_identity: dict[str, Any] | None = None) -> None:
    """One stage from `step0`; `progress` follows its steps, `cache_identity` goes into its checkpoints."""
    progress = progress if progress is not None else Progress()
    progress.stage, progress.step = stage, step0
    params = model.set_stage(stage)
    # Student and Recalibrator are clipped apart: under one joint norm the (large, early) KD gradients
    # of a fresh Recalibrator would shrink every student update in stage 2.
    rec_ids = {id(p) for p in model.recalibrator.parameters()}
    clip_groups = [g for g in ([p for p in params if id(p) not in rec_ids], [p for p in params if id(p) in rec_ids]) if g]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    strategy = distributed.resolve_strategy(cfg.strategy, world)
    if strategy == "fsdp":
        distributed.refresh_trainable(model)
    if resume_from is not None:
        if strategy == "fsdp":
            sharded.load_optimizer(resume_from, model, opt)
        else:
            ckpt.load_optimizer(resume_from, opt)
    total = stage_steps(cfg, stream, world, stage)
    ddp = model  # under FSDP the model itself is the (sharded) root module
    if strategy == "ddp":
        # No buffer broadcast per forward: the frozen teacher head (152k x d) is a buffer, identical on all ranks.
        no_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 renamed broadcast_buffers
                   if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **no_sync)
    # FSDP computes in its param_dtype already (MixedPrecisionPolicy); DDP keeps fp32 weights under autocast
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and strategy != "fsdp"
                else contextlib.nullcontext())
    model.train()
    # rank 0 keeps tqdm's defaults, so that TQDM_DISABLE=1 silences the bar (logs of scripted runs)
    bar = tqdm(total=total, initial=step0, desc=f"stage {stage}", dynamic_ncols=True, **({"disable": True} if rank else {}))
    batches = stream.batches(position0)
    position = position0
    t_stage = time.perf_counter()
    try:
        for step in range(step0, total):
            lr = get_lr(cfg, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            # Randomness (dropout) as a function of (seed, stage, step, rank): a resumed run draws the same.
            torch.manual_seed(cfg.seed + 1_000_003 * stage + 1009 * step + rank)
            t0, wait0, tokens = time.perf_counter(), stream.wait_s, 0
            sums: dict[str, float] = {}
            indices: list[int] = []
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                position, tokens = batch.position, tokens + batch.num_tokens
                indices += [e.index for e in batch.examples]
                # FSDP reduce-scatters every micro-batch (sharded grads accumulate; no unsharded copies held)
                sync = micro == cfg.grad_accum - 1 or strategy != "ddp"
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                    losses = ddp(batch, stage)
                    (losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            norms = [distributed.clip_grad_norm_(group, 1.0) for group in clip_groups]
            bad = _non_finite(sums, norms)
            if world > 1:  # every rank stops together (a rank left in the next all-reduce would hang)
                flag = torch.tensor([float(bad is not None)], device=device)
                dist.all_reduce(flag)
                bad = bad or ("on another rank" if flag.item() else None)
            if bad is not None:
                last = ckpt.latest_checkpoint(run_dir)
                raise TrainError(
                    f"stage {stage} step {step + 1}: not finite: {bad} (cache samples {indices} on rank {rank}); "
                    f"stopped before the optimizer step, so nothing of it was applied or saved. Last good checkpoint: "
                    f"{last or 'none yet'}. Usual causes: NaN/inf in the cache (`genrecal-cache verify`), or a too "
                    f"high --lr; fix it and continue with --resume")
            opt.step()
            progress.step = step + 1
            # what each rank holds (weights, grads, AdamW state, head), logged on a stage's first step
            state_bytes = distributed.local_state_bytes(model, opt) if step == step0 else None
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            positions, rank_indices, rank_bytes = [position], [indices], [state_bytes]
            if world > 1:  # every rank's stream position (for resume) and samples (for the log)
                gathered: list = [None] * world
                dist.all_gather_object(gathered, (position, indices, state_bytes))
                positions, rank_indices, rank_bytes = ([g[0] for g in gathered], [g[1] for g in gathered],
                                                       [g[2] for g in gathered])
            record = {"stage": stage, "step": step + 1, "lr": lr, **sums, "tokens_per_s": tokens * world / dt,
                      "data_wait_frac": (stream.wait_s - wait0) / dt, "position": position, "sample_indices": indices}
            if world > 1:
                record |= {"rank_positions": positions, "rank_sample_indices": rank_indices}
            if state_bytes is not None:  # with the threads (they set the order of float sums: the numbers)
                record |= {"rank_state_bytes": rank_bytes, "torch_threads": torch.get_num_threads()}
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                log.log(record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()} | {"tok/s": f"{record['tokens_per_s']:.0f}"})
            done = step + 1 == total
            if done or (step + 1) % cfg.checkpoint_every == 0:
                name = f"stage{stage}-step{step + 1:07d}"
                state = {"stage": stage, "step": step + 1, "position": position, "positions": positions,
                         "world_size": world, "stage_done": done, "metrics_lines": log.lines,
                         "settings": cfg.resume_settings(), "cache": cache_identity,
                         "elapsed_s": time.perf_counter() - t_stage}
                if strategy == "fsdp":  # every rank writes its shards
                    sharded.save(run_dir, name, model=model, optimizer=opt, state=state)
                elif rank == 0:
                    ckpt.save_checkpoint(run_dir, name, student=model.student,
                                         recalibrator=model.recalibrator if stage in (1, 2) else None, optimizer=opt,
                                         state=state)
            if world > 1:
                dist.barrier()
    finally:  # also on an error: the bar ends its line, the data thread is joined
        bar.close()
        batches.close()
