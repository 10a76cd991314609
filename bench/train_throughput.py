"""Trainer throughput: tokens/s of a stage-1, stage-2 and SFT (stage-3) step on the same batches, side by side.

    PYTHONPATH=genrecal_cache/compat python bench/train_throughput.py                   # ~1 min on 2 busy cores
    PYTHONPATH=/tmp/old:/tmp/old/genrecal_cache/compat python bench/train_throughput.py  # another checkout's code
    python bench/train_throughput.py --work /tmp/tt --baseline /tmp/old --rounds 3       # before vs after, alternated
    python bench/train_throughput.py --work /tmp/tt --baseline /tmp/old --concurrent     # before and after side by side

Data: the quality suite's tasks (bench/quality_tasks.py: word, phrase and clause answers), a tiny Qwen2-VL
teacher (bench/quality.py's teacher size: hidden 192, 3 layers) extracted into a bf16 cache. Students: the
suite's LLaVA (`build_tiny_student` defaults, hidden 64), a wider one (hidden 512, 4 layers) and, with
`--students deep`, the wider one at 16 layers.

A step is what `trainer.run_stage` does per optimizer step: forward, backward, AdamW step, on a batch the
data thread has prepared (`make_example` + `collate`, timed apart: in training it runs on the prefetch thread,
overlapped with the step). Stages are interleaved (1, 2, 3, 1, 2, 3, ...) so that a busy machine slows all
of them alike; each figure is the median over --repeats rounds of --steps steps. tokens/s counts what
`Batch.num_tokens` counts (student + teacher tokens of the batch), the trainer's metric.

Works against an older checkout of genrecal too (put it first on PYTHONPATH): before issue 24 the model
aligned answers itself (in `forward`), `make_example` took no tokenizer. `--baseline DIR` compares in one
invocation: it runs this bench --rounds times on DIR's code and on this checkout's, alternately (before,
after, before, after, ...: a busy machine's load drifts over minutes), each run a fresh process on the same
--work inputs, and prints the medians over the rounds and the after/before ratios. With `--concurrent` the two
codes run at the same time, one process (one torch thread) per core: this VM's host has slow spells of minutes
that one-after-the-other runs catch on one side only (per-round ratios 0.9x-1.9x in one run of session 11); side
by side, both sides see the same spell.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(1, str(ROOT))  # bench/ helpers; genrecal itself from PYTHONPATH (or this checkout)
sys.path.append(str(ROOT.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from _machine import machine  # noqa: E402

# "deep" (not run unless asked): the wide student at a real student's depth relative to the Recalibrator's 2 blocks
# (Qwen2-VL-2B has 28 layers): the Recalibrator runs its 2 blocks over both passes, so its share of a stage-2 step
# shrinks with the student's depth
STUDENTS = {"llava (hidden 64)": dict(), "wide llava (hidden 512)": dict(hidden_size=512, layers=4, head_dim=64),
            "deep llava (hidden 512, 16 layers)": dict(hidden_size=512, layers=16, head_dim=64)}


def build_inputs(work: Path, n_per_kind: int, which: str = "llava,wide") -> tuple[Path, dict[str, Path]]:
    """(the teacher cache, {student label: folder}), built once into `work`."""
    from genrecal_cache.extract import ExtractConfig, extract
    from genrecal_cache.testing import build_tiny_student, build_tiny_teacher
    from quality_tasks import KINDS, write_tasks

    data = write_tasks(work / "data", list(KINDS), n_per_kind, seed=2, digits_part=(1000, 1497))
    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        build_tiny_teacher(teacher, seed=1234, hidden_size=192, layers=3, vision_width=128)
    cache = work / "cache"
    if not (cache / "manifest.json").is_file():
        extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(cache), backend="transformers",
                              progress=False))
    students = {}
    for i, (label, kw) in enumerate(STUDENTS.items()):
        if label.split()[0] not in which.split(","):
            continue
        folder = work / f"student{i}"
        if not (folder / "config.json").is_file():
            build_tiny_student(folder, seed=i, **kw)
        students[label] = folder
    return cache, students


def make_batches(cache, adapter, processor, batch_size: int, context: bool = True) -> tuple[list, float]:
    """Every sample in batches as the data thread makes them, and the data thread's seconds per batch;
    `context=False`: without the teacher's context rows, as the trainer's data thread for a stage-2 step that
    reads none (`TrainConfig.reads_context`)."""
    import genrecal_train

    if (Path(genrecal_train.__file__).parent / "batches.py").is_file():
        from genrecal_train.batches import collate, make_example
    else:  # a --baseline checkout from before the data.py -> batches.py rename
        from genrecal_train.data import collate, make_example

    extra = {}
    if "teacher_tokenizer" in inspect.signature(make_example).parameters:  # issue 24: alignment on the data thread
        extra["teacher_tokenizer"] = cache.teacher_tokenizer()
    # as the trainer reads: in stored precision where the code has it (bf16 widened and low-rank rows folded in the
    # step), else float32
    read = {"precision": "stored"} if "precision" in inspect.signature(cache.iter_samples).parameters else {}
    if not context:
        read["context"] = extra["context"] = False
    t0 = time.perf_counter()
    examples = [make_example(s, adapter, processor, 2048, **extra) for s in cache.iter_samples(**read)]
    pad = processor.tokenizer.pad_token_id
    batches = [collate(examples[j:j + batch_size], pad, 0) for j in range(0, len(examples) - batch_size + 1,
                                                                          batch_size)]
    return batches, (time.perf_counter() - t0) / len(batches)


def bench_student(label: str, folder: Path, cache_dir: Path, args) -> dict[int, float]:
    from genrecal_cache import open_cache
    from genrecal_cache.families import adapter_for
    from genrecal_train.config import TrainConfig
    from genrecal_train.model import GenRecal

    cache, adapter = open_cache(cache_dir), adapter_for(folder)
    processor = adapter.load_processor(folder)
    cfg = TrainConfig(cache=str(cache_dir), student=str(folder), out="unused", device=args.device,
                      **{k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.set)})
    # the batches stage 2 gets (a baseline from before `reads_context` read every row)
    context = cfg.reads_context(2) if hasattr(cfg, "reads_context") else True
    batches, data_s = make_batches(cache, adapter, processor, args.batch_size, context)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = GenRecal(adapter.load_model(folder), adapter, cache.head(device=dev), cfg).to(dev).train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu",
                                                                                                     enabled=False)
    opts = {}
    for stage in (1, 2, 3):
        opts[stage] = torch.optim.AdamW(model.set_stage(stage), lr=1e-4)
    rates: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for r in range(args.repeats + 1):  # round 0 warms up (allocator, autograd graphs, AdamW state)
        for stage in (1, 2, 3):  # the same batches for every stage of a round
            model.set_stage(stage)
            tokens, t0 = 0, args.clock()
            for i in range(args.steps):
                batch = batches[(r * args.steps + i) % len(batches)]
                with autocast:
                    model(batch, stage)["loss"].backward()
                opts[stage].step()
                opts[stage].zero_grad(set_to_none=True)
                tokens += batch.num_tokens
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                rates[stage].append(tokens / (args.clock() - t0))
    if args.profile:
        profile_stage(model, opts[args.profile], batches, args.profile, autocast)
    med = {s: statistics.median(v) for s, v in rates.items()}
    tokens_per_batch = sum(b.num_tokens for b in batches) / len(batches)
    slots = recalibrator_slots(batches, getattr(cfg, "recal_context", "question") != "none")  # older code: no option
    print(f"| {label} | {med[1]:.0f} | {med[2]:.0f} | {med[3]:.0f} | {med[3] / med[2]:.2f}x | {slots} | "
          f"{med[3] / med[1]:.2f}x | {1e3 * data_s:.0f} ms ({tokens_per_batch / data_s:.0f} tok/s) |", flush=True)
    return med


def recalibrator_slots(batches: list, context: bool = True) -> str:
    """The share of the Recalibrator's packed slots (both passes, padded to the longest sample) that are valid, and
    that are read out (answer rows): what its blocks compute in full and in the last block ("-" for a checkout
    whose batches do not carry their rows). `context` False: recal_context='none', the passes hold answer rows only."""
    slots = valid = read = 0
    for b in batches:
        rows = getattr(b, "rows", None)
        if rows is None:
            return "-"
        prefix = torch.cat([rows.student_question_mask.sum(1), rows.question_mask.sum(1)])
        lens = context * prefix + rows.answer_mask.sum(1).repeat(2)
        slots += lens.numel() * int(lens.max())
        valid, read = valid + int(lens.sum()), read + 2 * int(rows.answer_mask.sum())
    return f"{100 * valid / slots:.0f}% / {100 * read / slots:.0f}%"


def profile_stage(model, opt, batches: list, stage: int, autocast, top: int = 15) -> None:
    """A torch profile of one stage's steps over the batches: the ops with the most self CPU time, by input shape,
    and the shares of matmuls and attention (where a step's time goes, beside the tokens/s)."""
    model.set_stage(stage)
    with torch.profiler.profile(record_shapes=True) as prof:
        for batch in batches:
            with autocast:
                model(batch, stage)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    share = {name: sum(e.self_cpu_time_total for e in events if e.key.startswith(prefix)) / total
             for name, prefix in (("matmuls", "aten::mm"), ("attention", "aten::_scaled_dot_product"))}
    print(f"profile of stage {stage}, {len(batches)} steps: {total / 1e3 / len(batches):.1f} ms of op self CPU time "
          f"per step; " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items()))
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.key[:48]:48s} x{e.count:<4d} {str(e.input_shapes)[:90]}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="folder for the teacher, cache and students (kept; default: a temp dir)")
    p.add_argument("--per-kind", type=int, default=8, help="questions per task kind in the cache")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--students", default="llava,wide", help="which students: llava, wide, deep (comma-separated)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps by the wall clock, or by the CPU time of the stepping thread (one torch thread "
                        "on a CPU: what the step computed, whatever else the machine runs)")
    p.add_argument("--baseline", default=None, help="a checkout of genrecal to compare with (the code before a change)")
    p.add_argument("--rounds", type=int, default=3, help="with --baseline: runs of each code, alternated")
    p.add_argument("--concurrent", action="store_true",
                   help="with --baseline: run both codes at the same time, one process (1 torch thread) per core, "
                        "instead of one after the other: on a shared host whose speed drifts, both see the same spells")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig field for every student, the value as JSON: --set 'recal_context=\"none\"'")
    p.add_argument("--json", default=None, help="also write {student: {stage: tok/s}} to this file")
    p.add_argument("--profile", type=int, choices=[1, 2, 3], default=None,
                   help="after the timing, a torch profile of this stage over every batch, per student")
    args = p.parse_args(argv)
    if args.concurrent and not args.baseline:
        raise SystemExit("--concurrent runs two codes side by side: give the other one with --baseline DIR")
    if args.baseline:
        return compare(args, argv if argv is not None else sys.argv[1:])
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        raise SystemExit("--clock cpu times one CPU thread: use it with --device cpu --threads 1")
    clock_name, args.clock = args.clock, time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    import transformers

    import genrecal_train

    transformers.utils.logging.disable_progress_bar()

    print(machine())
    print(f"genrecal from {Path(genrecal_train.__file__).parent.parent}; device {args.device}; batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} interleaved rounds (median); {clock_name} clock"
          + "".join(f"; {kv}" for kv in args.set))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        cache, students = build_inputs(work, args.per_kind, args.students)
        print("| student | stage 1 tok/s | stage 2 tok/s | SFT (stage 3) tok/s | stage-2 step / SFT step | "
              "Recalibrator slots valid / read out | stage-1 step / SFT step | data thread per batch |")
        print("|---|---|---|---|---|---|---|---|")
        out = {label: bench_student(label, folder, cache, args) for label, folder in students.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(out))
    return out


