"""FSDP2 training (issue 15): 2 CPU processes (torchrun, gloo) against a single process, SIGKILL +
--resume from sharded (DCP) checkpoints, resuming with another world size, the bf16 path.

The FSDP runs use float32 parameters (`--param-dtype float32`), so the comparison with a plain
single-process run is limited only by float32 summation order, not by bf16 rounding; one run
checks the bf16 path (`--param-dtype bfloat16`, the default) end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genrecal_cache.families import adapter_for
from genrecal_cache import open_cache
from genrecal_train.config import TrainConfig
from genrecal_train.batches import collate, make_example
from genrecal_train.model import GenRecal

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, LR, LR_END = 4, 2, 1e-3, 1e-4  # per stage; per rank


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1")


def _cmd(cache: Path, student: Path, out: Path, *extra: str, nproc: int = 2) -> list[str]:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
              if nproc > 1 else [sys.executable])
    return [*launch, "-m", "cli.train_cli", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--stages", "1,2", "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--checkpoint-every", "2",
            "--lr", str(LR), "--lr-end", str(LR_END), "--warmup", "0",  # the plain decay the parity loop replays
            "--device", "cpu", "--strategy", "fsdp", "--param-dtype", "float32", *extra]


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once, as a lost node (Linux /proc)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _records(run: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["stage"], r["step"])] = r
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory, train_cache: Path, student_dir: Path) -> Path:
    """Stages 1 and 2, STEPS each, on 2 processes with --strategy fsdp (float32 params)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    done = subprocess.run(_cmd(train_cache, student_dir, out), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_fsdp_two_ranks_match_one_process_on_the_same_global_batch(fsdp_run: Path, train_cache: Path,
                                                                   student_dir: Path) -> None:
    """A plain single-process AdamW loop over the same samples (each step: both ranks' micro-batches,
    each loss / 2, as FSDP averages the ranks' gradients) gives the same losses and weights.

    Tolerance: the two runs add the same float32 numbers in another order (reduce-scatter vs
    accumulation, per-shard vs whole gradient norms), ~1e-7 relative per operation. In this tiny
    random model at lr 1e-3 such differences grow ~10x per step (measured: the single-process
    trainer and this loop, the same arithmetic in another order, differ by 3e-7, 7e-6, 9e-4 in
    the loss at steps 2-4 and by ~2e-3 at step 8; their final weight changes differ by ~9%). So:
    - the first three steps tightly (1e-4; 1.2e-5 measured at step 3): a rank's gradient left out of the reduction, a per-rank clip
      factor or a wrong learning rate changes the update direction, i.e. those losses by >1e-3;
    - the whole curve within 5e-3, and the weights' total change within 25% of its size, which a
      lost step, a wrong stage's parameters or an unloaded shard exceed."""
    recs = _records(fsdp_run)
    cfg = TrainConfig(cache=str(train_cache), student=str(student_dir), out=str(fsdp_run), device="cpu")
    cache, adapter = open_cache(train_cache), adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    torch.manual_seed(cfg.seed)  # the trainer seeds, loads the student, then seeds again for the Recalibrator
    student = adapter.load_model(student_dir)
    torch.manual_seed(cfg.seed)
    model = GenRecal(student, adapter, cache.head(), cfg)
    tok = cache.teacher_tokenizer()
    batch = lambda idx: collate([make_example(cache[i], adapter, processor, cfg.max_len, tok) for i in idx],  # noqa: E731
                                processor.tokenizer.pad_token_id, 0)
    for stage in (1, 2):
        params = model.set_stage(stage)
        rec_ids = {id(p) for p in model.recalibrator.parameters()}
        groups = [g for g in ([p for p in params if id(p) not in rec_ids], [p for p in params if id(p) in rec_ids]) if g]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=cfg.weight_decay)
        model.train()
        for step in range(STEPS):
            r = recs[(stage, step + 1)]
            for g in opt.param_groups:
                g["lr"] = LR + (LR_END - LR) * step / (STEPS - 1)
            for rank, idx in enumerate(r["rank_sample_indices"]):
                losses = model(batch(idx), stage)
                (losses["loss"] / 2).backward()
                if rank == 0:  # the log holds rank 0's micro-batch losses
                    tol = 1e-4 if (stage, step) < (1, 3) else 5e-3  # relative, and absolute for small terms
                    for k in ("loss", "l_ar", "reg_kl") + (("l_s",) if stage == 2 else ()):
                        assert r[k] == pytest.approx(float(losses[k].detach()), rel=tol, abs=tol), (stage, step + 1, k)
            for g in groups:
                torch.nn.utils.clip_grad_norm_(g, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert {v.dtype for v in _weights(fsdp_run / "final").values()} == {torch.float32}  # the param dtype
    got = adapter.load_model(fsdp_run / "final").state_dict()
    want, init = model.student.state_dict(), adapter.load_model(student_dir).state_dict()
    assert got.keys() == want.keys()
    norm = lambda d: sum(float(v.pow(2).sum()) for v in d.values()) ** 0.5  # noqa: E731
    moved = norm({k: want[k] - init[k] for k in want})
    assert moved > 0.1 and norm({k: got[k] - want[k] for k in want}) < 0.25 * moved
    vision = tuple(adapter.vision_parameter_prefixes(model.student))
    assert all(torch.equal(got[k], init[k]) for k in got if k.startswith(vision))  # frozen stays bit-exact


def test_sigkill_in_stage2_then_resume_gives_the_uninterrupted_weights(fsdp_run: Path, tmp_path: Path,
                                                                        train_cache: Path, student_dir: Path):
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(train_cache, student_dir, run), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    latest, metrics = run / "checkpoints" / "latest", run / "metrics.jsonl"
    killed_at = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.exists() and metrics.exists():
                ck = latest.read_text().strip()
                steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()
                         if x.strip() and json.loads(x)["stage"] == 2]
                if ck.startswith("stage2-") and steps and max(steps) > int(ck.split("step")[1]):
                    _kill_tree(proc.pid)  # every rank and the launcher at once
                    killed_at = ck
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            _kill_tree(proc.pid)
        _, err = proc.communicate(timeout=60)
    assert killed_at is not None, f"run ended (rc={proc.returncode}) before the kill in stage 2:\n{err[-3000:]}"
    assert not (run / "final").exists()
    assert (run / "checkpoints" / killed_at / ".metadata").exists()  # a DCP checkpoint, one file per rank
    assert sorted(p.name for p in (run / "checkpoints" / killed_at).glob("*.distcp")) == ["__0_0.distcp",
                                                                                       "__1_0.distcp"]
    done = subprocess.run(_cmd(train_cache, student_dir, run, "--resume"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = _records(fsdp_run), _records(run)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key]["rank_sample_indices"] == b[key]["rank_sample_indices"], key
        assert b[key]["loss"] == pytest.approx(a[key]["loss"], rel=1e-6), key
    wa, wb = _weights(fsdp_run / "final"), _weights(run / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # same shards, same math


def test_sharded_checkpoint_loads_into_another_world_size(fsdp_run: Path, tmp_path: Path, train_cache: Path,
                                                          student_dir: Path) -> None:
    """The 2-rank DCP checkpoint re-shards into 1 process: the weights it loads are the run's, and a
    1-process --resume finishes the stage from there."""
    import torch.distributed as dist

    from genrecal_train import distributed, sharded_checkpoint

    cfg = TrainConfig(cache=str(train_cache), student=str(student_dir), out=str(tmp_path), device="cpu")
    adapter = adapter_for(student_dir)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = GenRecal(adapter.load_model(student_dir), adapter, open_cache(train_cache).head(), cfg)
        distributed.shard_model(model, torch.float32, torch.device("cpu"))
        sharded_checkpoint.load_model(fsdp_run / "checkpoints" / f"stage2-step{STEPS:07d}", model)
        loaded = distributed.full_state_dict(model.student)
    finally:
        dist.destroy_process_group()
    final = adapter.load_model(fsdp_run / "final").state_dict()  # the end of stage 2 is that checkpoint
    assert loaded.keys() == final.keys() and all(torch.equal(loaded[k], final[k]) for k in final)

    run = tmp_path / "one"
    shutil.copytree(fsdp_run, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / f"stage2-step{STEPS:07d}")
    (run / "checkpoints" / "latest").write_text("stage2-step0000002")
    done = subprocess.run(_cmd(train_cache, student_dir, run, "--resume", nproc=1), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    state = json.loads((run / "checkpoints" / "stage2-step0000002" / "state.json").read_text())
    recs = _records(run)
    assert [k for k in recs if k[0] == 2] == [(2, s) for s in range(1, STEPS + 1)]
    # the one new rank starts where the two old ranks were on average through their halves (= their sum)
    assert recs[(2, 3)]["position"] == sum(state["positions"]) + BATCH
    assert (run / "final" / "model.safetensors").exists()


def test_bf16_fsdp_run_saves_a_bf16_student_that_transformers_loads(fsdp_run: Path, tmp_path: Path,
                                                                   train_cache: Path, student_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "bf16"
    cmd = _cmd(train_cache, student_dir, out, "--gradient-checkpointing")
    cmd[cmd.index("float32")] = "bfloat16"
    cmd[cmd.index("--max-steps") + 1] = "1"
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    recs = _records(out)
    assert sorted(recs) == [(1, 1), (2, 1)]  # stage 2 after stage 1: the student's units start training
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs.values())
    # the first step's losses (same init, same samples) agree with the float32 run to bf16 precision
    first = _records(fsdp_run)[(1, 1)]
    for k in ("l_ar", "reg_ar"):
        assert recs[(1, 1)][k] == pytest.approx(first[k], rel=2e-2), k
    model = AutoModelForImageTextToText.from_pretrained(out / "final", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert {v.dtype for v in _weights(out / "final").values()} == {torch.bfloat16}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_plan_state_bytes_equal_the_local_shards_of_the_fsdp_run(fsdp_run: Path, train_cache: Path,
                                                                 student_dir: Path) -> None:
    """Every rank logged the storage bytes of its weights, grads, AdamW state and head after its first
    step of each stage; `genrecal-train plan`'s arithmetic, from the config alone, gives the same."""
    from transformers import AutoConfig

    from genrecal_train import memory_plan as plan

    m = open_cache(train_cache).manifest
    meta = plan.meta_model(AutoConfig.from_pretrained(student_dir), m.hidden_size, m.vocab_size, 2)
    recs = _records(fsdp_run)
    for stage in (1, 2):
        meta.set_stage(stage)
        logged = recs[(stage, 1)]["rank_state_bytes"]
        assert len(logged) == 2
        for rank in (0, 1):
            want = plan.state_bytes(meta, "fsdp", 2, rank, torch.float32)
            assert logged[rank] == want, (stage, rank, logged[rank], want)


def test_one_process_fsdp_with_offload_and_checkpointing_trains_a_qwen2_vl_student(tmp_path: Path, train_cache: Path,
                                                                                  teacher_dir: Path) -> None:
    """The 1 x 24 GB recipe on CPU: FSDP in one process (a world of one), --cpu-offload,
    --gradient-checkpointing, bf16; the student is a Qwen2-VL (the tiny teacher's architecture, the
    paper's student family). Its per-rank bytes are the plan's, for this architecture too."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from genrecal_train import memory_plan as plan
    from genrecal_train.trainer import train

    out = tmp_path / "run"
    train(TrainConfig(cache=str(train_cache), student=str(teacher_dir), out=str(out), device="cpu", prefetch=2,
                      stages=[2], max_steps=2, batch_size=2, checkpoint_every=1, strategy="fsdp", cpu_offload=True,
                      gradient_checkpointing=True))
    recs = _records(out)
    assert sorted(recs) == [(2, 1), (2, 2)] and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs.values())
    m = open_cache(train_cache).manifest
    meta = plan.meta_model(AutoConfig.from_pretrained(teacher_dir), m.hidden_size, m.vocab_size, 2)
    assert recs[(2, 1)]["rank_state_bytes"] == [plan.state_bytes(meta, "fsdp", 1, 0, torch.bfloat16)]
    assert (out / "checkpoints" / "stage2-step0000002" / ".metadata").exists()
    model = AutoModelForImageTextToText.from_pretrained(out / "final", dtype="auto")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and model.dtype == torch.bfloat16


@pytest.mark.parametrize("flags,match", [({"strategy": "zero3"}, "strategy: got 'zero3'"),
                                         ({"strategy": "fsdp", "param_dtype": "int8"}, "param_dtype: got 'int8'")])
def test_unknown_strategy_or_param_dtype_is_refused_before_loading(flags: dict, match: str, tmp_path: Path,
                                                                   train_cache: Path, student_dir: Path) -> None:
    from genrecal_train.trainer import train

    with pytest.raises(ValueError, match=match):
        train(TrainConfig(cache=str(train_cache), student=str(student_dir), out=str(tmp_path / "run"), device="cpu",
                          **flags))
    assert not (tmp_path / "run").exists()


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def load_student(request: pytest.FixtureRequest, tmp_path: Path, student_dir: Path) -> tuple[Path, bool]:
    """(folder, tied): the tiny student, and a copy with tied input/output embeddings (as Qwen2-VL-2B has)."""
    if not request.param:
        return student_dir, False
    tied = tmp_path / "tied"
    shutil.copytree(student_dir, tied)
    model = adapter_for(student_dir).load_model(student_dir)
    model.config.tie_word_embeddings = model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tied)
    return tied, True


def test_only_rank0_loads_the_full_student_the_others_get_their_shards(tmp_path: Path, train_cache: Path,
                                                                       load_student: tuple[Path, bool]) -> None:
    """`--strategy fsdp` loads the pretrained student (and initialises the Recalibrator) on rank 0 only:
    rank 1 builds both on the meta device and holds no byte of their parameters when it shards (rank 0
    holds all of them), then receives exactly its shards of rank 0's weights, and rank 0's RoPE
    `inv_freq` / position-id buffers (which the meta device never computed); tied embeddings stay one
    parameter on every rank. Byte counts, not process memory: exact and independent of what else runs
    on the machine."""
    from transformers import AutoConfig

    from genrecal_train import memory_plan as plan

    student_dir, tied = load_student
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "_fsdp_load_worker.py"), str(train_cache), str(student_dir), str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["full"] == r1["full"] > 0
    assert r0["before_shard"] == r0["full"] and r1["before_shard"] == 0

    # the shards each rank holds are FSDP's (plan.state_bytes: dim-0 chunks, padded to rank 0's) ...
    cfg = TrainConfig(cache=str(train_cache), student=str(student_dir), out=str(tmp_path), device="cpu")
    m = open_cache(train_cache).manifest
    meta = plan.meta_model(AutoConfig.from_pretrained(student_dir), m.hidden_size, m.vocab_size, cfg.recal_layers)
    for rank, r in enumerate((r0, r1)):
        assert r["local_params"] == plan.state_bytes(meta, "fsdp", 2, rank, torch.float32)["params"] < r["full"]
        assert r["parameters"] == len(list(meta.parameters()))

    # ... of the weights a single process starts from: the pretrained student and the seeded Recalibrator
    adapter = adapter_for(student_dir)
    student = adapter.load_model(student_dir)
    torch.manual_seed(cfg.seed)
    ref = GenRecal(student, adapter, open_cache(train_cache).head(), cfg)
    assert r0["tied"] == r1["tied"] == tied == (adapter.lm_head(student).weight is
                                                adapter.text_model(student).embed_tokens.weight)
    for part in ("student", "recalibrator"):  # gathered from both ranks' shards
        want, got = getattr(ref, part).state_dict(), r0["weights"][part]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    buffers = {n: b for n, b in ref.named_buffers() if not n.startswith("head.")}
    assert any(n.endswith("inv_freq") for n in buffers)
    for r in (r0, r1):
        assert r["buffers"].keys() == buffers.keys()
        assert all(torch.equal(r["buffers"][n], buffers[n]) for n in buffers)
