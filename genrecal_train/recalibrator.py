"""The GenRecal Recalibrator: maps student features into the teacher's representation space.

    main pass:           [r_qs, r_al]  = Rec([z_qs,           proj_pre(z_al)])
    regularization pass: [r_ql, r_al'] = Rec([proj_pre(z_ql), proj_pre(z_al)])
    Rec(x) = LayerNorm(proj_post(Blocks(x)))

`Blocks` are fresh decoder layers of the *student's* own class and config. Positions are re-assigned
0..L-1 over each sample's concatenated sequence and RoPE is applied afresh (the paper's ablation:
76.4 with, 70.5 without). Only the answer part (r_al) is returned: it is what the teacher head reads.

Ragged batches: every input comes with a bool mask of its valid tokens (any padding side). Each
sample's valid prefix and answer tokens are packed contiguously from position 0, so the output does
not depend on how the inputs were padded. The output is laid out like `z_al` (r_al[b, i] belongs
to z_al[b, i]); rows where the answer mask is False are zero.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask

__all__ = ["Recalibrator", "student_block_classes"]

RotaryFactory = Callable[[PretrainedConfig], nn.Module]  # a rotary class is one: cls(config)


class Recalibrator(nn.Module):
    def __init__(self, student_text_config: PretrainedConfig, decoder_layer_cls: type[nn.Module],
                 rotary_cls_or_factory: RotaryFactory, d_teacher: int, num_layers: int = 2):
        super().__init__()
        # A private copy: the blocks must not change (or be changed by) the student's own config.
        cfg = copy.deepcopy(student_text_config)
        cfg.num_hidden_layers = num_layers
        if hasattr(cfg, "layer_types"):
            # One sample's sequence, full causal attention as in the paper; a student's sliding-window
            # layer pattern belongs to its depth, not to these fresh blocks.
            cfg.layer_types = ["full_attention"] * num_layers
        if getattr(cfg, "_attn_implementation", None) is None:
            cfg._attn_implementation = "sdpa"  # a bare config has none; masks and attention need one
        self.config = cfg
        self.d_student, self.d_teacher, self.num_layers = cfg.hidden_size, d_teacher, num_layers

        self.proj_pre = nn.Linear(d_teacher, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList(decoder_layer_cls(cfg, i) for i in range(num_layers))
        self.rotary_emb = rotary_cls_or_factory(cfg)
        self.proj_post = nn.Linear(cfg.hidden_size, d_teacher, bias=False)
        self.norm = nn.LayerNorm(d_teacher)
        # Multimodal RoPE (Qwen2-VL family) takes [3, B, L] position ids (temporal, height, width).
        self.mrope = "mrope_section" in (getattr(cfg, "rope_parameters", None) or {})
        self.apply(self._init_weights)
        for layer in self.layers:  # layer(..., rows_only=rows): see `_rows_only`
            layer.register_forward_pre_hook(_rows_only, with_kwargs=True)
            layer.register_forward_hook(_drop_rows_only, always_call=True)

    def _init_weights(self, m: nn.Module) -> None:
        # The student's own scheme (HF `_init_weights`); norms keep their ones/zeros.
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=getattr(self.config, "initializer_range", 0.02))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_student(cls, student: nn.Module | PretrainedConfig, d_teacher: int, num_layers: int = 2,
                     decoder_layer_cls: type[nn.Module] | None = None,
                     rotary_factory: RotaryFactory | None = None,
                     text_config: PretrainedConfig | None = None) -> "Recalibrator":
        """Build from a student model (or its config). Family adapters may pass the classes and the
        text config themselves; otherwise they are found on the student's text decoder."""
        config = student.config if isinstance(student, nn.Module) else student
        text_config = text_config or config.get_text_config()
        if decoder_layer_cls is None or rotary_factory is None:
            found_layer, found_rotary = student_block_classes(student)
            decoder_layer_cls = decoder_layer_cls or found_layer
            rotary_factory = rotary_factory or found_rotary
        return cls(text_config, decoder_layer_cls, rotary_factory, d_teacher, num_layers)

    @staticmethod
    def parameter_count(d_s: int, d_t: int, layer_params: int, num_layers: int = 2) -> int:
        """proj_pre + proj_post (2*d_s*d_t) + LayerNorm (2*d_t) + the decoder blocks."""
        return 2 * d_s * d_t + 2 * d_t + num_layers * layer_params

    # ---- passes --------------------------------------------------------------------------------

    def main_pass(self, z_qs: Tensor, z_al: Tensor, qs_mask: Tensor | None = None,
                  a_mask: Tensor | None = None, s_al: Tensor | None = None,
                  s_mask: Tensor | None = None) -> Tensor:
        """r_al of Rec([z_qs, proj_pre(z_al)]): z_qs [B, Ls, d_s], z_al [B, La, d_t] -> [B, La, d_t]
        (rows where `s_mask` is set take the student-space `s_al` instead, see `forward`)."""
        return self(z_al, a_mask, z_qs=z_qs, qs_mask=qs_mask, s_al=s_al, s_mask=s_mask)[0]

    def reg_pass(self, z_ql: Tensor, z_al: Tensor, ql_mask: Tensor | None = None,
                 a_mask: Tensor | None = None) -> Tensor:
        """r_al' of Rec([proj_pre(z_ql), proj_pre(z_al)]): z_ql [B, Lq, d_t] -> [B, La, d_t]."""
        return self(z_al, a_mask, z_ql=z_ql, ql_mask=ql_mask)[1]

    def project_lowrank(self, coefficients: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
        """proj_pre(mean + coefficients @ basis) of rows a cache stores as low-rank coefficients ([n, r], a [d_t]
        mean and an [r, d_t] basis) -> [n, d_s], with the basis folded into the projection: r * d_s multiply-adds
        per row (plus one r x d_t x d_s product per call) instead of rebuilding d_t floats per row and projecting
        them (d_t * (r + d_s)). Equal to projecting the rebuilt rows to float32 rounding; in float32 whatever the
        weights' dtype, so the fold loses nothing to a bf16 product."""
        w = self.proj_pre.weight.float()
        return torch.addmm(mean.float() @ w.T, coefficients.float(), basis.float() @ w.T).to(self.proj_pre.weight.dtype)

    def forward(self, z_al: Tensor, a_mask: Tensor | None = None, z_qs: Tensor | None = None,
                qs_mask: Tensor | None = None, z_ql: Tensor | None = None,
                ql_mask: Tensor | None = None, s_al: Tensor | None = None,
                s_mask: Tensor | None = None, p_ql: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(main r_al, regularization r_al'); each None when its prefix (z_qs / z_ql) is not given.

        `s_al` [B, La, d_s] with bool `s_mask` [B, La]: student-space rows that replace proj_pre(z_al)
        in the main pass where the mask is set. GenRecal uses it for the row that predicts each
        answer's first token: in the main pass that prediction comes from the student's last
        question state, as the question part of that pass is the student's (model.py).
        `p_ql` [B, Lq, d_s]: the regularization prefix already projected (proj_pre(z_ql); model.py's
        `reg_prefix` folds low-rank rows into the projection), instead of z_ql.
        Both passes run as one batch through the blocks: one forward per step (what DDP expects).
        """
        if (s_al is None) != (s_mask is None):
            raise ValueError("give s_al and s_mask together (the student rows and where they go)")
        if z_ql is not None and p_ql is not None:
            raise ValueError("give the regularization prefix once: z_ql (teacher space) or p_ql (projected)")
        dtype = self.proj_pre.weight.dtype
        a_mask = _valid(a_mask, z_al)
        answer = self.proj_pre(z_al.to(dtype))
        passes = []
        if z_qs is not None:
            main = answer if s_al is None else torch.where(s_mask[..., None], s_al.to(dtype), answer)
            passes.append((z_qs.to(dtype), _valid(qs_mask, z_qs), main))
        if z_ql is not None:
            p_ql = self.proj_pre(z_ql.to(dtype))
        if p_ql is not None:
            passes.append((p_ql.to(dtype), _valid(ql_mask, p_ql), answer))
        if not passes:
            raise ValueError("give z_qs (main pass) and/or z_ql (regularization pass)")

        # Stack the passes along the batch: pad the prefixes to a common length (masks mark padding).
        lq = max(p.shape[1] for p, _, _ in passes)
        prefix = torch.cat([F.pad(p, (0, 0, 0, lq - p.shape[1])) for p, _, _ in passes])
        q_mask = torch.cat([F.pad(m, (0, lq - m.shape[1])) for _, m, _ in passes])
        n = len(passes)
        out = iter(self.recalibrate(prefix, q_mask, torch.cat([a for _, _, a in passes]), a_mask.repeat(n, 1)).chunk(n))
        return (next(out) if z_qs is not None else None), (next(out) if p_ql is not None else None)

    def recalibrate(self, prefix: Tensor, q_mask: Tensor, answer: Tensor, a_mask: Tensor) -> Tensor:
        """Student-space prefix [B, Lq, d_s] + answer [B, La, d_s] -> r for the answer [B, La, d_t]."""
        B, _, d = prefix.shape
        q_len, a_len = q_mask.sum(1), a_mask.sum(1)
        L = int((q_len + a_len).max())
        # Pack: each sample's valid prefix tokens at slots 0..q_len-1, its answer right after them.
        q_dst = q_mask.cumsum(1) - 1
        a_dst = q_len[:, None] + a_mask.cumsum(1) - 1
        qb, qi = q_mask.nonzero(as_tuple=True)
        ab, ai = a_mask.nonzero(as_tuple=True)
        x = prefix.new_zeros(B, L, d)
        x = x.index_put((qb, q_dst[qb, qi]), prefix[qb, qi])
        x = x.index_put((ab, a_dst[ab, ai]), answer[ab, ai])
        valid = torch.arange(L, device=x.device)[None] < (q_len + a_len)[:, None]

        read = ab * L + a_dst[ab, ai]  # the answer slots, flat into [B * L]: the only rows read out
        h = self.blocks(x, valid, read).flatten(0, 1)[read]
        r = self.norm(self.proj_post(h))
        return r.new_zeros(B, answer.shape[1], self.d_teacher).index_put((ab, ai), r)

    def blocks(self, x: Tensor, valid: Tensor | None = None, read: Tensor | None = None) -> Tensor:
        """The decoder blocks on packed [B, L, d_s] input, positions 0..L-1, causal + padding mask.

        Only rows something reads are computed in full (`_rows_only`): every block's queries, attention output and
        MLP skip the padding slots (`valid` False), and the last block's skip every slot but `read` (flat indices
        into B * L; the answer slots, the only rows `recalibrate` reads out). The other rows' keys and values are
        still computed: later rows attend to them. The rows returned are those of the full computation up to
        float rounding (a matmul over fewer rows may sum in another order); the rest are not meaningful."""
        B, L, _ = x.shape
        pos = torch.arange(L, device=x.device).expand(B, L)
        if self.mrope:
            pos = pos[None].expand(3, B, L)  # text-only positions: the same 0..L-1 in all 3 sections
        position_embeddings = self.rotary_emb(x, pos)
        # Mask format follows config._attn_implementation (None = plain causal for sdpa, 4-D otherwise).
        attn_mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=valid,
                                       past_key_values=None)
        kept = None if valid is None or bool(valid.all()) else valid.reshape(-1).nonzero().squeeze(1)
        for i, layer in enumerate(self.layers):
            rows = read if read is not None and i == len(self.layers) - 1 else kept
            x = layer(x, attention_mask=attn_mask, position_embeddings=position_embeddings,  # v5: a tensor
                      **({} if rows is None else {"rows_only": rows}))
        return x


def _rows_only(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's forward pre-hook: `layer(x, ..., rows_only=rows)` computes the per-row work nothing reads on
    `rows` only (flat indices into x's [B, L]): the query and output projections and the MLP (`self_attn.q_proj`,
    `self_attn.o_proj`, `mlp`, the names every supported family's decoder layer uses). They see those rows and
    output zeros elsewhere: a zero query attends uniformly and a zero output leaves the residual as it was, so the
    other rows stay finite and only they change. Keys and values keep every row.

    Hooks, so the blocks stay the student's own classes (the same parameter names, FSDP units, checkpoints), and a
    call argument, so an activation-checkpointed block recomputes exactly what its forward computed (the
    recompute calls it with the same arguments). `_drop_rows_only` removes the sub-hooks when the block returns."""
    rows = kwargs.pop("rows_only", None)
    if rows is None:
        return args, kwargs
    x = args[0] if args else kwargs["hidden_states"]
    shape, n = x.shape[:2], x.shape[0] * x.shape[1]

    def take(_: nn.Module, a: tuple) -> tuple:
        return (a[0].flatten(0, -2)[rows],) + a[1:]

    def put(_: nn.Module, __: tuple, out: Tensor) -> Tensor:
        return out.new_zeros(n, out.shape[-1]).index_put((rows,), out).view(*shape, out.shape[-1])

    attn = getattr(layer, "self_attn", None)
    parts = [m for m in (getattr(attn, "q_proj", None), getattr(attn, "o_proj", None), getattr(layer, "mlp", None))
             if isinstance(m, nn.Module)]
    layer._rows_only_hooks = [h for m in parts for h in (m.register_forward_pre_hook(take), m.register_forward_hook(put))]
    return args, kwargs


def _drop_rows_only(layer: nn.Module, args: tuple, output: object) -> None:
    for h in layer.__dict__.pop("_rows_only_hooks", ()):
        h.remove()


def _valid(mask: Tensor | None, z: Tensor) -> Tensor:
    """A bool [B, L] valid-token mask; None means every token of `z` is valid."""
    return torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if mask is None else mask.bool()


def student_block_classes(student: nn.Module | PretrainedConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    """(decoder layer class, rotary embedding class) of a student's text decoder.

    The one place that knows where they live: the text decoder is the submodule holding both `layers`
    and `rotary_emb` (LlamaModel, Qwen2VLTextModel, ...; vision towers have no `rotary_emb` or name it
    differently). For a bare config, that decoder is instantiated on the meta device (no memory).
    """
    if isinstance(student, PretrainedConfig):
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        cfg = copy.deepcopy(student.get_text_config())
        cfg.num_hidden_layers = 1
        if hasattr(cfg, "layer_types"):
            cfg.layer_types = cfg.layer_types[:1]
        with torch.device("meta"):
            student = MODEL_MAPPING[type(cfg)](cfg)
    for m in student.modules():
        layers, rotary = getattr(m, "layers", None), getattr(m, "rotary_emb", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and isinstance(rotary, nn.Module):
            return type(layers[0]), type(rotary)
    raise ValueError(f"{type(student).__name__}: no text decoder with `layers` and `rotary_emb` found; "
                     "pass decoder_layer_cls and rotary_factory explicitly")
