"""`genrecal-train`: train the Recalibrator and the student from a teacher cache (stages 1-3)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(help="Distil a student VLM from a teacher cache with GenRecal (stages 1, 2, 3). "
                  "Flags override values from --config (YAML or TOML). The teacher body is never loaded: "
                  "only its head, from the cache.")
def train(
    cache: Optional[str] = typer.Option(None, help="Cache folder or fsspec URL (https://, s3://, gs://)."),
    local_cache: Optional[str] = typer.Option(None, help="Folder keeping a verified local copy of each file of a "
                                                         "remote --cache as it is first read (later epochs/runs read "
                                                         "it from disk)."),
    student: Optional[str] = typer.Option(None, help="Student model folder or hub id."),
    out: Optional[str] = typer.Option(None, help="Run folder: checkpoints/, metrics.jsonl, final/."),
    config: Optional[Path] = typer.Option(None, help="YAML/TOML file with any of these options (flag names, - or _)."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages to run in order [default: 1,2,3]."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps per stage [default: 100]."),
    stage_steps: Optional[str] = typer.Option(None, help="Steps of each stage, comma-separated in --stages order "
                                                        "(e.g. 200,400,200); overrides --max-steps/--epochs."),
    total_steps: Optional[int] = typer.Option(None, help="Steps of all --stages together, shared out by "
                                                         "--stage-split (instead of --max-steps per stage)."),
    stage_split: Optional[str] = typer.Option(None, help="Shares of stages 1,2,3 in --total-steps [0.04,0.76,0.2]."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the cache per stage (instead of --max-steps)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per micro-batch per rank [default: 4]."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step [default: 1]."),
    lr: Optional[float] = typer.Option(None, help="Start LR of each stage; decays linearly to --lr-end [1e-4]."),
    lr_end: Optional[float] = typer.Option(None, help="End LR of each stage [1e-5]."),
    warmup: Optional[float] = typer.Option(None, help="Fraction of each stage with a linear LR warm-up from 0 [0]."),
    recal_layers: Optional[int] = typer.Option(None, help="Decoder blocks in the Recalibrator [2]."),
    freeze_recalibrator_in_stage2: Optional[bool] = typer.Option(None, "--freeze-recalibrator-in-stage2",
                                                                help="Keep the Recalibrator fixed in stage 2."),
    no_reg_pass: Optional[bool] = typer.Option(None, "--no-reg-pass", help="Drop the regularization pass (ablation)."),
    main_pass_answer: Optional[str] = typer.Option(None, help="Main-pass answer rows: student_aligned (the student's "
                                                              "answer states, aligned to the teacher's tokens by "
                                                              "text) or teacher (the paper's) [student_aligned]."),
    teacher_tokenizer: Optional[str] = typer.Option(None, help="Teacher tokenizer folder/hub id for student_aligned "
                                                               "[the teacher the cache was extracted from]."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing",
                                                         help="Recompute student activations in backward."),
    train_vision: Optional[bool] = typer.Option(None, "--train-vision",
                                               help="Also train the vision encoder (stages 2-3)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N optimizer steps [50]."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order and initialisation [0]."),
    expect_teacher: Optional[str] = typer.Option(None, help="Teacher folder/id the cache must come from "
                                                           "(tokenizer and config are compared)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda ..."),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue from the latest checkpoint in --out."),
) -> None:
    from genrecal_train.config import load_config
    from genrecal_train.trainer import train as run_train

    overrides = dict(cache=cache, local_cache=local_cache, student=student, out=out, stages=stages, max_steps=max_steps, stage_steps=stage_steps, total_steps=total_steps,
                     stage_split=stage_split, epochs=epochs,
                     batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_end=lr_end, warmup=warmup, recal_layers=recal_layers,
                     freeze_recalibrator_in_stage2=freeze_recalibrator_in_stage2,
                     use_reg_pass=None if no_reg_pass is None else not no_reg_pass,
                     main_pass_answer=main_pass_answer, teacher_tokenizer=teacher_tokenizer,
                     gradient_checkpointing=gradient_checkpointing, train_vision=train_vision, checkpoint_every=checkpoint_every, seed=seed,
                     expect_teacher=expect_teacher, device=device, resume=resume)
    try:
        cfg = load_config(str(config) if config else None, overrides)
    except ValueError as e:
        raise typer.BadParameter(str(e))
    final = run_train(cfg)
    typer.echo(f"final student: {final}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
