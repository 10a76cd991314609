"""Pieces of the quality benchmark (bench/quality.py) that are cheap to check: the ULD loss, what the
main pass reads from the student and the teacher (both `main_pass_answer` modes), and the report
built from (real) per-run results."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from genrecal_cache.families import adapter_for
from genrecal_cache import open_cache
from genrecal_train.config import TrainConfig
from genrecal_train.align import student_answer_rows
from genrecal_train.batches import collate, make_example
from genrecal_train.model import GenRecal
from genrecal_train.uld import sorted_wasserstein

REPO = Path(__file__).resolve().parents[1]


def test_sorted_wasserstein_is_vocab_order_free():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 7), -1)
    perm = p[:, torch.randperm(7)]
    assert torch.allclose(sorted_wasserstein(p, perm), torch.zeros(3), atol=1e-6)
    # another vocabulary size: the smaller side is zero-padded
    q = torch.cat([perm, torch.zeros(3, 5)], -1)
    assert torch.allclose(sorted_wasserstein(p, q), torch.zeros(3), atol=1e-6)
    one_hot, uniform = torch.eye(4)[:1], torch.full((1, 4), 0.25)
    assert torch.allclose(sorted_wasserstein(one_hot, uniform), torch.tensor([1.5]))


def _setup(student_dir: Path, cache_dir: Path, cls, **kw):
    kw.setdefault("main_pass_answer", "teacher")
    cfg = TrainConfig(cache=str(cache_dir), student=str(student_dir), out="unused", **kw)
    adapter = adapter_for(student_dir)
    processor = adapter.load_processor(student_dir)
    cache = open_cache(cache_dir)
    torch.manual_seed(0)
    model = cls(adapter.load_model(student_dir), adapter, cache.head(), cfg).eval()
    examples = [make_example(cache[i], adapter, processor, 2048, cache.teacher_tokenizer()) for i in range(4)]
    return model, examples, processor.tokenizer.pad_token_id


@pytest.mark.parametrize("mode", ["teacher", "student_aligned"])
@torch.no_grad()
def test_main_pass_predicts_the_first_answer_token_from_the_student(student_dir, train_cache, mode):
    """The teacher state before an answer already predicts it: the main pass must not read it (the
    Recalibrator would ignore the student), the regularization pass must (it is teacher-only)."""
    model, examples, pad = _setup(student_dir, train_cache, GenRecal, main_pass_answer=mode)
    base = model(collate(examples, pad, 0), 1)
    for e in examples:  # scramble the teacher state before each answer span
        for a, _ in e.teacher_spans:
            e.teacher_hidden[a - 1] = torch.randn_like(e.teacher_hidden[a - 1]) * 10
    changed = model(collate(examples, pad, 0), 1)
    # l_kl's target (the teacher's own distribution) is read from that state, so compare l_ar only
    assert torch.allclose(base["l_ar"], changed["l_ar"], atol=1e-6)
    assert not torch.allclose(base["reg_ar"], changed["reg_ar"], atol=1e-3)
    # ... and the student's state before its answer does reach the main pass's first-token row
    model.student.get_input_embeddings().weight.mul_(3.0)
    assert not torch.allclose(model(collate(examples, pad, 0), 1)["l_ar"], base["l_ar"], atol=1e-3)


@pytest.fixture(scope="module")
def phrase_cache(tmp_path_factory, teacher_dir: Path) -> Path:
    """A cache of the tiny teacher over 6 demo questions whose answers are phrases with the informative
    word last ("I think it is a triangle"), so the teacher and student split them into many tokens."""
    from genrecal_cache.demo_data import write_demo_dataset
    from genrecal_cache.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("phrase_cache")
    data = write_demo_dataset(root / "data", n=6, seed=3)
    lines = []
    for line in data.read_text().splitlines():
        rec = json.loads(line)
        for turn in rec["conversations"]:
            if turn["from"] == "gpt":
                turn["value"] = f"I think it is a {turn['value']}"
        lines.append(json.dumps(rec))
    data.write_text("\n".join(lines) + "\n")
    extract(ExtractConfig(teacher=str(teacher_dir), data=str(data), out=str(root / "cache"), backend="transformers",
                          hidden_codec="float32", progress=False))
    return root / "cache"


def test_student_rows_are_aligned_to_the_teacher_tokens_by_text(student_dir, teacher_dir, phrase_cache):
    """The student state chosen for teacher answer token j has read exactly the longest run of student
    answer tokens whose text is a prefix of the answer before token j."""
    from transformers import AutoTokenizer

    model, examples, _ = _setup(student_dir, phrase_cache, GenRecal, main_pass_answer="student_aligned")
    s_tok = adapter_for(student_dir).load_processor(student_dir).tokenizer
    t_tok = open_cache(phrase_cache).teacher_tokenizer()
    assert t_tok.backend_tokenizer.to_str() == AutoTokenizer.from_pretrained(teacher_dir).backend_tokenizer.to_str()
    dec = lambda tok, ids: tok.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    several = 0
    for e in examples:
        (ta, tb), (sa, sb) = e.teacher_spans[0], e.student_spans[0]
        rows = student_answer_rows(e.student.input_ids, e.student_spans, e.teacher_ids, e.teacher_spans, s_tok,
                                   t_tok).tolist()
        assert rows == e.rows.student_aligned.states.tolist()  # what make_example computed on the data thread
        assert len(rows) == tb - ta and rows == sorted(rows) and rows[0] == sa - 1 and rows[-1] < sb - 1
        s_ids, t_ids = e.student.input_ids[sa:sb].tolist(), e.teacher_ids[ta:tb].tolist()
        for j, row in enumerate(rows):
            before = dec(t_tok, t_ids[:j]).lstrip()
            read = dec(s_tok, s_ids[:row - sa + 1]).lstrip()  # student answer tokens up to the chosen state
            assert before.startswith(read)
            assert not before.startswith(dec(s_tok, s_ids[:row - sa + 2]).lstrip())  # the longest such
        several += len(set(rows)) > 2
    assert several == len(examples)  # every phrase spans several student states


@pytest.mark.parametrize("mode", ["teacher", "student_aligned"])
def test_student_gets_a_distillation_gradient_after_the_first_answer_token(student_dir, phrase_cache, mode):
    """Stage 2 with w_student=0 (only L_ar/L_kl of the main pass and the teacher-only regularization pass):
    with 'student_aligned' every answer token's loss reaches the student's own answer states; with the
    paper's 'teacher' rows only the state before the answer is read, so later answer tokens teach the
    student nothing (they are read off the teacher's states)."""
    model, examples, pad = _setup(student_dir, phrase_cache, GenRecal, main_pass_answer=mode, w_student=0.0)
    model.train()
    model.set_stage(2)
    batch = collate(examples, pad, 0)
    losses, h = _bench_module("quality_signal").forward_with_student_states(model, batch, 2)
    parts = {k: float(v.detach()) for k, v in losses.items()}
    assert parts["l_ar"] > 0  # the loss is the distillation terms alone:
    assert parts["loss"] == pytest.approx(parts["l_ar"] + parts["l_kl"] + parts["reg_ar"] + parts["reg_kl"], abs=1e-5)
    losses["loss"].backward()
    grad = h.grad.norm(dim=-1)
    for i, e in enumerate(examples):
        (sa, sb), = e.student_spans
        first, later = float(grad[i, sa - 1]), grad[i, sa:sb - 1]
        assert first > 0
        if mode == "student_aligned":
            assert (later > 0).sum() >= 2, later
        else:
            assert float(later.abs().sum()) == 0.0


@torch.no_grad()
def test_uld_stage3_adds_its_term(student_dir, train_cache):
    model, examples, pad = _setup(student_dir, train_cache, GenRecal, w_uld=0.5)
    model.set_stage(3)
    out = model(collate(examples, pad, 0), 3)
    assert set(out) == {"l_s", "l_uld", "loss"}
    assert 0 < float(out["l_uld"]) < 2 and torch.isclose(out["loss"], out["l_s"] + 0.5 * out["l_uld"])
    model.cfg.w_uld = 0.0  # off by default: plain SFT
    assert set(model(collate(examples, pad, 0), 3)) == {"l_s", "loss"}


def _bench_module(name: str):
    """bench/<name>.py, imported from its file (bench/ is not a package)."""
    key = f"{name}_bench"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        q = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = q  # dataclasses look their module up while the class is built
        spec.loader.exec_module(q)
    return sys.modules[key]


def _quality_module():
    return _bench_module("quality")


def _per_type(word: float, phrase: float) -> dict:
    return {"word/colour": {"n": 10, "correct": int(10 * word)}, "phrase/count": {"n": 10, "correct": int(10 * phrase)}}


def _fake_results(q, regimes: dict[str, dict[str, tuple]]) -> dict:
    """A results.json of bench/quality.py for the llava student: {regime: {arm: ((word, phrase) per seed)}}."""
    arms = sorted({arm for table in regimes.values() for arm in table})
    results = {"setup": {"arms": arms, "students": ["llava"], "kinds": ["word", "phrase"], "regimes": list(regimes),
                         "steps": 6, "batch_size": 2, "seeds": [0, 1]},
               "teacher": {"eval": {"accuracy": 0.9, "per_type": _per_type(0.9, 0.9)}}, "runs": []}
    for regime, table in regimes.items():
        for arm, accs in table.items():
            for seed, (w, ph) in enumerate(accs):
                per = _per_type(w, ph)
                results["runs"].append({"regime": regime, "student": "llava", "arm": arm, "seed": seed,
                                        "per_type": per, "kinds": q.per_kind({"per_type": per})})
    return results


def test_margin_tables_of_a_variant_against_the_suite(tmp_path, capsys):
    """bench/quality_margins.py: the variant's GenRecal at its best against the suite's SFT at its best (the variant
    ran no SFT), and the per-question-type table, means over seeds."""
    q = _quality_module()
    margins = _bench_module("quality_margins")
    suite = {"sft": ((0.4, 0.2), (0.6, 0.2)), "sft_frozen": ((0.5, 0.1), (0.3, 0.1)),
             "genrecal": ((0.6, 0.7), (0.8, 0.7)), "genrecal_frozen": ((0.9, 0.5), (0.9, 0.5))}
    variant = {"genrecal": ((0.7, 0.3), (0.7, 0.5)), "genrecal_frozen": ((0.2, 0.2), (0.4, 0.2))}
    for name, table in (("suite", suite), ("var", variant)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_fake_results(q, {"users": table})))
    margins.main([str(tmp_path / "suite"), str(tmp_path / "var")])
    out = capsys.readouterr().out
    assert "| suite | users | llava | 50.0 / 20.0 | 50.0 / 20.0 | 90.0 / 70.0 | +40.0 / +50.0 | +40.0 / +50.0 |" in out
    assert "| var | users | llava | 50.0 / 20.0 | - | 70.0 / 40.0 | +20.0 / +20.0 | - |" in out
    margins.main(["--per-type", str(tmp_path / "var")])
    out = capsys.readouterr().out
    assert "| out | regime | student | arm | phrase/count | word/colour |" in out
    assert "| var | users | llava | genrecal | 40 | 70 |" in out and "| var | users | llava | genrecal_frozen | 20 | 30 |" in out
    with pytest.raises(SystemExit):
        margins.main([str(tmp_path / "suite")])


