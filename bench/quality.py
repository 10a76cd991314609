"""Quality benchmark: does GenRecal make the small student better than plain SFT?

One command, CPU only, offline:

    PYTHONPATH=genrecal_cache/compat HF_HUB_OFFLINE=1 python bench/quality.py          # full (~20 min on 2 cores)
    PYTHONPATH=genrecal_cache/compat HF_HUB_OFFLINE=1 python bench/quality.py --quick  # smoke run (~1 min; its numbers mean nothing)

What it does (every step writes its result to disk first, so a rerun resumes where it stopped; a
finished arm run is redone when its training settings change; data splits, model inits and the cache
are reused as they are, so an --out made with other data/model settings is refused, `check_inputs`):
1. data: synthetic shape questions + scikit-learn digit questions in three splits: the
   distillation set (every arm trains on it), the teacher's own extra data, and a held-out test
   split; digit images come from disjoint parts of scikit-learn's 1797.
2. teacher: a tiny Qwen2-VL-architecture model, wider and deeper than the student, trained from
   scratch by SFT (`--stages 3` on a throwaway cache) on the distillation set plus its extra data,
   evaluated on the test split, then run once over the distillation set to write the real teacher
   cache. The student model trained the same way on the same data is evaluated too (reference).
3. arms, each over several seeds with the SAME budget (samples per step, optimizer steps):
   - sft              student SFT only (stages [3], all steps)
   - genrecal_noreg   GenRecal stages 1-3 without the regularization pass
   - genrecal         GenRecal stages 1-3, full
   - uld              cross-tokenizer logit KD (Universal Logit Distillation, Boizard et al. 2024):
                      stage-3 SFT + sorted-probability Wasserstein loss to the teacher's answer
                      distributions (`genrecal_train.uld`)
   The student is a LLaVA (Llama + SigLIP) model with another tokenizer and 16 image tokens
   instead of the teacher's 4, freshly initialised from the run's seed.
4. table (mean +- std exact-match accuracy per arm and per question type, teacher as ceiling),
   results.json, loss curves and accuracy bar chart (PNG) under bench/out/quality/, PNGs copied
   to docs/img/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # one log line per step and run instead of progress bars

ARMS = ("sft", "genrecal_noreg", "genrecal", "uld")
ARM_LABELS = {"sft": "student SFT only", "genrecal_noreg": "GenRecal 1-3, no reg. pass",
              "genrecal": "GenRecal 1-3 (full)",
              "uld": "ULD (logit KD, cross-tokenizer)"}

ARM_COLOURS = {"sft": "#888888", "genrecal_noreg": "#9ecae1", "genrecal": "#08519c",
               "uld": "#fd8d3c"}


@dataclass
class Setup:
    """Every knob of the experiment (written into results.json)."""
    # The distillation set: every arm trains on it, and the teacher cache is extracted over it.
    n_shapes_train: int = 600
    n_digits_train: int = 400
    data_seed: int = 2
    # The teacher is trained on the distillation set plus this much more data of its own: a big
    # teacher has seen far more than the lab's distillation data, including data like it.
    n_shapes_teacher_extra: int = 1200
    n_digits_teacher_extra: int = 800
    teacher_data_seed: int = 0
    # held out from everyone
    n_shapes_test: int = 300
    n_digits_test: int = 200
    test_seed: int = 1000
    # digit images are drawn from disjoint parts of the 1797 that scikit-learn ships
    digits_parts: tuple[tuple[int, int], ...] = ((0, 1000), (1000, 1497), (1497, 1797))  # teacher extra, train, test
    # teacher: wider/deeper than the student
    teacher_hidden: int = 256
    teacher_layers: int = 4
    teacher_vision_width: int = 128
    teacher_vision_depth: int = 1
    teacher_image_side: int | None = None  # None: 56 px, 4 image tokens; 112: 16 image tokens
    teacher_steps: int = 1600
    teacher_batch: int = 16
    teacher_lr: float = 1e-3
    teacher_lr_end: float = 1e-4
    # student (LLaVA: Llama + SigLIP), built per seed
    student_hidden: int = 64
    student_layers: int = 2
    student_image_size: int = 32   # pixels; (size / patch)^2 image tokens
    student_patch: int = 8
    # Every arm starts from the same student, SFT'd for this many steps first (0: from random init).
    # The paper distils into pre-trained students; a random one is not a student yet.
    student_warmup_steps: int = 0
    # the budget every arm gets
    steps: int = 750
    batch_size: int = 16
    lr: float = 1e-3
    lr_end: float = 1e-4
    warmup: float = 0.1  # fraction of each stage (every arm) with a linear LR warm-up
    stage_split: tuple[float, float, float] = (0.04, 0.76, 0.2)  # GenRecal stages 1/2/3 share of `steps`
    w_ar: float = 1.0
    w_kl: float = 1.0
    w_student: float = 1.0
    recal_layers: int = 2
    temperature: float = 1.0
    train_vision: bool = True  # the student is trained from scratch: its vision tower learns too (all arms)
    w_uld: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))


# Knobs of the arm runs only: a finished run is redone when they change (its settings are compared).
# Every other Setup field shapes what an --out reuses whenever it exists (data splits, model inits,
# the teacher cache), so `check_inputs` holds an --out to one choice of them.
ARM_KNOBS = frozenset({"steps", "batch_size", "lr", "lr_end", "warmup", "stage_split", "w_ar", "w_kl", "w_student",
                       "recal_layers", "temperature", "train_vision", "w_uld", "seeds", "arms"})

QUICK = dict(n_shapes_teacher_extra=120, n_digits_teacher_extra=80, n_shapes_train=120, n_digits_train=80, n_shapes_test=60, n_digits_test=40, teacher_steps=120,
             teacher_batch=8, teacher_hidden=128, teacher_layers=2, teacher_vision_width=64, steps=200,
             batch_size=8, seeds=[0])


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env() -> dict:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "genrecal_cache" / "compat"),
                                                              os.environ.get("PYTHONPATH")]))
    from genrecal_cache.testing import install_compat_shim

    install_compat_shim()
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def check_inputs(out: Path, s: Setup) -> None:
    """Record the data/model knobs of a new --out; refuse to reuse an --out made with other ones."""
    want = {k: v for k, v in json.loads(json.dumps(asdict(s))).items() if k not in ARM_KNOBS}
    path = out / "inputs.json"
    if not path.is_file():
        path.write_text(json.dumps(want, indent=1))
        return
    have = json.loads(path.read_text())
    diff = [f"{k}: {have.get(k)} -> {want.get(k)}" for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
    if diff:
        raise SystemExit(f"{out} holds data, models and a cache made with other settings ({'; '.join(diff)}); "
                         "they would be reused as they are: use a fresh --out (or the old settings)")


# --- data ------------------------------------------------------------------------------------------

def make_split(folder: Path, n_shapes: int, n_digits: int, seed: int, digits_part: tuple[int, int]) -> Path:
    """shapes + digits in one folder: one JSONL (qtype per record), images side by side."""
    from genrecal_cache.demo_data import write_demo_dataset, write_digits_dataset

    path = folder / "data.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    if n_shapes:
        lines += write_demo_dataset(folder, n_shapes, seed=seed).read_text().splitlines()
    if n_digits:  # image names differ (demo-* vs digit-*), so both fit in one images/ folder
        lines += write_digits_dataset(folder, n_digits, seed=seed, part=tuple(digits_part)).read_text().splitlines()
    (folder / "train.jsonl").unlink(missing_ok=True)
    tmp = folder / "data.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def combine(path: Path, splits: list[Path]) -> Path:
    """One JSONL over several splits' records, beside their folders (image paths and ids made unique)."""
    if path.is_file():
        return path
    lines = []
    for split in splits:
        folder = split.parent.name
        for line in split.read_text().splitlines():
            rec = json.loads(line)
            rec["id"] = f"{folder}-{rec['id']}"
            images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            images = [f"{folder}/{ref}" for ref in images]
            rec["image"] = images if len(images) > 1 else images[0]
            lines.append(json.dumps(rec))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