def compare(args, argv: list[str]) -> dict:
    """Alternate runs of the baseline's code and this checkout's (fresh processes, the same inputs); medians."""
    if not args.work:
        raise SystemExit("--baseline needs --work: both codes must read the same cache and students")
    build_inputs(Path(args.work), args.per_kind, args.students)  # once, before the runs
    own = [a for i, a in enumerate(argv) if not (a.startswith(("--baseline", "--rounds", "--concurrent"))
                                                 or (i and argv[i - 1] in ("--baseline", "--rounds")))]
    codes = {"before": str(Path(args.baseline).resolve()), "after": str(ROOT.parent)}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            procs = {}
            for name, code in codes.items():
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([code, f"{code}/genrecal_cache/compat"]))
                out, log = Path(tmp) / f"{name}{r}.json", Path(tmp) / f"{name}{r}.log"
                cmd = [sys.executable, __file__, *own, "--json", str(out)]
                if args.concurrent:  # both at once, each on its own core: a slow spell of the host hits both
                    with log.open("w") as f:  # the child holds its own copy of the descriptor
                        procs[name] = (subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), log)
                else:
                    print(f"\n[{name}, round {r + 1}/{args.rounds}]", flush=True)
                    subprocess.run(cmd, env=env, check=True)
            failed = [name for name, (proc, _) in procs.items() if proc.wait()]
            for name, (_, log) in procs.items():
                print(f"\n[{name}, round {r + 1}/{args.rounds}, concurrent]\n{log.read_text()}", flush=True)
            if failed:
                raise SystemExit(f"the {' and '.join(failed)} run failed (its output is above)")
            for name in codes:
                runs[name].append(json.loads((Path(tmp) / f"{name}{r}.json").read_text()))
    mode = "concurrent (one core each)" if args.concurrent else "alternated"
    print(f"\nmedians over {args.rounds} {mode} runs of each; load average at the end {os.getloadavg()[0]:.1f}")
    print("| student | code | stage 1 tok/s | stage 2 tok/s | SFT tok/s | stage-2 step / SFT step |")
    print("|---|---|---|---|---|---|")
    med = {name: {label: {s: statistics.median(run[label][s] for run in rs) for s in ("1", "2", "3")}
                  for label in rs[0]} for name, rs in runs.items()}
    for label in med["after"]:
        for name in ("before", "after"):
            m = med[name][label]
            print(f"| {label} | {name} | {m['1']:.0f} | {m['2']:.0f} | {m['3']:.0f} | {m['3'] / m['2']:.2f}x |")
    for label in med["after"]:
        ratios = [a[label]["2"] / b[label]["2"] for a, b in zip(runs["after"], runs["before"])]
        print(f"{label}: stage-2 tok/s after / before {med['after'][label]['2'] / med['before'][label]['2']:.2f}x "
              f"(medians; per round {', '.join(f'{x:.2f}x' for x in ratios)})")
    return med


if __name__ == "__main__":
    main()
