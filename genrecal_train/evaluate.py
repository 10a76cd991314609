"""`genrecal-eval`: greedy-generate answers for a held-out set and score exact match.

Works for any checkpoint a family adapter knows (teacher or student): the last assistant turn
of each sample is the reference; everything before it is the prompt.
"""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from genrecal_cache.data import decode_image, read_samples
from genrecal_cache.families import EncodeError, adapter_for, model_config
from genrecal_train.config import EvalConfig

__all__ = ["EvalError", "EvalReport", "evaluate", "normalize"]

MAX_REASONS = 20  # skipped samples whose reason a report keeps


class EvalError(ValueError):
    """A data set that cannot be evaluated (missing, not a dataset, no usable sample); the message is one line."""


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and surrounding space: 'Red.' == 'red'."""
    text = text.strip().lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class EvalReport:
    model: str
    data: str
    n: int = 0
    correct: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)  # why, for the first MAX_REASONS skipped samples
    per_type: dict[str, dict[str, int]] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        types = {t: {**v, "accuracy": v["correct"] / v["n"] if v["n"] else 0.0} for t, v in self.per_type.items()}
        return {"model": self.model, "data": self.data, "n": self.n, "correct": self.correct,
                "accuracy": self.accuracy, "skipped": self.skipped, "skip_reasons": self.skip_reasons, "per_type": types,
                "predictions": self.predictions}


@torch.inference_mode()
def evaluate(model_path: str, data: str, *, image_root: str | None = EvalConfig.image_root,
             limit: int | None = EvalConfig.limit,
             max_new_tokens: int = EvalConfig.max_new_tokens, device: str = EvalConfig.device,
             progress: bool = True, model=None) -> EvalReport:
    """Exact-match accuracy of greedy answers; `model` may be passed in to skip loading it. A model that is not
    there (ModelNotFound), or a data set that is not there or has no usable sample (EvalError), raises before or
    instead of a report, with the one line to print."""
    try:  # the file is checked here, before the model loads: a missing file should not wait for a 7B model
        samples = read_samples(data, limit=limit, image_root=image_root)
    except (OSError, ValueError) as e:
        raise EvalError(f"--data {data}: {e}") from None
    adapter = adapter_for(model_config(model_path, "--model"))
    processor = adapter.load_processor(model_path)
    if model is None:
        model = adapter.load_model(model_path, dtype=torch.float32, device=device)
    model.eval()
    dev = next(model.parameters()).device
    tok = processor.tokenizer
    report = EvalReport(model=str(model_path), data=str(data))
    per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "correct": 0})
    for s in tqdm(samples, desc="eval", disable=not progress, dynamic_ncols=True):
        why = s.error  # names the sample and the line already
        if not why:
            try:
                inputs, reference = adapter.prompt_inputs(processor, s, [decode_image(b) for b in s.images])
            except (EncodeError, ValueError) as e:
                why = f"sample {s.id!r}: {e}"
        if why:
            report.skipped += 1
            if len(report.skip_reasons) < MAX_REASONS:
                report.skip_reasons.append(why)
            continue
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        ok = normalize(answer) == normalize(reference)
        qtype = str((s.extra or {}).get("qtype", "all"))
        report.n += 1
        report.correct += ok
        per_type[qtype]["n"] += 1
        per_type[qtype]["correct"] += ok
        report.predictions.append({"id": s.id, "qtype": qtype, "prediction": answer, "reference": reference,
                                   "correct": bool(ok)})
    report.per_type = dict(per_type)
    if not report.n:
        why = f": {report.skipped} skipped, the first: {report.skip_reasons[0]}" if report.skipped else ": it is empty"
        raise EvalError(f"--data {data}: no sample to evaluate{why}")
    return report


# --- comparing runs (`genrecal-eval --compare`) --------------------------------------------------

def run_label(path: str | Path) -> str:
    """What a compared run is called: the file's stem, or its folder's name for RUN/eval.json and run folders."""
    p = Path(path)
    return p.parent.name if p.suffix == ".json" and p.stem == "eval" else (p.stem if p.suffix == ".json" else p.name)


def load_report(path: str | Path, data: str | None = None, device: str = EvalConfig.device,
                image_root: str | None = EvalConfig.image_root) -> dict:
    """An eval report: an eval JSON (`genrecal-eval --out`), or a run folder's eval.json. A run folder
    without one (or with one on other data) is evaluated on `data` when given, into RUN/eval.json."""
    p = Path(path)
    if p.is_dir():
        run, p = p, p / "eval.json"
        stale = data is not None and p.is_file() and Path(json.loads(p.read_text()).get("data", "")).resolve() != Path(data).resolve()
        if not p.is_file() or stale:
            model = run / "final" if (run / "final" / "config.json").is_file() else run
            if data is None or not (model / "config.json").is_file():
                raise FileNotFoundError(
                    f"{run}: no eval.json in this folder; evaluate it first (genrecal-eval --model {model} "
                    f"--data HELDOUT --out {p}) or pass --data HELDOUT to --compare")
            p.write_text(json.dumps(evaluate(str(model), data, image_root=image_root, device=device).to_dict(),
                                    indent=1))
    elif not p.is_file():
        raise FileNotFoundError(f"{path}: neither an eval JSON nor a run folder")
    try:
        rep = json.loads(p.read_text())
        rep["accuracy"], rep["n"], rep["per_type"]  # noqa: B018  (the keys a comparison reads)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a genrecal-eval report ({type(e).__name__}: {e}); write one with "
                         "genrecal-eval --model MODEL --data HELDOUT --out FILE.json") from e
    return rep


def compare_table(reports: dict[str, dict]) -> str:
    """Markdown table of accuracy (%) overall and per question type, one row per run."""
    qtypes = sorted({q for r in reports.values() for q in r["per_type"]})
    first = next(iter(reports.values()))
    count = lambda q: next((r["per_type"][q]["n"] for r in reports.values() if q in r["per_type"]), 0)  # noqa: E731
    header = ["run", f"all (n={first['n']})", *[f"{q} ({count(q)})" for q in qtypes]]
    rows = [[label, f"{100 * r['accuracy']:.1f}",
             *[f"{100 * r['per_type'][q]['accuracy']:.1f}" if q in r["per_type"] else "-" for q in qtypes]]
            for label, r in reports.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
