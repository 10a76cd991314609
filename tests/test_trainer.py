"""Acceptance tests of the trainer (issue 3): real tiny models, real extracted caches, no mocks.

The teacher is a tiny random Qwen2-VL, the student a tiny random LLaVA with another tokenizer; the
caches come from `genrecal_cache.extract` (transformers backend, float32 hidden states). CLI runs go
through subprocesses where the test needs a real process (SIGKILL, torchrun), in-process otherwise.
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
from genrecal_train.config import TrainConfig, load_config
from genrecal_train.batches import collate, make_example
from genrecal_train.model import GenRecal
from genrecal_train.trainer import train

REPO = Path(__file__).resolve().parents[1]
STAGE1_TERMS = ("l_ar", "l_kl", "reg_ar", "reg_kl")
TRAIN_STEPS = 12  # per stage, in `trained_run`


# ---- helpers -----------------------------------------------------------------------------------

def _cfg(cache: Path, student: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), student=str(student), out=str(out), device="cpu", prefetch=2, batch_size=4,
                checkpoint_every=1000)
    return TrainConfig(**(base | kw))


def _env() -> dict[str, str]:
    # conftest has put the CPU compat shim on PYTHONPATH; keep subprocesses offline and quiet
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.train_cli", *args]


def _batches(cache_dir: Path, student_dir: Path, batch_size: int = 4):
    """Every sample of a cache, encoded for the student, in fixed batches (cache order)."""
    cache = open_cache(cache_dir)
    adapter = adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    tok = cache.teacher_tokenizer()
    examples = [make_example(cache[i], adapter, processor, 2048, tok) for i in range(len(cache))]
    pad = processor.tokenizer.pad_token_id
    return [collate(examples[j:j + batch_size], pad, 0) for j in range(0, len(examples), batch_size)]


def _genrecal(student_dir: Path, cache_dir: Path, cfg: TrainConfig, student_path: Path | None = None) -> GenRecal:
    """A fresh GenRecal (own student copy); the Recalibrator initialised exactly as the trainer does."""
    adapter = adapter_for(student_dir)
    student = adapter.load_model(student_path or student_dir)
    torch.manual_seed(cfg.seed)
    return GenRecal(student, adapter, open_cache(cache_dir).head(), cfg)


@torch.no_grad()
def _mean_losses(model: GenRecal, batches, stage: int) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    for b in batches:
        for k, v in model(b, stage).items():
            sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    return sums


def _records(run_dir: Path) -> dict[tuple[int, int], dict]:
    """metrics.jsonl by (stage, step); a step logged twice (killed, then redone on resume) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["stage"], r["step"])] = r
    return out


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- 1. the teacher head from the cache ----------------------------------------------------------

def test_cache_head_reproduces_cached_topk(train_cache: Path) -> None:
    cache = open_cache(train_cache)
    head = cache.head()
    n_tok = agree = 0
    for s in cache.iter_samples():
        rows = s.topk_rows  # the product's default: top-k stored at answer rows only
        assert rows.any() and not rows.all() and s.exact_rows[rows].all()
        logp = torch.log_softmax(head.logits(torch.from_numpy(s.hidden[rows]), post_norm=True).float(), dim=-1)
        ids = torch.from_numpy(s.topk_ids[rows].astype("int64"))
        # the cached logprobs are the head's logprobs at the cached ids ...
        torch.testing.assert_close(logp.gather(1, ids), torch.from_numpy(s.topk_logprobs[rows]), atol=1e-5, rtol=1e-5)
        # ... and those ids are the head's top-k (exact ties at the k-th place may swap)
        vals, mine = logp.topk(ids.shape[1], dim=-1)
        torch.testing.assert_close(vals, torch.from_numpy(s.topk_logprobs[rows]), atol=1e-5, rtol=1e-5)
        agree += int((mine == ids).all(1).sum())
        n_tok += ids.shape[0]
    assert n_tok > 0 and agree / n_tok > 0.99


# ---- 2. gradients reach exactly what each stage trains ------------------------------------------

@pytest.mark.parametrize("case", ["stage1", "stage2", "stage2-frozen-recal", "stage2-no-student-loss",
                                  "stage2-gradient-checkpointing", "stage3"])
