"""Pictures: the trainer's curves.png, `genrecal-eval --compare`'s table and PNG, and both without
matplotlib (skipped with one line saying how to get them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.eval_cli import app as eval_app
from genrecal_train import plots
from genrecal_train.config import TrainConfig
from genrecal_train.evaluate import evaluate
from genrecal_train.trainer import train


def _panels_width(n: int) -> int:
    """Pixel width of curves.png with n stage panels (plot_curves: 4.2 in per panel + 1 in, 110 dpi)."""
    return round((4.2 * n + 1.0) * 110)


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch):
    """Imports of matplotlib fail, as where it is not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(plots, "_warned", False)


def test_trainer_writes_curves_png_with_one_panel_per_stage(tmp_path: Path, train_cache: Path, student_dir: Path):
    run = tmp_path / "run"
    train(TrainConfig(cache=str(train_cache), student=str(student_dir), out=str(run), device="cpu", prefetch=2,
                      batch_size=4, stages=[1, 2, 3], stage_steps=[3, 3, 3], checkpoint_every=1000))
    png = run / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width == _panels_width(3)
        # drawn, not blank: many colours (lines, text, legend)
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50
    # a run of stage 3 only: one panel
    train(TrainConfig(cache=str(train_cache), student=str(student_dir), out=str(tmp_path / "sft"), device="cpu",
                      prefetch=2, batch_size=4, stages=[3], stage_steps=[3], checkpoint_every=1000))
    with Image.open(tmp_path / "sft" / "curves.png") as im:
        assert im.width == _panels_width(1)


def _metrics(path: Path) -> Path:
    recs = [{"stage": st, "step": i + 1, "lr": 1e-3, "l_ar": 3.0 / (i + 1), "l_kl": 0.5, "l_s": 2.0 / (i + 1),
             "loss": 9.0, "tokens_per_s": 100.0} for st in (1, 2) for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"stage": 2, "ste')  # last line cut by a crash
    return path


def test_curves_skipped_with_one_line_without_matplotlib(tmp_path: Path, no_matplotlib, capsys):
    metrics = _metrics(tmp_path / "metrics.jsonl")
    assert plots.plot_curves(metrics) is None
    assert plots.plot_accuracy({"a": {"accuracy": 0.5, "n": 2, "per_type": {}}}, tmp_path / "acc.png") is None
    assert capsys.readouterr().err == plots.NO_MATPLOTLIB + "\n"  # said once
    assert "pip install matplotlib" in plots.NO_MATPLOTLIB
    assert not list(tmp_path.glob("*.png"))


def test_curves_from_metrics_skip_a_torn_last_line(tmp_path: Path):
    png = plots.plot_curves(_metrics(tmp_path / "metrics.jsonl"))
    assert png == tmp_path / "curves.png"
    with Image.open(png) as im:
        assert im.width == _panels_width(2)


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, student_dir: Path, demo_jsonl: Path):
    """Real eval reports of the tiny teacher and student on the demo set (every question type)."""
    root = tmp_path_factory.mktemp("reports")
    paths = []
    for name, model in (("teacher", teacher_dir), ("student", student_dir)):
        p = root / f"{name}.json"
        p.write_text(json.dumps(evaluate(str(model), str(demo_jsonl), limit=12, progress=False).to_dict()))
        paths.append(p)
    return paths


def test_compare_prints_a_table_and_writes_a_png(tmp_path: Path, two_reports: list[Path]):
    png = tmp_path / "cmp.png"
    r = CliRunner().invoke(eval_app, ["--compare", *map(str, two_reports), "--out", str(png)])
    assert r.exit_code == 0, r.output
    reports = [json.loads(p.read_text()) for p in two_reports]
    qtypes = sorted(reports[0]["per_type"])
    assert len(qtypes) > 1
    lines = r.output.splitlines()
    assert lines[0] == "| run | all (n=12) | " + " | ".join(f"{q} ({reports[0]['per_type'][q]['n']})" for q in qtypes) + " |"
    for name, rep in zip(("teacher", "student"), reports):
        row = [f"{100 * rep['accuracy']:.1f}", *[f"{100 * rep['per_type'][q]['accuracy']:.1f}" for q in qtypes]]
        assert f"| {name} | " + " | ".join(row) + " |" in lines
    assert f"plot: {png}" in lines
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 500


