"""`genrecal-cache audit`: a faithful cache passes; a cache from a teacher with one changed weight, one
whose head was swapped and one with a corrupted answer mask fail, naming what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.cache_cli import app as cache_app
from genrecal_cache.audit import audit
from genrecal_cache.format.manifest import sha256_bytes


def _rehash(root: Path) -> None:
    """Checksums and sizes recomputed, as a cache written that way would carry them (verify passes it by)."""
    m = json.loads((root / "manifest.json").read_text())
    for rel in m["checksums"]:
        data = (root / rel).read_bytes()
        m["checksums"][rel], m["extra"]["sizes"][rel] = sha256_bytes(data), len(data)
    (root / "manifest.json").write_text(json.dumps(m))


def _edit_safetensors(path: Path, edit) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _run(cache: Path, teacher: Path, *flags: str) -> tuple[int, str]:
    result = CliRunner().invoke(cache_app, ["audit", str(cache), "--teacher", str(teacher), "--samples", "4", *flags])
    return result.exit_code, result.output


def test_audit_passes_on_a_faithful_cache(train_cache, teacher_dir):
    code, out = _run(train_cache, teacher_dir)
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[-1] == "PASS" and any("audit of " in line and ": 4 samples" in line for line in lines)
    for name in ("token ids", "answer mask", "head", "hidden states", "top-1 of head(hidden)", "stored top-k"):
        assert any(line.startswith(f"ok   {name}: ") for line in lines), (name, out)
    report = audit(train_cache, str(teacher_dir), samples=3, seed=1)
    assert report.passed and len(report.samples) == 3


def test_audit_fails_on_a_teacher_with_one_changed_weight(train_cache, teacher_dir, tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(teacher_dir, other)

    def nudge(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.mlp.down_proj.weight"][5, 7] += 2.0  # one weight of the last block
    _edit_safetensors(other / "model.safetensors", nudge)
    code, out = _run(train_cache, other)
    assert code == 1 and out.strip().splitlines()[-1].startswith("FAIL (hidden states"), out
    assert "FAIL hidden states: max |err|" in out and "ok   head:" in out and "ok   token ids" in out


def test_audit_fails_on_a_cache_whose_head_was_swapped(train_cache, teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)

    def swap(t: dict[str, torch.Tensor]) -> None:  # another head of the same shape: its rows rolled by one
        t["lm_head.weight"] = torch.roll(t["lm_head.weight"], 1, dims=0).contiguous()
    _edit_safetensors(cache / "teacher_head.safetensors", swap)
    _rehash(cache)
    code, out = _run(cache, teacher_dir)
    assert code == 1 and "FAIL head: lm_head max |diff|" in out, out
    assert "FAIL top-1 of head(hidden)" in out and "ok   hidden states" in out
    assert out.strip().splitlines()[-1] == "FAIL (head, top-1 of head(hidden))"


def test_audit_fails_on_a_cache_with_a_corrupted_answer_mask(train_cache, teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)
    mask = zarr.open_array(str(cache / "features.zarr" / "answer_mask"), mode="r+")
    mask[:] = ~mask[:]
    _rehash(cache)
    code, out = _run(cache, teacher_dir)
    assert code == 1 and out.strip().splitlines()[-1] == "FAIL (answer mask)", out
    assert "FAIL answer mask: differ in 4 of 4 samples, e.g." in out and "first at token 0" in out


def test_audit_of_a_teacher_that_is_not_there_is_one_line(train_cache, tmp_path):
    code, out = _run(train_cache, tmp_path / "absent")
    assert code == 2 and f"--teacher {tmp_path / 'absent'}: no such folder" in " ".join(out.split()), out
    assert "Traceback" not in out
