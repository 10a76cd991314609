"""Pictures of a run: loss curves (`curves.png`, written by the trainer at the end of each stage) and
held-out accuracy per question type for several runs (`genrecal-eval --compare`).

matplotlib is optional (the `dev` extra): without it every function here returns None after saying
once, on stderr, how to get the PNGs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NO_MATPLOTLIB = "PNG skipped: matplotlib is not installed (pip install matplotlib)"

# Loss terms of metrics.jsonl (genrecal_train/model.py), in legend order, with what they are.
LOSS_TERMS = {
    "l_ar": "L_ar: answer CE through the teacher head",
    "l_kl": "L_kl: KL to the teacher's answer distribution",
    "reg_ar": "reg. pass L_ar (teacher features only)",
    "reg_kl": "reg. pass L_kl",
    "l_s": "L_s: student's own answer CE",
    "l_uld": "L_uld: cross-tokenizer logit KD",
}
STAGE_TITLES = {1: "stage 1: Recalibrator only", 2: "stage 2: student + Recalibrator", 3: "stage 3: student alone"}
_warned = False


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (said once) when matplotlib is missing."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            print(NO_MATPLOTLIB, file=sys.stderr, flush=True)
            _warned = True
        return None
    return plt


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average (the window shrinks at the ends): no lag behind the raw curve."""
    half, out = window // 2, []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def plot_curves(metrics: str | Path, out: str | Path | None = None) -> Path | None:
    """Loss terms of each stage of a run, one panel per stage; returns the PNG (default: curves.png
    beside metrics.jsonl), or None without matplotlib or without records."""
    metrics = Path(metrics)
    records = read_metrics(metrics) if metrics.is_file() else []
    plt = _pyplot() if records else None
    if plt is None:
        return None
    from matplotlib import ticker

    stages = list(dict.fromkeys(r["stage"] for r in records))  # in the order they ran
    colours = {k: f"C{i}" for i, k in enumerate(LOSS_TERMS)}
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages) + 1.0, 3.8), sharey=True, squeeze=False)
    shown: dict[str, object] = {}
    for ax, stage in zip(axes[0], stages):
        recs = [r for r in records if r["stage"] == stage]
        for key in LOSS_TERMS:
            pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), float) and r[key] > 0]
            if not pts:
                continue
            steps, values = zip(*pts)
            # raw values faint, a moving average on top: per-step losses of small batches are noisy
            ax.plot(steps, values, color=colours[key], lw=0.6, alpha=0.35)
            (line,) = ax.plot(steps, _smooth(list(values), max(1, len(values) // 15)), color=colours[key], lw=1.6)
            shown.setdefault(key, line)
        ax.set_title(STAGE_TITLES.get(stage, f"stage {stage}"), fontsize=10)
        ax.set_xlabel("optimizer step (within the stage)")
        ax.set_yscale("log")
        # plain numbers at 1, 2, 5 x 10^k instead of matplotlib's 2x10^-1 labels
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("loss (log scale; line: moving average)")
    fig.legend(list(shown.values()), [LOSS_TERMS[k] for k in shown], loc="lower center",
               ncol=min(3, len(shown)), fontsize=8, frameon=False)
    fig.suptitle(f"Training losses: {metrics.parent.name}", fontsize=11)
    rows = (len(shown) + 2) // 3
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    png = Path(out) if out else metrics.with_name("curves.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_accuracy(reports: dict[str, dict], out: str | Path) -> Path | None:
    """Grouped bars: held-out accuracy (%) per question type and overall, one bar per run.
    `reports`: label -> an eval report (`EvalReport.to_dict()`). None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    qtypes = sorted({q for r in reports.values() for q in r["per_type"]})
    groups = ["all", *qtypes] if len(qtypes) > 1 else ["all"]
    n = len(reports)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(groups) * n + 2.0), 4.0))
    for i, (label, rep) in enumerate(reports.items()):
        values = [100 * (rep["accuracy"] if g == "all" else rep["per_type"].get(g, {}).get("accuracy", float("nan")))
                  for g in groups]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(groups))]
        bars = ax.bar(xs, values, width, label=f"{label} ({100 * rep['accuracy']:.1f}%)", color=f"C{i}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={_count(reports, g)})" for g in groups], fontsize=8)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Accuracy per question type")
    ax.legend(fontsize=8, loc="upper left", ncol=min(n, 3), frameon=False)
    ax.grid(True, axis="y", alpha=0.25)
    fig.tight_layout()
    png = Path(out)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _count(reports: dict[str, dict], group: str) -> int:
    """Questions in a group (of the first report that has it: runs compared on one set agree)."""
    for rep in reports.values():
        if group == "all":
            return rep["n"]
        if group in rep["per_type"]:
            return rep["per_type"][group]["n"]
    return 0