# --- steps -----------------------------------------------------------------------------------------

def extract_cache(teacher: Path, data: Path, out: Path) -> Path:
    from genrecal_cache.extract import ExtractConfig, extract

    if (out / "manifest.json").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(out), backend="transformers",
                          progress=False, hidden_dtype="float32"))
    return out


def _settings(kw: dict) -> dict:
    """What a run is, paths aside (they follow from --out): a finished run with other settings is redone."""
    return json.loads(json.dumps({k: v for k, v in kw.items() if k not in ("cache", "student")}))


def _finished(out: Path, kw: dict) -> bool:
    done = out / "done.json"
    return (done.is_file() and (out / "final" / "config.json").is_file()
            and json.loads(done.read_text()).get("settings") == _settings(kw))


def run_train(out: Path, **kw) -> tuple[Path, float]:
    """Train (or reuse a finished run); returns (final model folder, seconds)."""
    from genrecal_train.config import TrainConfig
    from genrecal_train.trainer import train

    final = out / "final"
    done = out / "done.json"
    wanted = _settings(kw)
    if _finished(out, kw):
        return final, json.loads(done.read_text())["seconds"]
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(out=str(out), checkpoint_every=10**9, prefetch=4, **kw)
    t0 = time.perf_counter()
    final = train(cfg)
    secs = time.perf_counter() - t0
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # keep the bench folder small
    done.write_text(json.dumps({"seconds": secs, "settings": wanted}))
    (out / "eval.json").unlink(missing_ok=True)
    return Path(final), secs