def test_compare_without_matplotlib_still_prints_the_table(tmp_path: Path, two_reports: list[Path], no_matplotlib):
    r = CliRunner().invoke(eval_app, ["--compare", *map(str, two_reports), "--out", str(tmp_path / "cmp.png")])
    assert r.exit_code == 0, r.output
    assert "| teacher |" in r.output and plots.NO_MATPLOTLIB in r.output and "plot:" not in r.output
    assert not (tmp_path / "cmp.png").exists()


def test_compare_run_folders(tmp_path: Path, two_reports: list[Path], student_dir: Path, demo_jsonl: Path):
    """A run folder is read through its eval.json; without one, --data evaluates its final/ into it."""
    import shutil

    done, fresh = tmp_path / "runs" / "done", tmp_path / "runs" / "fresh"
    done.mkdir(parents=True)
    shutil.copy(two_reports[0], done / "eval.json")
    shutil.copytree(student_dir, fresh / "final")
    r = CliRunner().invoke(eval_app, ["--compare", str(done), str(fresh)])
    assert r.exit_code != 0 and "fresh: no eval.json" in r.output and "--data" in r.output
    r = CliRunner().invoke(eval_app, ["--compare", str(done), str(fresh), "--data", str(demo_jsonl)])
    assert r.exit_code == 0, r.output
    assert json.loads((fresh / "eval.json").read_text())["n"] == 24
    assert "| done |" in r.output and "| fresh |" in r.output
    assert (tmp_path / "runs" / "accuracy_by_type.png").is_file()  # default: in the first run's parent folder


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path: Path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    r = CliRunner().invoke(eval_app, ["--compare", str(bad)])
    assert r.exit_code != 0 and "x.json: not a genrecal-eval report" in r.output


def test_eval_ends_in_one_line_without_a_model_or_samples_and_says_why_it_skipped(tmp_path: Path, student_dir: Path,
                                                                                   demo_jsonl: Path):
    """A model or data set that is not there, or data with no usable sample: one line, status 2, no traceback.
    Skipped samples are counted and the first reason is printed (every reason, up to 20, in the --out report)."""
    def run(*args: str):
        r = CliRunner().invoke(eval_app, list(args))
        return r.exit_code, " ".join((r.output + getattr(r, "stderr", "")).split())

    absent, run_folder = tmp_path / "absent", tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "config.json").write_text(json.dumps({"stages": [1, 2, 3]}))  # a training run's own config.json
    for args, says in [(["--model", str(absent), "--data", str(demo_jsonl)], f"--model {absent}: no such folder"),
                       (["--model", str(tmp_path), "--data", str(demo_jsonl)], "no config.json in this folder"),
                       (["--model", str(run_folder), "--data", str(demo_jsonl)], "a training run's model is in its final/"),
                       (["--model", str(student_dir), "--data", f"{absent}.jsonl"], f"--data {absent}.jsonl: ")]:
        code, out = run(*args)
        assert code == 2 and says in out and "Traceback" not in out, out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1"}\nnot json\n')
    code, out = run("--model", str(student_dir), "--data", str(bad))
    assert code == 2 and f"--data {bad}: no sample to evaluate: 2 skipped, the first: sample 'q1'" in out, out
    mixed = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in demo_jsonl.read_text().splitlines()[:3]]
    rows = [{**r, "image": str(demo_jsonl.parent / r["image"])} for r in rows]  # images beside the demo set
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    code, out = run("--model", str(student_dir), "--data", str(mixed))
    assert code == 2 and "points outside the image root" in out and "--image-root" in out, out  # as the fix says:
    code, out = run("--model", str(student_dir), "--data", str(mixed), "--out", str(tmp_path / "r.json"),
                    "--image-root", str(demo_jsonl.parent))
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["n"] == 3 and report["skipped"] == 1, out
    assert "skipped 1)" in out and "skipped, the first: sample 'line-4'" in out and "malformed JSON" in out
    assert len(report["skip_reasons"]) == 1 and "line-4" in report["skip_reasons"][0]
