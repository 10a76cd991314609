"""`genrecal-eval`: greedy-generate answers for a held-out set and score exact match.

Works for any checkpoint a family adapter knows (teacher or student): the last assistant turn
of each sample is the reference; everything before it is the prompt.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from genrecal_cache.data import decode_image, read_samples
from genrecal_cache.families import EncodeError, adapter_for

__all__ = ["EvalReport", "evaluate", "normalize"]


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
    per_type: dict[str, dict[str, int]] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        types = {t: {**v, "accuracy": v["correct"] / v["n"] if v["n"] else 0.0} for t, v in self.per_type.items()}
        return {"model": self.model, "data": self.data, "n": self.n, "correct": self.correct,
                "accuracy": self.accuracy, "skipped": self.skipped, "per_type": types,
                "predictions": self.predictions}


@torch.inference_mode()
def evaluate(model_path: str, data: str, *, limit: int | None = None, max_new_tokens: int = 8,
             device: str = "cpu", progress: bool = True, model=None) -> EvalReport:
    """Exact-match accuracy of greedy answers; `model` may be passed in to skip loading it."""
    from transformers import AutoConfig

    adapter = adapter_for(AutoConfig.from_pretrained(model_path))
    processor = adapter.load_processor(model_path)
    if model is None:
        model = adapter.load_model(model_path, dtype=torch.float32, device=device)
    model.eval()
    dev = next(model.parameters()).device
    tok = processor.tokenizer
    report = EvalReport(model=str(model_path), data=str(data))
    per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "correct": 0})
    for s in tqdm(read_samples(data, limit=limit), desc="eval", disable=not progress, dynamic_ncols=True):
        if s.error:
            report.skipped += 1
            continue
        try:
            inputs, reference = adapter.prompt_inputs(processor, s, [decode_image(b) for b in s.images])
        except (EncodeError, ValueError):
            report.skipped += 1
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
    return report