def test_gradients_reach_exactly_the_stage_parameters(case: str, train_cache: Path, student_dir: Path) -> None:
    stage = int(case[5])
    cfg = _cfg(train_cache, student_dir, student_dir, freeze_recalibrator_in_stage2=case == "stage2-frozen-recal",
               w_student=0.0 if case == "stage2-no-student-loss" else 1.0,
               gradient_checkpointing=case == "stage2-gradient-checkpointing")
    model = _genrecal(student_dir, train_cache, cfg)
    trainable = model.set_stage(stage)
    model.train()
    batch = _batches(train_cache, student_dir)[0]
    model(batch, stage)["loss"].backward()

    vision = tuple(model.adapter.vision_parameter_prefixes(model.student))
    student = {f"student.{n}" for n, _ in model.student.named_parameters()}
    student_vision = {f"student.{n}" for n, _ in model.student.named_parameters() if n.startswith(vision)}
    recal = {f"recalibrator.{n}" for n, _ in model.recalibrator.named_parameters()}
    expected = {
        "stage1": recal,
        "stage2": (student - student_vision) | recal,
        "stage2-gradient-checkpointing": (student - student_vision) | recal,
        "stage2-frozen-recal": student - student_vision,
        # L_s off: the student still learns, through z_qs and the Recalibrator's main pass
        "stage2-no-student-loss": (student - student_vision - {"student.lm_head.weight"}) | recal,
        "stage3": student - student_vision,
    }[case]
    assert student_vision and recal and not list(model.head.parameters())  # the head is buffers only
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == expected, f"missing grads: {sorted(expected - got)[:5]}, unexpected: {sorted(got - expected)[:5]}"
    # every other parameter has no .grad at all, and set_stage hands the optimizer exactly the trained ones
    wanted = expected | ({"student.lm_head.weight"} if case == "stage2-no-student-loss" else set())
    assert {n for n, p in model.named_parameters() if p.grad is not None} == wanted
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[id(p)] for p in trainable} == wanted
    assert all(b.grad is None for b in model.head.buffers())