def test_report_from_run_results(tmp_path):
    """summarize/plots turn per-run eval reports into one table per regime and student (task kinds as columns),
    SFT at its best over tower x warm-up per kind, GenRecal at its best over the tower, the margin between them."""
    q = _quality_module()
    arms = ["sft", "sft_warmup", "sft_frozen", "genrecal", "genrecal_frozen"]
    scratch = {"sft": ((0.4, 0.2), (0.6, 0.2)), "sft_warmup": ((0.3, 0.4), (0.3, 0.4)),
               "sft_frozen": ((0.5, 0.1), (0.3, 0.1)), "genrecal": ((0.6, 0.7), (0.8, 0.7)),
               "genrecal_frozen": ((0.9, 0.5), (0.9, 0.5))}
    users = {arm: ((0.8, 0.8), (0.8, 0.8)) if arm == "sft_frozen" else ((0.5, 0.5), (0.5, 0.5)) for arm in arms}
    results = _fake_results(q, {"scratch": scratch, "users": users})
    text, summary = q.summarize(results)
    assert "**scratch regime, llava student**" in text and "**users regime, llava student**" in text
    assert "| SFT only, no warm-up | 2 | 50.0 ± 14.1 | 20.0 ± 0.0 |" in text
    # no warm-up wins on word, warm-up on phrase; the frozen tower ties on word (40 vs 50: no) and loses on phrase
    assert "| SFT at its best (arm per kind) |  | 50.0 (sft) | 40.0 (sft_warmup) |" in text
    assert "| GenRecal at its best (tower per kind) |  | 90.0 (genrecal_frozen) | 70.0 (genrecal) |" in text
    assert "| GenRecal - SFT (both at their best) |  | +40.0 | +30.0 |" in text
    assert summary["scratch"]["llava"]["margin"]["phrase"] == pytest.approx(0.3)
    assert summary["users"]["llava"]["sft_best_arm"] == {"word": "sft_frozen", "phrase": "sft_frozen"}
    assert summary["users"]["llava"]["margin"]["word"] == pytest.approx(-0.3)
    pngs = q.plots(results, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in pngs)