def run_eval(model: Path, data: Path, out: Path) -> dict:
    from genrecal_train.evaluate import evaluate

    if out.is_file():
        return json.loads(out.read_text())
    rep = evaluate(str(model), str(data), progress=False).to_dict()
    out.write_text(json.dumps(rep, indent=1))
    return rep


def arm_config(arm: str, s: Setup) -> dict:
    common = dict(batch_size=s.batch_size, lr=s.lr, lr_end=s.lr_end, warmup=s.warmup, train_vision=s.train_vision,
                  recal_layers=s.recal_layers, temperature=s.temperature, w_ar=s.w_ar, w_kl=s.w_kl, w_student=s.w_student)
    if arm in ("sft", "uld"):
        kw = dict(stages=[3], stage_steps=[s.steps], **common)
        if arm == "uld":
            kw["w_uld"] = s.w_uld
        return kw
    n1 = max(1, round(s.steps * s.stage_split[0]))
    n2 = max(1, round(s.steps * s.stage_split[1]))
    n3 = max(1, s.steps - n1 - n2)
    return dict(stages=[1, 2, 3], stage_steps=[n1, n2, n3], use_reg_pass=arm != "genrecal_noreg",
                **common)


def student_for(out: Path, seed: int, s: Setup) -> Path:
    """Where every arm of a seed starts: the fresh student, or its SFT warm-up's result."""
    sdir = out / "students" / f"seed{seed}"
    return sdir.with_name(f"seed{seed}-warm") / "final" if s.student_warmup_steps else sdir


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    env()


def run_arm(job: tuple) -> dict:
    """Train and evaluate one (arm, seed) run (or reuse it); runs in a worker process."""
    arm, seed, out, cache, student, test_data, kw = job
    rdir = Path(out) / "runs" / f"{arm}-seed{seed}"
    log(f"{arm} seed {seed}: training ...")
    final, secs = run_train(rdir, cache=cache, student=student, seed=seed, **kw)
    ev = run_eval(final, Path(test_data), rdir / "eval.json")
    log(f"{arm} seed {seed}: {100 * ev['accuracy']:.1f}% ({secs:.0f}s training)")
    return {"arm": arm, "seed": seed, "accuracy": ev["accuracy"], "n": ev["n"], "per_type": ev["per_type"],
            "train_s": secs, "metrics": str(rdir / "metrics.jsonl")}


# --- report ----------------------------------------------------------------------------------------

