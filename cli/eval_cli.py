"""`genrecal-eval`: exact-match accuracy of a teacher or student checkpoint on a held-out set, or a
comparison of several evaluated runs (`--compare`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from cli.errors import clean_errors
from cli.options import given, options_from
from genrecal_cache.options import option
from genrecal_train.config import EvalConfig

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@dataclass
class Output:
    """The eval command's own switches: what it does with the reports."""
    compare: bool = option(False, "Compare the RUNS given as arguments.", flag="--compare")
    out: Path | None = option(None, "Write the JSON report here (with --compare: the PNG).")


@app.command(help="Generate answers for a held-out JSONL/Parquet set and report exact-match accuracy "
                  "(overall and per question type); --out writes the JSON report with every prediction. "
                  "With --compare RUN... (eval JSONs or run folders): a table and a PNG (--out, default "
                  "accuracy_by_type.png in the folder of the first) of accuracy per question type.")
@options_from(Output, EvalConfig)
def run(runs: Optional[list[str]] = typer.Argument(None, help="With --compare: eval JSON files (--out of this "
                                                                "command) or run folders (their eval.json).",
                                                   show_default=False),
        **flags: Any) -> None:
    how, cfg = Output(**given(Output, flags)), EvalConfig(**given(EvalConfig, flags))
    if how.compare:
        return _compare(runs or [], cfg.data, how.out, cfg.device, cfg.image_root)
    if runs:
        raise typer.BadParameter(f"unexpected argument(s) {runs}: runs are compared with --compare")
    if cfg.model is None or cfg.data is None:
        raise typer.BadParameter("--model and --data are required (or --compare RUN...)")
    from genrecal_cache.families import ModelNotFound
    from genrecal_train.evaluate import EvalError, evaluate

    with clean_errors("eval", also=(ModelNotFound, EvalError)):  # a missing model or data set: one line
        d = evaluate(cfg.model, cfg.data, image_root=cfg.image_root, limit=cfg.limit,
                     max_new_tokens=cfg.max_new_tokens, device=cfg.device).to_dict()
    if how.out:
        how.out.parent.mkdir(parents=True, exist_ok=True)
        how.out.write_text(json.dumps(d, indent=1))
    typer.echo(f"accuracy {d['accuracy']:.3f} ({d['correct']}/{d['n']}, skipped {d['skipped']})")
    if d["skipped"]:
        typer.echo(f"  skipped, the first: {d['skip_reasons'][0]}" + (" (the first 20: the --out report)" if how.out
                                                                       else ""))
    for t, v in sorted(d["per_type"].items()):
        typer.echo(f"  {t:>10}: {v['accuracy']:.3f} ({v['correct']}/{v['n']})")


def _compare(runs: list[str], data: Optional[str], out: Optional[Path], device: str, image_root: Optional[str]) -> None:
    from genrecal_train.evaluate import compare_table, load_report, run_label
    from genrecal_train.plots import plot_accuracy

    if len(runs) < 1:
        raise typer.BadParameter("--compare needs eval JSON files or run folders as arguments")
    reports: dict[str, dict] = {}
    for path in runs:
        label = run_label(path)
        try:
            reports[label if label not in reports else path] = load_report(path, data, device, image_root)
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e))
    typer.echo(compare_table(reports))
    sets = {str(Path(r["data"]).resolve()) for r in reports.values() if r.get("data")}
    if len(sets) > 1:
        typer.echo(f"note: these runs were evaluated on different data ({', '.join(sorted(sets))})")
    png = plot_accuracy(reports, out or Path(runs[0]).parent / "accuracy_by_type.png")
    if png:
        typer.echo(f"plot: {png}")


def main() -> None:
    app()