# ---- 3. stages 1 and 2 learn, on held-out samples ------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, train_cache: Path, student_dir: Path) -> Path:
    """Stages 1 and 2 (TRAIN_STEPS each) on the training cache; checkpoints only at stage ends."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(_cfg(train_cache, student_dir, out, stages=[1, 2], max_steps=TRAIN_STEPS, lr=3e-3, lr_end=3e-4))
    return out


def test_stage1_lowers_heldout_recalibration_losses(trained_run: Path, train_cache: Path, heldout_cache: Path,
                                                    student_dir: Path) -> None:
    cfg = _cfg(train_cache, student_dir, trained_run)
    batches = _batches(heldout_cache, student_dir)
    model = _genrecal(student_dir, heldout_cache, cfg)  # the original student, the Recalibrator as initialised
    before = _mean_losses(model, batches, 1)
    ckpt = trained_run / "checkpoints" / f"stage1-step{TRAIN_STEPS:07d}"
    assert json.loads((ckpt / "state.json").read_text())["stage_done"]
    model.recalibrator.load_state_dict(_load_safetensors(ckpt / "recalibrator.safetensors"))
    after = _mean_losses(model, batches, 1)
    # stage 1 leaves the student alone
    saved, orig = _load_safetensors(ckpt / "student.safetensors"), model.student.state_dict()
    assert saved.keys() == orig.keys() and all(torch.equal(saved[k], orig[k]) for k in saved)
    total = lambda d: sum(d[k] for k in STAGE1_TERMS)  # noqa: E731
    assert total(after) < total(before) - 1.0, (before, after)
    for ar in ("l_ar", "reg_ar"):  # both passes learned to read the answer with the teacher head
        assert after[ar] < before[ar] - 0.4, (ar, before, after)


def test_stage2_lowers_heldout_student_answer_ce(trained_run: Path, train_cache: Path, heldout_cache: Path,
                                                 student_dir: Path) -> None:
    cfg = _cfg(train_cache, student_dir, trained_run)
    batches = _batches(heldout_cache, student_dir)
    before = _mean_losses(_genrecal(student_dir, heldout_cache, cfg), batches, 3)["l_s"]
    after = _mean_losses(_genrecal(student_dir, heldout_cache, cfg, trained_run / "final"), batches, 3)["l_s"]
    assert after < before - 1.0, (before, after)


def test_metrics_have_loss_terms_throughput_and_data_wait(trained_run: Path) -> None:
    recs = _records(trained_run)
    assert sorted(recs) == [(st, s) for st in (1, 2) for s in range(1, TRAIN_STEPS + 1)]
    for (stage, _), r in recs.items():
        terms = STAGE1_TERMS + (("l_s",) if stage == 2 else ())
        assert all(isinstance(r[k], float) for k in terms + ("loss", "lr", "tokens_per_s", "data_wait_frac"))
        assert r["loss"] == pytest.approx(sum(r[k] for k in terms), rel=1e-5)
        assert r["tokens_per_s"] > 0 and 0.0 <= r["data_wait_frac"] <= 1.0
        assert len(r["sample_indices"]) == 4
        # a stage's first step records the thread count (it sets the order of float sums: the numbers)
        assert r.get("torch_threads") == (torch.get_num_threads() if r["step"] == 1 else None)
    # the default warm-up (10% of 12 steps: one step) starts at the full LR; the decay ends at lr_end
    assert recs[(1, 1)]["lr"] == pytest.approx(3e-3) and recs[(1, TRAIN_STEPS)]["lr"] == pytest.approx(3e-4)
    assert json.loads((trained_run / "config.json").read_text())["stages"] == [1, 2]


# ---- 5. the saved student is a normal checkpoint -------------------------------------------------

def test_final_student_loads_with_auto_class_and_generates(trained_run: Path, student_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    final = trained_run / "final"
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(LlavaForConditionalGeneration.from_pretrained(final), LlavaForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(final)
    question = {"type": "text", "text": "What colour is the circle?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (56, 56), (220, 40, 40))], return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    processor.decode(out[0, inputs["input_ids"].shape[1]:])  # decodes with the saved tokenizer
    # stage 2 trained the language model and left the vision tower alone
    orig = LlavaForConditionalGeneration.from_pretrained(student_dir).state_dict()
    new = model.state_dict()
    assert not torch.equal(orig["lm_head.weight"], new["lm_head.weight"])
    frozen = tuple(adapter_for(final).vision_parameter_prefixes(model))
    vision = [k for k in orig if k.startswith(frozen)]
    assert vision and all(torch.equal(orig[k], new[k]) for k in vision)


# ---- 4. SIGKILL in stage 2, then --resume ---------------------------------------------------------

def test_resume_after_sigkill_in_stage2_matches_uninterrupted_run(tmp_path: Path, train_cache: Path,
                                                                 student_dir: Path) -> None:
    # batch 5 x 8 steps = 40 samples > 32: the stage crosses into its second epoch
    args = dict(stages=[2], max_steps=8, batch_size=5, checkpoint_every=3, lr=1e-3, lr_end=1e-4)
    ref = tmp_path / "uninterrupted"
    train(_cfg(train_cache, student_dir, ref, **args))

    run = tmp_path / "killed"
    flags = ["--cache", str(train_cache), "--student", str(student_dir), "--out", str(run), "--stages", "2",
             "--max-steps", "8", "--batch-size", "5", "--checkpoint-every", "3", "--lr", "1e-3", "--lr-end", "1e-4",
             "--device", "cpu"]
    proc = subprocess.Popen(_train_cmd(*flags), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    latest, metrics = run / "checkpoints" / "latest", run / "metrics.jsonl"
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.exists() and metrics.exists():
                ck = latest.read_text().strip()
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
                         if line.strip() and json.loads(line)["stage"] == 2]
                if ck.startswith("stage2-") and steps and max(steps) > int(ck.split("step")[1]):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = (ck, max(steps))
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert killed_at is not None, f"run ended (rc={proc.returncode}) before the kill in stage 2:\n{err[-3000:]}"
    assert proc.returncode == -signal.SIGKILL and not (run / "final").exists()
    ckpt_name, _ = killed_at
    ckpt_step = int(ckpt_name.split("step")[1])
    n_lines = json.loads((run / "checkpoints" / ckpt_name / "state.json").read_text())["metrics_lines"]
    assert len(metrics.read_text().splitlines()) > n_lines  # the killed run logged past its checkpoint

    done = subprocess.run(_train_cmd(*flags, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    new = [json.loads(line) for line in metrics.read_text().splitlines()[n_lines:]]
    # it continued from the checkpoint: first new step is the one after it, in stage 2
    assert (new[0]["stage"], new[0]["step"]) == (2, ckpt_step + 1), (killed_at, new[0])
    assert [r["step"] for r in new] == list(range(ckpt_step + 1, 9))
    # the killed run's records past the checkpoint were dropped: every step is logged once
    logged = [(json.loads(x)["stage"], json.loads(x)["step"]) for x in metrics.read_text().splitlines()]
    assert logged == [(2, i) for i in range(1, 9)]

    a, b = _records(ref), _records(run)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key]["sample_indices"] == b[key]["sample_indices"], key
        assert a[key]["position"] == b[key]["position"], key
        for term in ("loss", "l_s", "l_ar", "reg_kl"):
            if term in a[key]:
                assert b[key][term] == pytest.approx(a[key][term], rel=1e-4, abs=1e-6), (key, term)
    wa = _load_safetensors(ref / "final" / "model.safetensors")
    wb = _load_safetensors(run / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    ra = _load_safetensors(ref / "checkpoints" / "stage2-step0000008" / "recalibrator.safetensors")
    rb = _load_safetensors(run / "checkpoints" / "stage2-step0000008" / "recalibrator.safetensors")
    for k in ra:
        torch.testing.assert_close(rb[k], ra[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"recalibrator {k}: {m}")


def test_resume_into_later_stages_starts_them_from_the_finished_run(tmp_path: Path, train_cache: Path,
                                                                   student_dir: Path) -> None:
    out = tmp_path / "run"
    train(_cfg(train_cache, student_dir, out, stages=[1], max_steps=2, batch_size=2))
    rec1 = _load_safetensors(out / "checkpoints" / "stage1-step0000002" / "recalibrator.safetensors")
    train(_cfg(train_cache, student_dir, out, stages=[2], max_steps=1, batch_size=2, resume=True))
    assert sorted(_records(out)) == [(1, 1), (1, 2), (2, 1)]  # stage 2 ran, from its first step
    rec2 = _load_safetensors(out / "checkpoints" / "stage2-step0000001" / "recalibrator.safetensors")
    # stage 2 started from stage 1's Recalibrator (one small step away), not from a fresh init
    assert all((rec2[k] - rec1[k]).abs().max() < 5e-4 for k in rec1)


# ---- 6. a cache that does not match the teacher we are told --------------------------------------

@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from genrecal_cache.testing import build_tiny_teacher

    root = tmp_path_factory.mktemp("other_teachers")
    return {"seed": build_tiny_teacher(root / "seed7", seed=7),  # same tokenizer and shapes, other weights
            "vocab": build_tiny_teacher(root / "vocab700", vocab_size=700)}  # other tokenizer


def _swap_head(cache: Path, tmp_path: Path, head) -> Path:
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    head.save(str(bad / "teacher_head.safetensors"))
    return bad


@pytest.mark.parametrize("case", ["teacher-other-seed", "teacher-other-vocab", "head-wrong-shape",
                                  "head-of-other-teacher"])
def test_mismatched_cache_is_refused_before_any_step(case: str, tmp_path: Path, train_cache: Path,
                                                     teacher_dir: Path, student_dir: Path,
                                                     other_teachers: dict[str, Path]) -> None:
    from genrecal_cache.format.head import HeadConfig, TeacherHead

    cache, expect = train_cache, None
    if case == "teacher-other-seed":
        expect, match = other_teachers["seed"], "not .*lm_head"
    elif case == "teacher-other-vocab":
        expect, match = other_teachers["vocab"], "tokenizer differs"
    elif case == "head-wrong-shape":
        g = torch.Generator().manual_seed(0)
        head = TeacherHead(HeadConfig(hidden_size=96, vocab_size=832), torch.ones(96),
                           torch.randn(832, 96, generator=g))
        cache, match = _swap_head(train_cache, tmp_path, head), "head .*belongs to another teacher"
    else:  # right shape, other weights: only the cached top-k can tell
        other = adapter_for(other_teachers["seed"])
        head = other.export_head(other.load_model(other_teachers["seed"]))
        cache, match = _swap_head(train_cache, tmp_path, head), "does not reproduce the cached top-"
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train(_cfg(cache, student_dir, out, stages=[1], max_steps=1,
                  expect_teacher=str(expect) if expect else None))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    # the real teacher passes the same checks
    if expect is not None:
        from genrecal_train.preflight import check_cache_matches

        c = open_cache(cache)
        check_cache_matches(c, c.head(), _cfg(cache, student_dir, out, expect_teacher=str(teacher_dir)))


# ---- 7. torchrun: DDP on CPU (gloo), disjoint data per rank, per-rank resume ----------------------

def test_torchrun_two_ranks_read_disjoint_data_and_resume(tmp_path: Path, train_cache: Path,
                                                          student_dir: Path) -> None:
    # max_len 70 skips the two-turn samples (74-75 student tokens), so the ranks' stream positions differ
    cfg_file = tmp_path / "ddp.toml"
    cfg_file.write_text('stages = [2]\nmax_len = 70\nbatch_size = 2\ncheckpoint_every = 2\ndevice = "cpu"\n')
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cli.train_cli", "--config", str(cfg_file), "--cache", str(train_cache),
           "--student", str(student_dir), "--out", str(run), "--max-steps", "4"]
    first = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-4000:]
    recs = _records(run)
    assert sorted(recs) == [(2, s) for s in (1, 2, 3, 4)]
    seen: list[list[int]] = [[], []]
    for r in recs.values():
        assert len(r["rank_sample_indices"]) == 2 and r["sample_indices"] == r["rank_sample_indices"][0]
        for rank, idx in enumerate(r["rank_sample_indices"]):
            assert len(idx) == 2
            seen[rank] += idx
    assert not set(seen[0]) & set(seen[1]), seen  # disjoint shards
    cache = open_cache(train_cache)
    for rank in (0, 1):  # each rank reads its own slice of the stage's shuffled order
        plan = [i for g in cache.plan(order="shuffled", seed=2000, rank=rank, world_size=2) for i in g]
        assert seen[rank] == [i for i in plan if cache[i].extra["qtype"] != "multi"][:8]
    positions = recs[(2, 2)]["rank_positions"]
    assert positions[0] != positions[1], "the test wants ranks that skipped different numbers of samples"
    state = json.loads((run / "checkpoints" / "stage2-step0000002" / "state.json").read_text())
    assert state["positions"] == positions and state["world_size"] == 2
    assert (run / "final" / "model.safetensors").exists()

    # a crash right after step 2's checkpoint: --resume must give each rank its own position back
    (run / "checkpoints" / "latest").write_text("stage2-step0000002")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "stage2-step0000004")
    n_lines = state["metrics_lines"]
    second = subprocess.run(cmd + ["--resume"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-4000:]
    redone = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[n_lines:]]
    assert [r["step"] for r in redone] == [3, 4]
    for r in redone:
        old = recs[(2, r["step"])]
        assert r["rank_sample_indices"] == old["rank_sample_indices"] and r["rank_positions"] == old["rank_positions"]
        assert r["loss"] == pytest.approx(old["loss"], rel=1e-4)


def test_epoch_based_step_count_is_the_same_on_every_rank(train_cache: Path, student_dir: Path) -> None:
    from genrecal_train.batches import CacheStream
    from genrecal_train.trainer import stage_steps

    cache, adapter = open_cache(train_cache), adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    cfg = _cfg(train_cache, student_dir, student_dir, epochs=1.0, batch_size=2)
    streams = [CacheStream(cache, adapter, processor, batch_size=2, max_len=2048, rank=r, world_size=3)
               for r in range(3)]
    assert sorted(s.per_epoch for s in streams) == [10, 11, 11]  # uneven slices ...
    assert {stage_steps(cfg, s, 3, 2) for s in streams} == {6}  # ... same step count (ceil(32 / (2 * 3)))


# ---- the CLI's --config file (YAML and TOML), flags override it ------------------------------------

@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_config_file_with_flag_overrides(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"c.{fmt}"
    if fmt == "yaml":
        path.write_text("cache: /c\nstudent: /s\nout: /o\nstages: 1,3\nmax-steps: 7\nlr: 3.0e-4\nw_kl: 0.5\n"
                        "freeze_recalibrator_in_stage2: true\n")
    else:
        path.write_text('cache = "/c"\nstudent = "/s"\nout = "/o"\nstages = [1, 3]\nmax-steps = 7\nlr = 3.0e-4\n'
                        'w_kl = 0.5\nfreeze_recalibrator_in_stage2 = true\n')
    cfg = load_config(str(path), {"max_steps": 2, "out": "/elsewhere", "lr": None})
    got = (cfg.cache, cfg.out, cfg.stages, cfg.max_steps, cfg.lr, cfg.w_kl)
    assert got == ("/c", "/elsewhere", [1, 3], 2, 3e-4, 0.5)
    assert cfg.freeze_recalibrator_in_stage2 is True
    bad = tmp_path / f"bad.{fmt}"
    bad.write_text(path.read_text() + ("lr_typo: 1\n" if fmt == "yaml" else "lr_typo = 1\n"))
    with pytest.raises(ValueError, match="unknown option.*lr_typo"):
        load_config(str(bad), {})


def test_cli_runs_from_a_yaml_config_with_flags_overriding(tmp_path: Path, train_cache: Path,
                                                           student_dir: Path) -> None:
    from typer.testing import CliRunner

    from cli.train_cli import app

    out = tmp_path / "run"
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(f"cache: {train_cache}\nstudent: {student_dir}\nout: {tmp_path / 'not-this'}\n"
                        "stages: [3]\nmax_steps: 50\nbatch_size: 2\nlr: 5.0e-4\ndevice: cpu\nprefetch: 2\n")
    res = CliRunner().invoke(app, ["--config", str(cfg_file), "--out", str(out), "--max-steps", "2",
                                   "--batch-size", "3"])
    assert res.exit_code == 0, (res.output, res.exception)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_steps"], saved["batch_size"], saved["lr"], saved["stages"]) == (2, 3, 5e-4, [3])
    recs = _records(out)
    assert sorted(recs) == [(3, 1), (3, 2)] and all(len(r["sample_indices"]) == 3 for r in recs.values())
    assert set(recs[(3, 1)]) >= {"l_s", "loss", "tokens_per_s", "data_wait_frac", "position"}
    assert (out / "final" / "config.json").exists() and not (tmp_path / "not-this").exists()
    res = CliRunner().invoke(app, ["--config", str(cfg_file), "--stages", "1,4"])
    assert res.exit_code != 0 and "stages" in res.output


def test_warmup_rises_linearly_then_decays_to_lr_end(tmp_path: Path, train_cache: Path, student_dir: Path):
    """--warmup: each stage's LR climbs from lr/n to lr over its first n steps, then falls to lr_end."""
    out = tmp_path / "run"
    train(_cfg(train_cache, student_dir, out, stages=[1, 3], max_steps=10, lr=1e-3, lr_end=1e-4, warmup=0.3))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for stage in (1, 3):  # every stage warms up afresh (each starts a new AdamW)
        lrs = [r["lr"] for r in recs if r["stage"] == stage]
        assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
        assert lrs[3:] == pytest.approx([1e-3 + (1e-4 - 1e-3) * i / 6 for i in range(7)])


@pytest.mark.parametrize("warmup", [-0.1, 1.0])
def test_warmup_outside_0_1_is_refused(tmp_path: Path, train_cache: Path, student_dir: Path, warmup: float):
    with pytest.raises(ValueError, match="warmup"):
        train(_cfg(train_cache, student_dir, tmp_path / "run", stages=[3], max_steps=2, warmup=warmup))