def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def summarize(results: dict) -> tuple[str, dict]:
    teacher = results["teacher"]["eval"]
    qtypes = sorted(teacher["per_type"])
    summary = {}
    rows = [("teacher (ceiling)", f"{100 * teacher['accuracy']:.1f}", "1",
             *[f"{100 * teacher['per_type'][q]['accuracy']:.1f}" for q in qtypes])]
    if "same_data_student" in results:  # the student model trained like the teacher, on the teacher's data
        ref = results["same_data_student"]["eval"]
        rows.append(("student trained like the teacher, on its data", f"{100 * ref['accuracy']:.1f}", "1",
                     *[f"{100 * ref['per_type'][q]['accuracy']:.1f}" if q in ref["per_type"] else "-" for q in qtypes]))
    for arm in results["setup"]["arms"]:
        runs = [r for r in results["runs"] if r["arm"] == arm]
        if not runs:
            continue
        accs = [r["accuracy"] for r in runs]
        per = {q: [r["per_type"][q]["accuracy"] for r in runs if q in r["per_type"]] for q in qtypes}
        summary[arm] = {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "seeds": [r["seed"] for r in runs], "accuracies": accs,
                        "per_type_mean": {q: statistics.fmean(v) for q, v in per.items() if v}}
        rows.append((ARM_LABELS[arm], _ms(accs), str(len(runs)), *[_ms(per[q]) for q in qtypes]))
    header = ("arm", "accuracy % (mean ± std)", "seeds", *qtypes)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines), summary


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in results["setup"]["arms"] if any(r["arm"] == a for r in results["runs"])]
    # accuracy bars
    fig, ax = plt.subplots(figsize=(7, 4))
    means, stds = [], []
    for a in arms:
        accs = [100 * r["accuracy"] for r in results["runs"] if r["arm"] == a]
        means.append(statistics.fmean(accs))
        stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
    xs = range(len(arms))
    ax.bar(xs, means, yerr=stds, capsize=4, color=[ARM_COLOURS[a] for a in arms])
    for x, a in zip(xs, arms):
        for r in results["runs"]:
            if r["arm"] == a:
                ax.plot(x, 100 * r["accuracy"], "k.", ms=5)
    t = 100 * results["teacher"]["eval"]["accuracy"]
    ax.axhline(t, color="crimson", ls="--", label=f"teacher {t:.1f}%")
    ax.set_xticks(list(xs), [ARM_LABELS[a].replace(" (", "\n(").replace(", ", ",\n") for a in arms], fontsize=8)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"Student accuracy, same budget ({results['setup']['steps']} steps x "
                 f"{results['setup']['batch_size']}), {len(results['setup']['seeds'])} seeds")
    ax.legend(loc="center right")
    fig.tight_layout()
    bar_png = out / "quality_accuracy.png"
    fig.savefig(bar_png, dpi=120)
    plt.close(fig)

    # loss curves: the student's own loss L_s (stage 2-3) and GenRecal's L_ar / reg_ar, global step on x
    keys = ("l_s", "l_ar", "reg_ar", "l_uld")
    fig, axes = plt.subplots(1, len(arms), figsize=(4 * len(arms), 3.4), sharey=True, squeeze=False)
    for ax, a in zip(axes[0], arms):
        for r in results["runs"]:
            if r["arm"] != a:
                continue
            recs = [json.loads(line) for line in Path(r["metrics"]).read_text().splitlines() if line.strip()]
            offset, last_stage, g = 0, None, []
            for rec in recs:
                if rec["stage"] != last_stage:
                    offset = len(g)
                    last_stage = rec["stage"]
                g.append(offset + rec["step"])
            for k, c in zip(keys, ("C0", "C1", "C2", "C3")):
                pts = [(x, rec[k]) for x, rec in zip(g, recs) if k in rec]
                if pts:
                    ax.plot(*zip(*pts), color=c, lw=0.7, alpha=0.8, label=k if r["seed"] == r_seeds(results)[0] else None)
        ax.set_title(ARM_LABELS[a], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    loss_png = out / "quality_losses.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)
    return [bar_png, loss_png]


def r_seeds(results: dict) -> list[int]:
    return sorted({r["seed"] for r in results["runs"]}) or [0]


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~3 min): small data, 1 seed, few steps")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "quality"))
    p.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    p.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (the fixed budget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any Setup field (JSON value), e.g. --set w_kl=0.5 --set stage_split=[0.2,0.5,0.3]")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="runs trained at once, one CPU thread each (default: the CPU count, at most 4)")
    p.add_argument("--no-docs-img", action="store_true", help="do not copy the PNGs to docs/img/")
    args = p.parse_args(argv)

    s = Setup(**(QUICK if args.quick else {}))
    if args.seeds:
        s.seeds = [int(x) for x in args.seeds.split(",")]
    if args.arms:
        s.arms = [a for a in args.arms.split(",") if a]
        bad = set(s.arms) - set(ARMS)
        if bad:
            p.error(f"unknown arm(s) {sorted(bad)}; choose from {ARMS}")
    if args.steps:
        s.steps = args.steps
    for kv in args.set:
        k, _, v = kv.partition("=")
        if not hasattr(s, k):
            p.error(f"--set {k}: no such setting; see Setup in bench/quality.py")
        setattr(s, k, json.loads(v))

    t_start = time.perf_counter()
    info = env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_inputs(out, s)
    log(f"out={out} quick={args.quick} setup={asdict(s)}")

    # 1. data
    parts = s.digits_parts
    train_data = make_split(out / "data" / "train", s.n_shapes_train, s.n_digits_train, s.data_seed, parts[1])
    extra = make_split(out / "data" / "teacher_extra", s.n_shapes_teacher_extra, s.n_digits_teacher_extra,
                       s.teacher_data_seed, parts[0])
    teacher_data = combine(out / "data" / "teacher.jsonl", [train_data, extra])
    test_data = make_split(out / "data" / "test", s.n_shapes_test, s.n_digits_test, s.test_seed, parts[2])

    # 2. teacher: build, SFT on the task, evaluate, extract the real cache
    from genrecal_cache.testing import build_tiny_student, build_tiny_teacher

    tdir = out / "teacher"
    t_init = tdir / "init"
    if not (t_init / "config.json").is_file():
        build_tiny_teacher(t_init, seed=1234, hidden_size=s.teacher_hidden, layers=s.teacher_layers,
                           vision_width=s.teacher_vision_width, vision_depth=s.teacher_vision_depth,
                           image_side=s.teacher_image_side)
    raw_cache = tdir / "raw_cache"
    t_kw = dict(stages=[3], stage_steps=[s.teacher_steps], batch_size=s.teacher_batch, lr=s.teacher_lr,
                lr_end=s.teacher_lr_end, train_vision=True, seed=0)
    ref_init = tdir / "same_data_student_init"
    if not (ref_init / "config.json").is_file():
        build_tiny_student(ref_init, seed=0, hidden_size=s.student_hidden, layers=s.student_layers,
                           image_size=s.student_image_size, patch_size=s.student_patch)
    ref_kw = t_kw | {"seed": 0}
    if not (_finished(tdir / "sft", t_kw) and _finished(tdir / "same_data_student", ref_kw)):
        log("teacher: throwaway cache of its data (the data in cache form) ...")
        extract_cache(t_init, teacher_data, raw_cache)
        log("teacher: SFT on its data ...")
    t_final, t_secs = run_train(tdir / "sft", cache=str(raw_cache), student=str(t_init), **t_kw)
    t_eval = run_eval(t_final, test_data, tdir / "eval.json")
    log(f"teacher: {100 * t_eval['accuracy']:.1f}% on the test split ({t_secs:.0f}s training)")
    # The same recipe and data for a student: how much better the teacher is than the student model
    # given everything the teacher had (there must be knowledge to distil).
    ref_final, _ = run_train(tdir / "same_data_student", cache=str(raw_cache), student=str(ref_init), **ref_kw)
    ref_eval = run_eval(ref_final, test_data, tdir / "same_data_student_eval.json")
    log(f"student trained like the teacher, on its data: {100 * ref_eval['accuracy']:.1f}%")
    shutil.rmtree(raw_cache, ignore_errors=True)
    log("teacher: extracting the real cache ...")
    cache = extract_cache(t_final, train_data, out / "cache")

    results = {"setup": asdict(s), "quick": args.quick, "env": info,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
               "date": time.strftime("%Y-%m-%d"), "command": "python bench/quality.py " + " ".join(argv or sys.argv[1:]),
               "teacher": {"eval": {k: v for k, v in t_eval.items() if k != "predictions"}, "train_s": t_secs},
               "same_data_student": {"eval": {k: v for k, v in ref_eval.items() if k != "predictions"}},
               "runs": []}

    # 3. arms x seeds: independent runs, `--workers` at a time (one thread each: these tiny models
    # do not scale over threads, so N processes give ~N times the throughput of one)
    for seed in s.seeds:
        sdir = out / "students" / f"seed{seed}"
        if not (sdir / "config.json").is_file():
            build_tiny_student(sdir, seed=seed, hidden_size=s.student_hidden, layers=s.student_layers,
                               image_size=s.student_image_size, patch_size=s.student_patch)
        if s.student_warmup_steps:
            log(f"student seed {seed}: SFT warm-up ({s.student_warmup_steps} steps) ...")
            run_train(out / "students" / f"seed{seed}-warm", cache=str(cache), student=str(sdir), seed=seed,
                      **(arm_config("sft", s) | {"stage_steps": [s.student_warmup_steps]}))
    jobs = [(arm, seed, str(out), str(cache), str(student_for(out, seed, s)), str(test_data), arm_config(arm, s))
            for seed in s.seeds for arm in s.arms]
    workers = max(1, min(args.workers, len(jobs)))
    with (ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread)
          if workers > 1 else contextlib.nullcontext()) as pool:
        try:
            for run in (pool.map if pool else map)(run_arm, jobs):
                results["runs"].append(run)
                (out / "results.partial.json").write_text(json.dumps(results, indent=1))
        except BaseException:  # a failed run or Ctrl-C: do not start the queued ones (finished runs are kept)
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)
            raise

    # 4. report
    table, summary = summarize(results)
    results["summary"] = summary
    results["table_md"] = table
    results["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    pngs = plots(results, out)
    if not args.no_docs_img:
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        for png in pngs:
            shutil.copy2(png, ROOT / "docs" / "img" / png.name)
    print()
    print(table)
    print(f"\nteacher {100 * t_eval['accuracy']:.1f}% | {len(s.seeds)} seed(s) | budget {s.steps} steps x "
          f"{s.batch_size} samples | wall {results['wall_s'] / 60:.1f} min | {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
