"""GenRecal as one module: student + Recalibrator + frozen teacher head; `forward(batch, stage)` -> losses.

Which features go where (per sample; spans are answer-content token ranges, one per turn):
    teacher: answer token p is predicted by the state at p-1, so z_al = T[a-1 : b-1] for every span
             [a, b) (targets gt_l = ids[a:b]); z_ql = every other teacher state before the last one used.
    student: z_qs = the student's states outside its answer spans, before the end of its last span.
    main pass  r_al  = Rec([z_qs, answer rows]),  regularization pass r_al' = Rec([Proj-pre(z_ql), Proj-pre(z_al)])
The main pass's answer rows (`TrainConfig.main_pass_answer`):
    "student_aligned" (default): for each teacher answer token, the *student's* state that predicts the
        same text: the state after the student's last answer token ending at or before where the teacher
        token starts (character offsets, `student_answer_rows`), in student space (no Proj-pre). Every
        answer token's loss then reaches the student through its own answer states.
    "teacher" (the paper's formulation): Proj-pre(z_al), except the row predicting each span's first token,
        which is the student's last question state (`answer_start_rows`): T[a-1] already predicts the answer.
        Every later row T[p] already predicts token p+1, so the Recalibrator can read the rest of the
        answer off the teacher; the student's answer states get no gradient from L_ar/L_kl at all
        (docs/method.md, "How our default differs from the paper").
Multi-turn samples put all question tokens before all answer tokens (the paper has one turn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from genrecal_cache.families import FamilyAdapter
from genrecal_cache.head import TeacherHead
from genrecal_cache.manifest import sha256_text
from genrecal_train.config import TrainConfig
from genrecal_train.data import Batch, Example
from genrecal_train.losses import answer_losses, chunked_ce
from genrecal_train.recalibrator import Recalibrator
from genrecal_train.uld import uld_loss


def check_cache_matches(cache, head: TeacherHead, cfg: TrainConfig) -> None:
    """Refuse, before any step, a cache whose head or teacher does not match what we are told."""
    m = cache.manifest
    where = f"cache {cfg.cache}"
    if (head.hidden_size, head.vocab_size) != (m.hidden_size, m.vocab_size):
        raise ValueError(f"{where}: teacher_head.safetensors is [{head.vocab_size} x {head.hidden_size}] but the "
                         f"manifest says vocab {m.vocab_size}, hidden {m.hidden_size}: the head belongs to another "
                         "teacher; re-extract or restore the right teacher_head.safetensors")
    check_head_reproduces_topk(cache, head, where)
    if not cfg.expect_teacher:
        return
    if not Path(cfg.expect_teacher).is_dir():
        if cfg.expect_teacher != m.teacher.get("id"):
            raise ValueError(f"{where} was extracted from teacher {m.teacher.get('id')!r}, not {cfg.expect_teacher!r}")
        return
    from transformers import AutoConfig

    from genrecal_cache.families import adapter_for

    tcfg = AutoConfig.from_pretrained(cfg.expect_teacher)
    t_adapter = adapter_for(tcfg)
    tok = t_adapter.load_processor(cfg.expect_teacher).tokenizer
    if sha256_text(tok.backend_tokenizer.to_str()) != m.tokenizer_sha256:
        raise ValueError(f"{where}: its teacher tokenizer differs from {cfg.expect_teacher}'s (sha256 mismatch): "
                         "the token ids in the cache would mean other words; use the cache made with this teacher")
    text = tcfg.get_text_config()
    if (text.hidden_size, text.vocab_size) != (head.hidden_size, head.vocab_size):
        raise ValueError(f"{where}: teacher head is [{head.vocab_size} x {head.hidden_size}] but "
                         f"{cfg.expect_teacher} has vocab {text.vocab_size}, hidden {text.hidden_size}")
    # Same tokenizer and shapes can still be another checkpoint (another seed, size or fine-tune):
    # compare a few rows of its lm_head with the cached head (read by slice, not the whole matrix).
    names = t_adapter.head_tensor_names["embed_tokens.weight" if t_adapter.tied_head(tcfg) else "lm_head.weight"]
    rows = _checkpoint_lm_head_rows(Path(cfg.expect_teacher), head.vocab_size, names)
    if rows is not None:
        idx, got = rows
        ref = head.lm_head_weight[idx].detach().float().cpu()
        rel = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
        if rel > 2e-2:  # bf16 rounding is ~4e-3; another checkpoint is ~1
            raise ValueError(f"{where}: its teacher head is not {cfg.expect_teacher}'s lm_head (relative difference "
                             f"{rel:.3g} on {len(idx)} rows): the cache was extracted from another checkpoint of "
                             "this architecture; use the cache made with this teacher")


def check_head_reproduces_topk(cache, head: TeacherHead, where: str, max_tokens: int = 16) -> None:
    """The head must give back the top-k stored with the first usable sample (cheap: a few tokens).

    Catches a teacher_head.safetensors of the right shape from another teacher (or a corrupted one)."""
    first = next((i for group in cache.plan() for i in group), None)
    if first is None:
        return
    s = cache[first]
    n = min(max_tokens, s.hidden.shape[0])
    if n == 0:
        return
    k = s.topk_ids.shape[1]
    dev = head.lm_head_weight.device
    ids, _ = head.topk_logprobs(torch.from_numpy(s.hidden[:n]).to(dev), k)
    cached = torch.from_numpy(s.topk_ids[:n].astype("int64"))
    ids = ids.long().cpu()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, cached)) / (n * k)
    if overlap < 0.5:  # the right head agrees up to near-ties (~1.0); another head agrees by chance (~k/V)
        raise ValueError(f"{where}: teacher_head.safetensors does not reproduce the cached top-{k} of sample "
                         f"{s.id!r} (overlap {overlap:.2f}): the head belongs to another teacher or is corrupt; "
                         "run `genrecal-cache verify`, re-download or re-extract the cache")


def _checkpoint_lm_head_rows(folder: Path, vocab: int, names: tuple[str, ...]) -> tuple[Tensor, Tensor] | None:
    """(row indices, float32 rows) of the lm_head in a safetensors checkpoint folder, under the first of the
    family's tensor `names` present (genrecal_cache/families); None if not found."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        weight_map = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                weight_map.update({k: f.name for k in fh.keys()})
    name = next((n for n in names if n in weight_map), None)
    if name is None:
        return None
    n = min(32, vocab)
    with safe_open(str(folder / weight_map[name]), framework="pt") as fh:
        sl = fh.get_slice(name)
        if sl.get_shape()[0] != vocab:
            return None  # shapes were compared above; a differently laid-out checkpoint is not judged here
        mid = vocab // 2
        parts = [sl[0:n], sl[mid:min(vocab, mid + n)]]
    idx = torch.cat([torch.arange(0, n), torch.arange(mid, min(vocab, mid + n))])
    return idx, torch.cat(parts).float()