def test_the_generic_mix_is_not_the_distillation_tasks(tmp_path):
    """The users' regime pre-trains on other questions than the suite's: no question of the generic mix is
    one of the distillation set's, and its digits come from the part given (never the test split's)."""
    tasks = _bench_module("quality_tasks")
    generic = tasks.write_generic_mix(tmp_path / "generic", 40, 3, (0, 1000))
    train = tasks.write_tasks(tmp_path / "train", list(tasks.KINDS), 12, 2, (1000, 1497))
    question = lambda line: json.loads(line)["conversations"][0]["value"]  # noqa: E731
    g = [json.loads(x) for x in generic.read_text().splitlines()]
    assert {r["qtype"] for r in g} == {f"generic/{f}" for f in tasks.GENERIC_FACTS}
    assert not {question(x) for x in generic.read_text().splitlines()} & {question(x) for x in train.read_text().splitlines()}
    assert all((generic.parent / r["image"]).is_file() for r in g)


def test_an_out_folder_keeps_its_data_and_model_settings(tmp_path):
    """Splits, inits and the cache in --out are reused as they are: other data/model settings are refused,
    other arm settings are not (those runs are redone)."""
    q = _quality_module()
    q.check_inputs(tmp_path, q.Setup())
    q.check_inputs(tmp_path, q.Setup(steps=10, warmup=0.0, seeds=[4], students=["llava"]))  # arm knobs: fine
    with pytest.raises(SystemExit, match=r"teacher_steps: 1200 -> 800.*fresh --out"):
        q.check_inputs(tmp_path, q.Setup(teacher_steps=800))
    with pytest.raises(SystemExit, match="n_train"):
        q.check_inputs(tmp_path, q.Setup(n_train=5))


