"""Quality suite: does GenRecal make the small student better than plain SFT, across answer formats
and student families?

One command, CPU only, offline:

    PYTHONPATH=genrecal_cache/compat HF_HUB_OFFLINE=1 python bench/quality.py          # full suite
    PYTHONPATH=genrecal_cache/compat HF_HUB_OFFLINE=1 python bench/quality.py --quick  # smoke run (its numbers mean nothing)

What it does (every step writes its result to disk first, so a rerun resumes where it stopped; a
finished arm run is redone when its training settings change; data splits, model inits and the cache
are reused as they are, so an --out made with other data/model settings is refused, `check_inputs`):
1. data (`bench/quality_tasks.py`): the same visual facts (colour, shape, count, side, digit) asked for
   in three answer formats, the task kinds: one word ("three"), a short sentence whose informative word
   comes last ("there are three") and a description of a few clauses. Three splits: the distillation
   set (every arm trains on it), the teacher's own extra data, and a held-out test split; digit images
   come from disjoint parts of scikit-learn's 1797.
2. teacher: a tiny Qwen2-VL-architecture model, wider and deeper than the students, trained from
   scratch by SFT (`--stages 3` on a throwaway cache) on the distillation set plus its extra data,
   evaluated on the test split, then run once over the distillation set to write the real teacher cache.
3. students, each built fresh per seed, with their own tokenizer and chat template:
   - llava    LLaVA (Llama + SigLIP, 16 image tokens), `build_tiny_student`
   - qwen2vl  Qwen2-VL architecture (4 image tokens) with a smaller tokenizer of its own (other merges)
   in two regimes (`--regimes`):
   - users    (run first) each student is first pre-trained, its tower trained, on a generic visual mix that is
              not the distillation tasks (captions, a shape's row, "is there a red shape?", a digit's parity;
              `write_generic_mix`), so that it sees, as a real pretrained student does; the arms start from it
   - scratch  the arms start from the fresh init
4. arms, each over several seeds with the SAME budget (samples per step, optimizer steps):
   - sft, sft_warmup  student SFT only (stages [3], all steps), without / with the LR warm-up, tower trained;
     sft_frozen, sft_warmup_frozen  the same with the tower frozen (the product's default). The table's
                      "SFT at its best" is the best of the four per regime, student and task kind
   - genrecal         GenRecal stages 1-3 with the trainer's default main pass (student-aligned answer rows),
                      tower trained; genrecal_frozen the same, tower frozen; "GenRecal at its best" is the
                      better of the two per task kind (the same choice SFT gets)
   - genrecal_noreg   the same without the regularization pass (ablation)
   - genrecal_paper   the paper's main pass (teacher answer rows, `main_pass_answer="teacher"`)
   - uld              cross-tokenizer logit KD (Universal Logit Distillation, Boizard et al. 2024)
5. tables per regime and student (mean +- std exact match per task kind, teacher as ceiling), results.json and
   an accuracy chart (PNG) under the --out folder, copied to docs/img/.
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
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # one log line per step and run instead of progress bars

from genrecal_cache.io.durable import atomic_write  # noqa: E402
from quality_tasks import KINDS, write_generic_mix, write_tasks  # noqa: E402

ARMS = ("sft", "sft_warmup", "sft_frozen", "sft_warmup_frozen", "genrecal", "genrecal_frozen", "genrecal_noreg",
        "genrecal_paper", "uld", "genrecal_lowrank", "genrecal_text", "genrecal_none")
# "<arm>_frozen": the arm with the student's vision tower frozen (the product's default); every other arm trains it
SFT_ARMS = ("sft", "sft_warmup", "sft_frozen", "sft_warmup_frozen")  # SFT at its best: the best of these per kind
GENRECAL_ARMS = ("genrecal", "genrecal_frozen")  # GenRecal with the better tower choice per kind
REGIMES = ("scratch", "users")
# GenRecal (default settings) on a cache of the same teacher stored with another context policy (format/roles.py);
# every other arm reads the cache stored in full
CONTEXT_ARMS = {"genrecal_lowrank": "lowrank", "genrecal_text": "text", "genrecal_none": "none"}
ARM_LABELS = {"sft": "SFT only, no warm-up", "sft_warmup": "SFT only, warm-up",
              "sft_frozen": "SFT only, no warm-up, tower frozen", "sft_warmup_frozen": "SFT only, warm-up, tower frozen",
              "genrecal": "GenRecal 1-3 (default)", "genrecal_frozen": "GenRecal 1-3, tower frozen", "genrecal_noreg": "GenRecal 1-3, no reg. pass",
              "genrecal_paper": "GenRecal 1-3, paper's main pass", "uld": "ULD (logit KD, cross-tokenizer)",
              **{arm: f"GenRecal 1-3, context '{c}'" for arm, c in CONTEXT_ARMS.items()}}
ARM_COLOURS = {"sft": "#aaaaaa", "sft_warmup": "#666666", "sft_frozen": "#d9d9d9", "sft_warmup_frozen": "#969696",
               "genrecal": "#08519c", "genrecal_frozen": "#4292c6", "genrecal_noreg": "#9ecae1",
               "genrecal_paper": "#6a51a3", "uld": "#fd8d3c",
               "genrecal_lowrank": "#3182bd", "genrecal_text": "#74c476", "genrecal_none": "#31a354"}
STUDENTS = ("llava", "qwen2vl")


@dataclass
class Setup:
    """Every knob of the experiment (written into results.json)."""
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    # The distillation set (per task kind): every arm trains on it, and the teacher cache is extracted over it.
    n_train: int = 240
    data_seed: int = 2
    # The teacher is trained on the distillation set plus this much more data of its own (per kind): a
    # big teacher has seen far more than the lab's distillation data, including data like it.
    n_teacher_extra: int = 600
    # False: the teacher is trained on its own data only, never on the distillation set, as a big teacher never
    # saw a lab's data; its distribution on the distillation set is then its generalization, not a memorized label
    teacher_sees_train: bool = True
    # distillation on inputs beyond the labelled set: this many questions per kind with no label; the teacher
    # answers them (greedy) and every arm trains on the labelled set plus these answers, the SFT arms too (that is
    # sequence-level KD, so the SFT rows then measure SFT on the same inputs, not SFT on the labels alone).
    # Their digits come from the teacher's part of the digit images (a lab's unlabelled pool, not the test split)
    n_unlabelled: int = 0
    unlabelled_seed: int = 5
    teacher_data_seed: int = 0
    n_test: int = 100  # per kind, held out from everyone
    test_seed: int = 1000
    # digit images are drawn from disjoint parts of the 1797 that scikit-learn ships
    digits_parts: tuple[tuple[int, int], ...] = ((0, 1000), (1000, 1497), (1497, 1797))  # teacher extra, train, test
    # teacher: wider/deeper than the students
    teacher_hidden: int = 192
    teacher_layers: int = 3
    teacher_vision_width: int = 128
    teacher_vision_depth: int = 1
    teacher_steps: int = 1200
    teacher_batch: int = 16
    teacher_lr: float = 1e-3
    teacher_lr_end: float = 1e-4
    # The teacher's vision tower stays at its random init: trained from scratch at 1e-3 it washes colour out of
    # the image tokens and the teacher learns no colour (53% overall instead of 88%); bench/colour_only.py and
    # bench/vision_probe.py measure it (docs/benchmarks.md). Real teachers come with a trained tower.
    teacher_train_vision: bool = False
    # students, built per seed
    students: list[str] = field(default_factory=lambda: list(STUDENTS))
    student_hidden: int = 64
    student_layers: int = 2
    student_image_size: int = 32   # llava: pixels; (size / patch)^2 image tokens
    student_patch: int = 8
    qwen2vl_student_vocab: int = 600  # the teacher's is 800: other merges, other token boundaries
    # the users' regime: each student is first pre-trained (its tower trained, SFT) on a generic visual mix that
    # is not the distillation tasks (bench/quality_tasks.py: captions, a shape's row, is there a <colour> shape,
    # a digit's parity), so that it sees, as a real pretrained student does; "scratch" starts from the init
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    n_generic: int = 4000
    generic_seed: int = 3
    n_generic_test: int = 200
    generic_test_seed: int = 4
    pretrain_steps: int = 3000
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    pretrain_lr_end: float = 1e-4
    # the budget every arm gets
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    lr_end: float = 1e-4
    warmup: float = 0.1  # fraction of each stage with a linear LR warm-up (GenRecal arms, sft_warmup)
    stage_split: tuple[float, float, float] = (0.04, 0.76, 0.2)  # GenRecal stages 1/2/3 share of `steps`
    w_ar: float = 1.0
    w_kl: float = 1.0
    w_student: float = 1.0
    recal_layers: int = 2
    temperature: float = 1.0
    w_uld: float = 1.0
    # TrainConfig fields set in every GenRecal arm on top of the above (method changes measured on the whole suite),
    # e.g. --set 'genrecal_overrides={"freeze_recalibrator_in_stage2": true}'
    genrecal_overrides: dict = field(default_factory=dict)
    max_new_tokens: int = 40  # greedy answer length limit at evaluation (the clause answers are long)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["sft", "sft_warmup", "sft_frozen", "sft_warmup_frozen", "genrecal",
                                                     "genrecal_frozen"])


# Knobs of the arm runs only: a finished run is redone when they change (its settings are compared).
# Every other Setup field shapes what an --out reuses whenever it exists (data splits, model inits,
# the teacher cache), so `check_inputs` holds an --out to one choice of them.
ARM_KNOBS = frozenset({"steps", "batch_size", "lr", "lr_end", "warmup", "stage_split", "w_ar", "w_kl", "w_student",
                       "recal_layers", "temperature", "w_uld", "genrecal_overrides", "seeds", "arms", "students", "max_new_tokens",
                       "regimes"})

QUICK = dict(n_train=30, n_teacher_extra=30, n_test=10, teacher_steps=60, teacher_batch=8, teacher_hidden=128,
             teacher_layers=2, teacher_vision_width=64, steps=30, batch_size=8, seeds=[0], max_new_tokens=24,
             n_generic=40, n_generic_test=8, pretrain_steps=20, pretrain_batch=8)


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env() -> dict:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "genrecal_cache" / "compat"),
                                                              os.environ.get("PYTHONPATH")]))
    from genrecal_cache.testing import install_compat_shim

    install_compat_shim()
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def check_inputs(out: Path, s) -> None:
    """Record the data/model knobs of a new --out; refuse to reuse an --out made with other ones. `s` is a
    `Setup`, or the demo's `DemoTask` (scripts/demo_task.py): missing knobs take the defaults of its own class."""
    want = {k: v for k, v in json.loads(json.dumps(asdict(s))).items() if k not in ARM_KNOBS}
    path = out / "inputs.json"
    if not path.is_file():
        path.write_text(json.dumps(want, indent=1))
        return
    # a knob an older --out does not record was made before the knob existed: with its default, the old behaviour
    have = {k: v for k, v in json.loads(json.dumps(asdict(type(s)()))).items() if k not in ARM_KNOBS} | \
        json.loads(path.read_text())
    diff = [f"{k}: {have.get(k)} -> {want.get(k)}" for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
    if diff:
        raise SystemExit(f"{out} holds data, models and a cache made with other settings ({'; '.join(diff)}); "
                         "they would be reused as they are: use a fresh --out (or the old settings)")


# --- data ------------------------------------------------------------------------------------------

def combine(path: Path, splits: list[Path]) -> Path:
    """One JSONL over several splits' records, beside their folders (image paths and ids made unique;
    a record may have several images)."""
    if path.is_file():
        return path
    lines = []
    for split in splits:
        folder = split.parent.name
        for line in split.read_text().splitlines():
            rec = json.loads(line)
            rec["id"] = f"{folder}-{rec['id']}"
            images = [f"{folder}/{ref}" for ref in (rec["image"] if isinstance(rec["image"], list) else [rec["image"]])]
            rec["image"] = images if len(images) > 1 else images[0]
            lines.append(json.dumps(rec))
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


# --- steps -----------------------------------------------------------------------------------------

def extract_cache(teacher: Path, data: Path, out: Path, context: str = "full") -> Path:
    """The teacher's cache over `data`, its context rows stored by `context` (top-k at every row in full, else
    at answer rows: the product's defaults for the compact policies)."""
    from genrecal_cache.extract import ExtractConfig, extract

    if (out / "manifest.json").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    extract(ExtractConfig(teacher=str(teacher), data=str(data), out=str(out), backend="transformers",
                          progress=False, hidden_codec="float32", context=context,
                          topk_rows="all" if context == "full" else "answer"))
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


def teacher_train_kw(s: Setup) -> dict:
    """The teacher's training run (SFT on its data, `run_train` keywords): one recipe for the suite and its checks."""
    return dict(stages=[3], stage_steps=[s.teacher_steps], batch_size=s.teacher_batch, lr=s.teacher_lr,
                lr_end=s.teacher_lr_end, train_vision=s.teacher_train_vision, seed=0)


def run_eval(model: Path, data: Path, out: Path, max_new_tokens: int) -> dict:
    from genrecal_train.evaluate import evaluate

    if out.is_file():
        return json.loads(out.read_text())
    rep = evaluate(str(model), str(data), progress=False, max_new_tokens=max_new_tokens).to_dict()
    out.write_text(json.dumps(rep, indent=1))
    return rep


def teacher_answers(teacher: Path, data: Path, out: Path, max_new_tokens: int) -> Path:
    """`data`'s records with the teacher's greedy answers in place of their labels (the ones it leaves empty
    dropped), written to `out` beside `data` (its images are found the same way)."""
    if out.is_file():
        return out
    report = run_eval(teacher, data, out.with_suffix(".eval.json"), max_new_tokens)
    answers = {p["id"]: p["prediction"].strip() for p in report["predictions"]}
    lines = []
    for line in data.read_text().splitlines():
        rec = json.loads(line)
        if answers.get(rec["id"]):
            rec["conversations"][-1]["value"] = answers[rec["id"]]
            lines.append(json.dumps(rec))
    log(f"teacher: answered {len(lines)} of {len(answers)} unlabelled questions "
        f"({100 * report['accuracy']:.1f}% of them right by their hidden labels)")
    atomic_write(out, ("\n".join(lines) + "\n").encode())
    return out


def per_kind(report: dict) -> dict[str, float]:
    """Accuracy per task kind ("word/colour" -> "word") from an eval report's per-type counts."""
    n: dict[str, list[int]] = {}
    for qtype, v in report["per_type"].items():
        c = n.setdefault(qtype.split("/")[0], [0, 0])
        c[0], c[1] = c[0] + v["correct"], c[1] + v["n"]
    return {k: c / t for k, (c, t) in n.items() if t}


def arm_config(arm: str, s: Setup) -> dict:
    common = dict(batch_size=s.batch_size, lr=s.lr, lr_end=s.lr_end, warmup=s.warmup,
                  train_vision=not arm.endswith("_frozen"), recal_layers=s.recal_layers, temperature=s.temperature,
                  w_ar=s.w_ar, w_kl=s.w_kl, w_student=s.w_student)
    arm = arm.removesuffix("_frozen")
    if arm in ("sft", "sft_warmup", "uld"):
        kw = dict(stages=[3], stage_steps=[s.steps], **common)
        if arm == "sft":
            kw["warmup"] = 0.0
        if arm == "uld":
            kw["w_uld"] = s.w_uld
        return kw
    n1 = max(1, round(s.steps * s.stage_split[0]))
    n2 = max(1, round(s.steps * s.stage_split[1]))
    n3 = max(1, s.steps - n1 - n2)
    # genrecal_<context>: the default arm on a cache stored with another context policy (same settings)
    base = dict(stages=[1, 2, 3], stage_steps=[n1, n2, n3], use_reg_pass=True, main_pass_answer="student_aligned")
    # an override may set any setting but the one that makes an arm what it is
    defining = {"genrecal_noreg": {"use_reg_pass": False}, "genrecal_paper": {"main_pass_answer": "teacher"}}
    return {**base, **common, **s.genrecal_overrides, **defining.get(arm, {})}


def build_student(kind: str, out: Path, seed: int, s: Setup) -> Path:
    from genrecal_cache.testing import build_tiny_student, build_tiny_teacher

    if (out / "config.json").is_file():
        return out
    if kind == "llava":
        return build_tiny_student(out, seed=seed, hidden_size=s.student_hidden, layers=s.student_layers,
                                  image_size=s.student_image_size, patch_size=s.student_patch)
    if kind == "qwen2vl":  # the teacher's architecture at the student's size, with a tokenizer of its own
        return build_tiny_teacher(out, seed=seed, hidden_size=s.student_hidden, layers=s.student_layers,
                                  vocab_size=s.qwen2vl_student_vocab, head_dim=32, vision_width=64)
    raise ValueError(f"unknown student {kind!r}; choose from {STUDENTS}")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    env()


def run_pretrain(job: tuple) -> dict:
    """The users' regime: SFT one student init on the generic visual mix, its tower trained (or reuse it), and
    evaluate it on the mix's held-out split; runs in a worker process. Its `final` folder is the student."""
    student_kind, seed, rdir, cache, init, test_data, kw, max_new = job
    name = f"{student_kind}-seed{seed} pre-training"
    log(f"{name} ...")
    final, secs = run_train(Path(rdir), cache=cache, student=init, seed=seed, **kw)
    ev = run_eval(final, Path(test_data), Path(rdir) / "eval.json", max_new)
    facts = {k.split("/")[1]: round(100 * v["correct"] / v["n"], 1) for k, v in ev["per_type"].items() if v["n"]}
    log(f"{name}: {100 * ev['accuracy']:.1f}% on the generic test split {json.dumps(facts)} ({secs:.0f}s)")
    return {"student": student_kind, "seed": seed, "final": str(final), "accuracy": ev["accuracy"],
            "per_type": ev["per_type"], "train_s": secs}


def run_arm(job: tuple) -> dict:
    """Train and evaluate one (regime, student, arm, seed) run (or reuse it); runs in a worker process."""
    regime, student_kind, arm, seed, out, cache, student, test_data, kw, max_new = job
    name = f"{regime}-{student_kind}-{arm}-seed{seed}"
    rdir = Path(out) / "runs" / name
    log(f"{name}: training ...")
    final, secs = run_train(rdir, cache=cache, student=student, seed=seed, **kw)
    ev = run_eval(final, Path(test_data), rdir / "eval.json", max_new)
    log(f"{name}: {100 * ev['accuracy']:.1f}% {json.dumps({k: round(100 * v, 1) for k, v in per_kind(ev).items()})} "
        f"({secs:.0f}s training)")
    return {"regime": regime, "student": student_kind, "arm": arm, "seed": seed, "accuracy": ev["accuracy"], "n": ev["n"],
            "kinds": per_kind(ev), "per_type": ev["per_type"], "train_s": secs, "metrics": str(rdir / "metrics.jsonl")}


# --- report ----------------------------------------------------------------------------------------

def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def _best(means: dict[str, dict[str, float]], arms: tuple[str, ...], kinds: list[str]) -> dict[str, tuple[float, str]]:
    """Per kind: the best mean accuracy among `arms` that ran, and which arm gave it."""
    ran = [a for a in arms if a in means]
    return {k: max((means[a].get(k, 0.0), a) for a in ran) for k in kinds} if ran else {}


def summarize(results: dict) -> tuple[str, dict]:
    """One markdown table per regime and student: rows are arms, columns task kinds (mean +- std over seeds),
    then SFT at its best (tower x warm-up, per kind), GenRecal at its best (tower, per kind) and the margin."""
    kinds = results["setup"]["kinds"]
    teacher = per_kind(results["teacher"]["eval"])
    summary: dict = {}
    tables = []
    for regime in results["setup"].get("regimes", ["scratch"]):
        for student in results["setup"]["students"]:
            rows = [("teacher (ceiling)", "1", *[f"{100 * teacher.get(k, 0):.1f}" for k in kinds])]
            means: dict[str, dict[str, float]] = {}
            out = summary.setdefault(regime, {}).setdefault(student, {})
            for arm in results["setup"]["arms"]:
                runs = [r for r in results["runs"] if r.get("regime", "scratch") == regime
                        and r["student"] == student and r["arm"] == arm]
                if not runs:
                    continue
                acc = {k: [r["kinds"][k] for r in runs if k in r["kinds"]] for k in kinds}
                means[arm] = {k: statistics.fmean(v) for k, v in acc.items() if v}
                out[arm] = {"seeds": [r["seed"] for r in runs], "per_kind": acc, "mean": means[arm],
                            "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in acc.items() if v}}
                rows.append((ARM_LABELS[arm], str(len(runs)), *[_ms(acc[k]) for k in kinds]))
            sft, gen = _best(means, SFT_ARMS, kinds), _best(means, GENRECAL_ARMS, kinds)
            if sft:
                out["sft_best"] = {k: v for k, (v, _) in sft.items()}
                out["sft_best_arm"] = {k: a for k, (_, a) in sft.items()}
                rows.append(("SFT at its best (arm per kind)", "",
                             *[f"{100 * sft[k][0]:.1f} ({sft[k][1]})" for k in kinds]))
            if gen:
                out["genrecal_best"] = {k: v for k, (v, _) in gen.items()}
                out["genrecal_best_arm"] = {k: a for k, (_, a) in gen.items()}
                rows.append(("GenRecal at its best (tower per kind)", "",
                             *[f"{100 * gen[k][0]:.1f} ({gen[k][1]})" for k in kinds]))
            if sft and gen:
                out["margin"] = {k: gen[k][0] - sft[k][0] for k in kinds}
                rows.append(("GenRecal - SFT (both at their best)", "", *[f"{100 * out['margin'][k]:+.1f}" for k in kinds]))
            if len(rows) == 1:
                continue
            header = ("arm", "seeds", *kinds)
            lines = [f"**{regime} regime, {student} student**", "", "| " + " | ".join(header) + " |",
                     "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            tables.append("\n".join(lines))
    return "\n\n".join(tables), summary


def plots(results: dict, out: Path) -> list[Path]:
    """Accuracy per task kind, one panel per regime and student: a bar per arm (mean), dots per seed, teacher line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, students = results["setup"]["kinds"], results["setup"]["students"]
    arms = [a for a in results["setup"]["arms"] if any(r["arm"] == a for r in results["runs"])]
    teacher = per_kind(results["teacher"]["eval"])
    regimes = [g for g in results["setup"].get("regimes", ["scratch"])
               if any(r.get("regime", "scratch") == g for r in results["runs"])] or ["scratch"]
    fig, axes = plt.subplots(len(regimes), len(students), figsize=(5.5 * len(students), 3.4 * len(regimes) + 0.6),
                             sharey=True, squeeze=False)
    width = 0.8 / max(1, len(arms))
    panels = [(ax, regime, student) for row, regime in zip(axes, regimes) for ax, student in zip(row, students)]
    for ax, regime, student in panels:
        for j, arm in enumerate(arms):
            runs = [r for r in results["runs"] if r.get("regime", "scratch") == regime and r["student"] == student
                    and r["arm"] == arm]
            for x, k in enumerate(kinds):
                accs = [100 * r["kinds"][k] for r in runs if k in r["kinds"]]
                if not accs:
                    continue
                pos = x - 0.4 + (j + 0.5) * width
                ax.bar(pos, statistics.fmean(accs), width, color=ARM_COLOURS[arm], label=ARM_LABELS[arm] if x == 0 else None)
                ax.plot([pos] * len(accs), accs, "k.", ms=3)
        for x, k in enumerate(kinds):
            ax.hlines(100 * teacher.get(k, 0), x - 0.45, x + 0.45, colors="crimson", linestyles="--",
                      label="teacher" if x == 0 else None)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_title(f"{regime} regime, {student} student", fontsize=10)
        ax.set_ylabel("held-out exact match (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()  # below the panels: never over a bar
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle(f"Same budget ({results['setup']['steps']} steps x {results['setup']['batch_size']}), "
                 f"{len(results['setup']['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0.13 / len(regimes), 1, 1))
    png = out / "quality_suite_accuracy.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [png]


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small data, 1 seed, few steps")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "quality"))
    p.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    p.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--students", help=f"comma-separated subset of {','.join(STUDENTS)}")
    p.add_argument("--regimes", help=f"comma-separated subset of {','.join(REGIMES)}")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (the fixed budget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any Setup field (JSON value), e.g. --set w_kl=0.5 --set stage_split=[0.2,0.5,0.3]")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="runs trained at once, one CPU thread each (default: the CPU count, at most 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of the teacher's training in the main process (default 1: on a shared machine "
                        "more threads busy-wait for each other and run many times slower)")
    p.add_argument("--no-docs-img", action="store_true", help="do not copy the PNG to docs/img/")
    args = p.parse_args(argv)

    s = Setup(**(QUICK if args.quick else {}))
    if args.seeds:
        s.seeds = [int(x) for x in args.seeds.split(",")]
    if args.arms:
        s.arms = [a for a in args.arms.split(",") if a]
        bad = set(s.arms) - set(ARMS)
        if bad:
            p.error(f"unknown arm(s) {sorted(bad)}; choose from {ARMS}")
    if args.students:
        s.students = [a for a in args.students.split(",") if a]
        bad = set(s.students) - set(STUDENTS)
        if bad:
            p.error(f"unknown student(s) {sorted(bad)}; choose from {STUDENTS}")
    if args.steps:
        s.steps = args.steps
    for kv in args.set:
        k, _, v = kv.partition("=")
        if not hasattr(s, k):
            p.error(f"--set {k}: no such setting; see Setup in bench/quality.py")
        setattr(s, k, json.loads(v))
    if args.regimes:
        s.regimes = [a for a in args.regimes.split(",") if a]
    bad = set(s.regimes) - set(REGIMES)
    if bad:
        p.error(f"unknown regime(s) {sorted(bad)}; choose from {REGIMES}")

    t_start = time.perf_counter()
    info = env()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_inputs(out, s)
    log(f"out={out} quick={args.quick} setup={asdict(s)}")

    # 1. data
    parts = s.digits_parts
    train_data = write_tasks(out / "data" / "train", s.kinds, s.n_train, s.data_seed, parts[1])
    extra = write_tasks(out / "data" / "teacher_extra", s.kinds, s.n_teacher_extra, s.teacher_data_seed, parts[0])
    teacher_data = (combine(out / "data" / "teacher.jsonl", [train_data, extra]) if s.teacher_sees_train
                    else combine(out / "data" / "teacher_own.jsonl", [extra]))
    test_data = write_tasks(out / "data" / "test", s.kinds, s.n_test, s.test_seed, parts[2])
    # the users' regime's generic visual mix: digits from the teacher's part (never the test split's)
    generic_data = write_generic_mix(out / "data" / "generic", s.n_generic, s.generic_seed, parts[0])
    generic_test = write_generic_mix(out / "data" / "generic_test", s.n_generic_test, s.generic_test_seed, parts[0])

    # 2. teacher: build, SFT on the task, evaluate, extract the real cache
    from genrecal_cache.testing import build_tiny_teacher

    tdir = out / "teacher"
    t_init = tdir / "init"
    if not (t_init / "config.json").is_file():
        build_tiny_teacher(t_init, seed=1234, hidden_size=s.teacher_hidden, layers=s.teacher_layers,
                           vision_width=s.teacher_vision_width, vision_depth=s.teacher_vision_depth)
    raw_cache = tdir / "raw_cache"
    t_kw = teacher_train_kw(s)
    if not _finished(tdir / "sft", t_kw):
        log("teacher: throwaway cache of its data (the data in cache form) ...")
        extract_cache(t_init, teacher_data, raw_cache)
        log("teacher: SFT on its data ...")
    t_final, t_secs = run_train(tdir / "sft", cache=str(raw_cache), student=str(t_init), **t_kw)
    t_eval = run_eval(t_final, test_data, tdir / "eval.json", s.max_new_tokens)
    log(f"teacher: {100 * t_eval['accuracy']:.1f}% on the test split {per_kind(t_eval)} ({t_secs:.0f}s training)")
    shutil.rmtree(raw_cache, ignore_errors=True)
    if s.n_unlabelled:
        unlabelled = write_tasks(out / "data" / "unlabelled", s.kinds, s.n_unlabelled, s.unlabelled_seed, parts[0])
        answered = teacher_answers(t_final, unlabelled, out / "data" / "unlabelled" / "teacher_answers.jsonl",
                                   s.max_new_tokens)
        train_data = combine(out / "data" / "train_and_unlabelled.jsonl", [train_data, answered])
    log("teacher: extracting the real cache ...")
    cache = extract_cache(t_final, train_data, out / "cache")
    caches = {arm: extract_cache(t_final, train_data, out / f"cache-{c}", c) for arm, c in CONTEXT_ARMS.items()
              if arm in s.arms}

    results = {"setup": asdict(s), "quick": args.quick, "env": info,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
               "date": time.strftime("%Y-%m-%d"), "command": "python bench/quality.py " + " ".join(argv or sys.argv[1:]),
               "teacher": {"eval": {k: v for k, v in t_eval.items() if k != "predictions"}, "train_s": t_secs},
               "pretrain": [], "runs": []}

    # 3. students (x regimes) x arms x seeds: independent runs, `--workers` at a time (one thread each: these
    # tiny models do not scale over threads, so N processes give ~N times the throughput of one). The users'
    # regime first pre-trains every (student, seed) on the generic mix, then starts from that model.
    inits = {(student, seed): build_student(student, out / "students" / f"{student}-seed{seed}", seed, s)
             for seed in s.seeds for student in s.students}
    pre_jobs = []
    if "users" in s.regimes:
        generic_cache = extract_cache(t_init, generic_data, out / "generic_cache")
        pre_kw = dict(stages=[3], stage_steps=[s.pretrain_steps], batch_size=s.pretrain_batch, lr=s.pretrain_lr,
                      lr_end=s.pretrain_lr_end, train_vision=True)
        pre_jobs = [(student, seed, str(out / "students" / f"{student}-seed{seed}-pretrained"), str(generic_cache),
                     str(init), str(generic_test), pre_kw, s.max_new_tokens) for (student, seed), init in inits.items()]
    workers = max(1, min(args.workers, len(s.seeds) * len(s.students) * len(s.arms) * len(s.regimes)))
    with (ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread)
          if workers > 1 else contextlib.nullcontext()) as pool:
        try:
            for pre in (pool.map if pool else map)(run_pretrain, pre_jobs):
                results["pretrain"].append(pre)
            pretrained = {(r["student"], r["seed"]): r["final"] for r in results["pretrain"]}
            jobs = [(regime, student, arm, seed, str(out), str(caches.get(arm, cache)),
                     str(inits[student, seed] if regime == "scratch" else pretrained[student, seed]), str(test_data),
                     arm_config(arm, s), s.max_new_tokens)
                    for regime in sorted(s.regimes, key=REGIMES[::-1].index) for seed in s.seeds
                    for student in s.students for arm in s.arms]  # the users' regime first: the product's case
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