def _gather(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad a ragged list of [L_i, d] into [B, L, d] plus its bool validity mask."""
    x = pad_sequence(rows, batch_first=True)
    mask = pad_sequence([torch.ones(r.shape[0], dtype=torch.bool, device=r.device) for r in rows], batch_first=True)
    return x, mask


def teacher_parts(e: Example) -> tuple[Tensor, Tensor, Tensor]:
    """(question-state index, answer-state index, answer target ids) in the teacher's tokens."""
    ans = torch.cat([torch.arange(a - 1, b - 1) for a, b in e.teacher_spans])
    keep = torch.ones(int(ans.max()) + 1, dtype=torch.bool)
    keep[ans] = False
    targets = torch.cat([e.teacher_ids[a:b] for a, b in e.teacher_spans])
    return keep.nonzero().squeeze(1), ans, targets


def answer_start_rows(e: Example) -> tuple[Tensor, Tensor]:
    """(index in z_al's layout of the row predicting each span's first answer token, index of the
    student state before that answer).

    In the main pass the question is the student's, so its first answer token is predicted from the
    student's last question state (in student space: Proj-pre is not applied), not from the teacher
    state T[a-1]: that state already predicts the answer, and reading it off lets the Recalibrator
    ignore the student (docs/benchmarks.md, quality, "How we got here", item 1)."""
    lengths = torch.tensor([b - a for a, b in e.teacher_spans])
    rows = torch.cumsum(lengths, 0) - lengths
    return rows, torch.tensor([a - 1 for a, _ in e.student_spans])


def answer_char_ends(tokenizer: Any, ids: Tensor) -> list[int]:
    """Where each token of one answer span ends, in characters of the decoded span (leading space dropped).

    Decodes growing prefixes of the real token ids: exact for any tokenizer, including byte-level BPE
    pieces of one character and tokenizers that glue a space onto the next word."""
    ids = ids.tolist()
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    lead = len(text) - len(text.lstrip())
    return [max(0, len(tokenizer.decode(ids[:k + 1], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)) - lead) for k in range(len(ids))]


def student_answer_rows(e: Example, student_tokenizer: Any, teacher_tokenizer: Any) -> Tensor:
    """Index of the student state that predicts each teacher answer token, in z_al's layout.

    Teacher token j of a span starts at character c_j of the answer; the student state that predicts the
    text from c_j on is the one after the student's last answer token ending at or before c_j (its last
    question state when there is none). A teacher token inside a longer student token thus shares the
    state before that student token: the Recalibrator tells them apart by position."""
    rows = []
    for (ta, tb), (sa, sb) in zip(e.teacher_spans, e.student_spans):
        t_ends = answer_char_ends(teacher_tokenizer, e.teacher_ids[ta:tb])
        s_ends = torch.tensor(answer_char_ends(student_tokenizer, e.student.input_ids[sa:sb]))
        rows += [sa - 1 + int((s_ends <= c).sum()) for c in [0] + t_ends[:-1]]
    return torch.tensor(rows, dtype=torch.long)


def load_teacher_tokenizer(cfg: TrainConfig) -> Any:
    """The teacher's tokenizer (for `student_answer_rows`): `cfg.teacher_tokenizer`, else `expect_teacher`,
    else the teacher the cache was extracted from; it must be the one the cache was made with."""
    from transformers import AutoTokenizer

    from genrecal_cache.reader import TeacherCache

    with TeacherCache.open(cfg.cache, local_cache=cfg.local_cache) as cache:
        m = cache.manifest
    src = cfg.teacher_tokenizer or cfg.expect_teacher or m.teacher.get("id")
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"main_pass_answer='student_aligned' aligns answers by their text and needs the teacher's "
                         f"tokenizer, which could not be loaded from {src!r} ({e}); pass --teacher-tokenizer "
                         "(a folder or hub id with the teacher's tokenizer), or --main-pass-answer teacher") from e
    if sha256_text(tok.backend_tokenizer.to_str()) != m.tokenizer_sha256:
        raise ValueError(f"cache {cfg.cache}: the tokenizer at {src!r} is not the one its teacher used (sha256 "
                         "mismatch), so answer tokens would be aligned wrongly; pass --teacher-tokenizer with the "
                         "teacher's own tokenizer")
    return tok