def test_genrecal_overrides_set_any_arm_setting():
    """`--set genrecal_overrides={...}` reaches every GenRecal arm, settings with a default of their own included (the
    main pass), but not the one that makes an arm what it is, and never an SFT arm."""
    q = _quality_module()
    s = q.Setup(genrecal_overrides={"main_pass_answer": "teacher", "recal_context": "none", "use_reg_pass": True})
    for arm in ("genrecal", "genrecal_frozen", "genrecal_noreg"):
        kw = q.arm_config(arm, s)
        assert (kw["main_pass_answer"], kw["recal_context"], kw["stages"]) == ("teacher", "none", [1, 2, 3]), arm
        assert kw["use_reg_pass"] is (arm != "genrecal_noreg"), arm
        TrainConfig(cache="c", student="s", out="o", **kw)
    paper = q.arm_config("genrecal_paper", q.Setup(genrecal_overrides={"main_pass_answer": "student_aligned"}))
    assert paper["main_pass_answer"] == "teacher"
    assert q.arm_config("genrecal", q.Setup())["main_pass_answer"] == "student_aligned"
    assert "main_pass_answer" not in q.arm_config("sft_frozen", s)


def test_unlabelled_questions_take_the_teachers_answers(teacher_dir, demo_jsonl, tmp_path):
    """--set n_unlabelled: each unlabelled question's answer becomes the teacher's greedy answer (the ones it leaves
    empty dropped), the rest of the record unchanged, and the combined split finds both splits' images."""
    q = _quality_module()
    data = tmp_path / "unlabelled" / "data.jsonl"
    data.parent.mkdir()
    shutil.copytree(demo_jsonl.parent / "images", data.parent / "images")
    data.write_text(demo_jsonl.read_text())
    out = q.teacher_answers(teacher_dir, data, data.parent / "teacher_answers.jsonl", 6)
    report = json.loads(out.with_suffix(".eval.json").read_text())
    predicted = {p["id"]: p["prediction"].strip() for p in report["predictions"]}
    records = {json.loads(x)["id"]: json.loads(x) for x in data.read_text().splitlines()}
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [i for i in records if predicted[i]]
    for r in got:
        assert r["conversations"][-1]["value"] == predicted[r["id"]]
        assert r["conversations"][:-1] == records[r["id"]]["conversations"][:-1] and r["image"] == records[r["id"]]["image"]
    combined = q.combine(tmp_path / "train_and_unlabelled.jsonl", [out])  # as the suite combines it with its train split
    refs = [json.loads(x)["image"] for x in combined.read_text().splitlines()]
    assert all((tmp_path / ref).is_file() for r in refs for ref in (r if isinstance(r, list) else [r]))


def test_teacher_repro_compares_weights_exactly(teacher_dir, student_dir, tmp_path):
    """bench/quality_teacher_repro.py: 0 for a bit-identical model, the largest change otherwise, and a clear
    refusal for two different models."""
    from safetensors.torch import load_file, save_file

    repro = _bench_module("quality_teacher_repro")
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    assert repro.max_weight_diff(teacher_dir, copy) == 0.0
    (f,) = sorted(copy.glob("*.safetensors"))
    weights = load_file(f)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.25
    save_file(weights, f, metadata={"format": "pt"})
    assert repro.max_weight_diff(teacher_dir, copy) == pytest.approx(0.25, abs=1e-2)
    with pytest.raises(SystemExit, match="different tensors"):
        repro.max_weight_diff(teacher_dir, student_dir)
