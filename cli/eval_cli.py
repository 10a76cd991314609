"""`genrecal-eval`: exact-match accuracy of a teacher or student checkpoint on a held-out set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(help="Generate answers for a held-out JSONL/Parquet set and report exact-match accuracy "
                  "(overall and per question type); --out writes the JSON report with every prediction.")
def run(model: str = typer.Option(..., help="Model folder (teacher or student)."),
        data: str = typer.Option(..., help="LLaVA-style JSONL or Parquet; the last answer is the reference."),
        out: Optional[Path] = typer.Option(None, help="Write the JSON report here."),
        limit: Optional[int] = typer.Option(None, help="Only the first N samples."),
        max_new_tokens: int = typer.Option(8, help="Generation length limit."),
        device: str = typer.Option("cpu", help="cpu, cuda, ...")) -> None:
    from genrecal_train.evaluate import evaluate

    d = evaluate(model, data, limit=limit, max_new_tokens=max_new_tokens, device=device).to_dict()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(d, indent=1))
    typer.echo(f"accuracy {d['accuracy']:.3f} ({d['correct']}/{d['n']}, skipped {d['skipped']})")
    for t, v in sorted(d["per_type"].items()):
        typer.echo(f"  {t:>10}: {v['accuracy']:.3f} ({v['correct']}/{v['n']})")


def main() -> None:
    app()