def student_question_index(e: Example) -> Tensor:
    end = e.student_spans[-1][1]
    keep = torch.ones(end, dtype=torch.bool)
    for a, b in e.student_spans:
        keep[a:b] = False
    return keep.nonzero().squeeze(1)


class GenRecal(nn.Module):
    def __init__(self, student: nn.Module, adapter: FamilyAdapter, head: TeacherHead, cfg: TrainConfig,
                 tokenizers: tuple[Any, Any] | None = None):
        """`tokenizers`: (student's, teacher's), used by main_pass_answer='student_aligned'; loaded from
        cfg.student and the cache's teacher (`load_teacher_tokenizer`) when not given."""
        super().__init__()
        self.student, self.adapter, self.head, self.cfg = student, adapter, head.requires_grad_(False), cfg
        if cfg.main_pass_answer not in ("teacher", "student_aligned"):
            raise ValueError(f"main_pass_answer={cfg.main_pass_answer!r}: use 'student_aligned' or 'teacher'")
        self.tokenizers = tokenizers
        if cfg.main_pass_answer == "student_aligned" and tokenizers is None:
            self.tokenizers = (adapter.load_processor(cfg.student).tokenizer, load_teacher_tokenizer(cfg))
        self.recalibrator = Recalibrator.from_student(
            student, d_teacher=head.hidden_size, num_layers=cfg.recal_layers,
            decoder_layer_cls=adapter.decoder_layer_class(student), text_config=adapter.text_config(student),
            rotary_factory=adapter.rotary_factory(student))
        if cfg.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        self.stage = 1

    def set_stage(self, stage: int) -> list[nn.Parameter]:
        """Freeze/unfreeze for a stage and return the trainable parameters (in a fixed order)."""
        self.stage = stage
        self.requires_grad_(False)
        if stage in (1, 2) and not (stage == 2 and self.cfg.freeze_recalibrator_in_stage2):
            self.recalibrator.requires_grad_(True)
        if stage in (2, 3):
            vision = () if self.cfg.train_vision else tuple(self.adapter.vision_parameter_prefixes(self.student))
            for name, p in self.student.named_parameters():
                p.requires_grad_(not name.startswith(vision))
        return [p for p in self.parameters() if p.requires_grad]

    def student_states(self, inputs: dict[str, Tensor]) -> Tensor:
        """Post-norm last hidden states of the student body [B, Ls, ds] (no graph in stage 1)."""
        inputs = dict(inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.student.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage != 1):
            return self.student.model(**inputs, use_cache=False).last_hidden_state

    def forward(self, batch: Batch, stage: int | None = None) -> dict[str, Tensor]:
        stage = self.stage if stage is None else stage
        dev = self.head.lm_head_weight.device
        hs = self.student_states({k: v.to(dev) for k, v in batch.student_inputs.items()})
        losses: dict[str, Tensor] = {}
        total = hs.new_zeros(())
        if stage in (2, 3):
            labels = batch.student_labels.to(dev)
            lm = self.adapter.lm_head(self.student)
            losses["l_s"] = chunked_ce(hs[:, :-1], lm.weight, labels[:, 1:], chunk=self.cfg.loss_chunk,
                                       lm_head_bias=lm.bias)
            total = total + self.cfg.w_student * losses["l_s"]
        if stage == 3 and self.cfg.w_uld:
            losses["l_uld"] = uld_loss(hs, lm, self.head, batch.examples, self.cfg.temperature)
            total = total + self.cfg.w_uld * losses["l_uld"]
        if stage in (1, 2):
            z_qs, z_al, z_ql, targets, s_al, s_rows = [], [], [], [], [], []
            for i, e in enumerate(batch.examples):
                q_idx, a_idx, tgt = teacher_parts(e)
                th = e.teacher_hidden.to(dev)
                z_qs.append(hs[i, student_question_index(e).to(dev)])
                z_al.append(th[a_idx.to(dev)])
                z_ql.append(th[q_idx.to(dev)])
                targets.append(tgt.to(dev))
                s, sm = self._student_answer_rows(e, hs[i], len(tgt))
                s_al.append(s)
                s_rows.append(sm)
            za, a_mask = _gather(z_al)
            zq, q_mask = _gather(z_qs)
            sa, _ = _gather(s_al)
            sm, _ = _gather(s_rows)
            zl, l_mask = _gather(z_ql) if self.cfg.use_reg_pass else (None, None)
            r_main, r_reg = self.recalibrator(za, a_mask, z_qs=zq, qs_mask=q_mask, z_ql=zl, ql_mask=l_mask,
                                              s_al=sa, s_mask=sm)
            tgt = torch.cat(targets)
            z_t = za[a_mask]
            T, chunk = self.cfg.temperature, self.cfg.loss_chunk
            losses["l_ar"], losses["l_kl"] = answer_losses(self.head, r_main[a_mask], z_t, tgt, T, chunk)
            total = total + self.cfg.w_ar * losses["l_ar"] + self.cfg.w_kl * losses["l_kl"]
            if r_reg is not None:
                losses["reg_ar"], losses["reg_kl"] = answer_losses(self.head, r_reg[a_mask], z_t, tgt, T, chunk)
                total = total + self.cfg.w_ar * losses["reg_ar"] + self.cfg.w_kl * losses["reg_kl"]
        losses["loss"] = total
        return losses

    def _student_answer_rows(self, e: Example, hs: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """(student-space rows [n, d_s], bool [n] where they replace Proj-pre(z_al)) of one sample's main pass."""
        dev = hs.device
        if self.cfg.main_pass_answer == "student_aligned":
            return hs[student_answer_rows(e, *self.tokenizers).to(dev)], torch.ones(n, dtype=torch.bool, device=dev)
        rows, before = answer_start_rows(e)
        s = hs.new_zeros(n, hs.shape[-1]).index_copy(0, rows.to(dev), hs[before.to(dev)])
        return s, torch.zeros(n, dtype=torch.bool, device=dev).index_fill(0, rows.to(dev), True)
