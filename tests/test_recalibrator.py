"""Recalibrator: shapes, ragged batches, parameter count, re-assigned positions (plain and mRoPE)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaModel, LlavaConfig, LlavaForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, SiglipVisionConfig)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding,
                                                            Qwen2VLTextModel)

from genrecal_train.recalibrator import Recalibrator, student_block_classes

D_T = 48  # teacher hidden size (differs from the student's 64)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def llama_config() -> LlamaConfig:
    return LlamaConfig(**TINY)


def qwen2vl_text_config() -> Qwen2VLTextConfig:
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
    return Qwen2VLTextConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3]})


FAMILIES = {
    "llama": (llama_config, LlamaModel, LlamaDecoderLayer, LlamaRotaryEmbedding),
    "qwen2vl": (qwen2vl_text_config, Qwen2VLTextModel, Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding),
}


def build(family: str, num_layers: int = 2, attn: str | None = None) -> Recalibrator:
    make_cfg, _, layer_cls, rotary_cls = FAMILIES[family]
    cfg = make_cfg()
    cfg._attn_implementation = attn  # None: a bare config, the Recalibrator picks sdpa
    torch.manual_seed(0)
    return Recalibrator(cfg, layer_cls, rotary_cls, D_T, num_layers).eval()


def reference(rec: Recalibrator, family: str, z_qs: torch.Tensor, z_al: torch.Tensor) -> torch.Tensor:
    """One unpadded sample through the student's own text model (its rotary, its mask plumbing) with
    the Recalibrator's blocks in place of its layers and explicit positions 0..L-1."""
    make_cfg, model_cls, _, _ = FAMILIES[family]
    model = model_cls(make_cfg()).eval()
    model.layers, model.norm = rec.layers, nn.Identity()
    model.config._attn_implementation = rec.config._attn_implementation  # mask format of the blocks
    x = torch.cat([z_qs, rec.proj_pre(z_al)], dim=1)
    pos = torch.arange(x.shape[1])[None]
    if family == "qwen2vl":
        pos = pos[None].expand(3, 1, -1)  # mRoPE: [3, B, L], the same text positions in every section
    h = model(inputs_embeds=x, position_ids=pos).last_hidden_state
    return rec.norm(rec.proj_post(h[:, z_qs.shape[1]:]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", [None, "eager"])
def test_shapes_ragged_batch_and_both_passes(family: str, attn: str | None) -> None:
    rec = build(family, attn=attn)
    B, Ls, Lq, La = 3, 7, 9, 5
    z_qs, z_ql, z_al = torch.randn(B, Ls, 64), torch.randn(B, Lq, D_T), torch.randn(B, La, D_T)
    qs_mask = torch.arange(Ls) < torch.tensor([7, 3, 5])[:, None]
    ql_mask = torch.arange(Lq) < torch.tensor([9, 4, 1])[:, None]
    a_mask = torch.arange(La) < torch.tensor([2, 5, 4])[:, None]
    with torch.no_grad():
        r_main = rec.main_pass(z_qs, z_al, qs_mask, a_mask)
        r_reg = rec.reg_pass(z_ql, z_al, ql_mask, a_mask)
        both = rec(z_al, a_mask, z_qs=z_qs, qs_mask=qs_mask, z_ql=z_ql, ql_mask=ql_mask)
    assert r_main.shape == r_reg.shape == (B, La, D_T)
    assert torch.isfinite(r_main).all() and torch.isfinite(r_reg).all()
    assert (r_main[~a_mask] == 0).all() and (r_reg[~a_mask] == 0).all()  # padded answer rows stay empty
    # both passes batched in one forward == each pass alone
    torch.testing.assert_close(both[0], r_main, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], r_reg, atol=1e-5, rtol=1e-5)
    # each sample of the batch == that sample alone, unpadded
    for b in range(B):
        alone = rec.main_pass(z_qs[b:b + 1, qs_mask[b]], z_al[b:b + 1, a_mask[b]])
        torch.testing.assert_close(r_main[b:b + 1, a_mask[b]], alone, atol=1e-5, rtol=1e-5)
        alone = rec.reg_pass(z_ql[b:b + 1, ql_mask[b]], z_al[b:b + 1, a_mask[b]])
        torch.testing.assert_close(r_reg[b:b + 1, a_mask[b]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", [None, "eager"])
def test_positions_reassigned_from_zero(family: str, attn: str | None) -> None:
    """The answer output equals the student's blocks run on positions 0..L-1, and does not move
    when the sample is left-padded or shifted inside a ragged batch."""
    rec = build(family, attn=attn)
    torch.manual_seed(1)
    z_qs, z_al = torch.randn(1, 4, 64), torch.randn(1, 3, D_T)
    with torch.no_grad():
        ref = reference(rec, family, z_qs, z_al)
        torch.testing.assert_close(rec.main_pass(z_qs, z_al), ref, atol=1e-5, rtol=1e-5)

        # left-pad the question by 3 and the answer by 2, next to a longer right-padded sample
        q = torch.zeros(2, 8, 64)
        q[0, 3:7], q[1] = z_qs[0], torch.randn(8, 64)
        q_mask = torch.zeros(2, 8, dtype=torch.bool)
        q_mask[0, 3:7], q_mask[1] = True, True
        a = torch.zeros(2, 5, D_T)
        a[0, 2:], a[1, :4] = z_al[0], torch.randn(4, D_T)
        a_mask = torch.zeros(2, 5, dtype=torch.bool)
        a_mask[0, 2:], a_mask[1, :4] = True, True
        out = rec.main_pass(q, a, q_mask, a_mask)
    torch.testing.assert_close(out[0, 2:], ref[0], atol=1e-5, rtol=1e-5)
    # a plain causal run without re-assigned positions (question at its padded offset) would differ
    with torch.no_grad():
        shifted = torch.cat([torch.zeros(1, 3, 64), z_qs, rec.proj_pre(z_al)], dim=1)
        r_shift = rec.norm(rec.proj_post(rec.blocks(shifted)))[:, 7:]
    assert not torch.allclose(r_shift, ref, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_parameter_count_matches_formula(family: str, num_layers: int) -> None:
    make_cfg, model_cls, _, _ = FAMILIES[family]
    rec = build(family, num_layers)
    layer_params = sum(p.numel() for p in model_cls(make_cfg()).layers[0].parameters())
    n = sum(p.numel() for p in rec.parameters())
    assert n == Recalibrator.parameter_count(64, D_T, layer_params, num_layers)
    assert len(rec.layers) == num_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_all_parts_and_the_student_features(family: str) -> None:
    rec = build(family).train()
    z_qs = torch.randn(2, 5, 64, requires_grad=True)
    z_ql, z_al = torch.randn(2, 6, D_T), torch.randn(2, 4, D_T)
    r_main, r_reg = rec(z_al, z_qs=z_qs, z_ql=z_ql)
    (r_main.square().sum() + r_reg.square().sum()).backward()
    assert z_qs.grad is not None and z_qs.grad.abs().sum() > 0  # stage 2: L_ar/L_kl reach the student
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rec.parameters())


def test_student_config_is_not_touched() -> None:
    cfg = Qwen2VLTextConfig(**{**TINY, "num_hidden_layers": 4}, use_sliding_window=True, max_window_layers=1,
                            sliding_window=3, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                               "mrope_section": [2, 3, 3]})
    before = copy.deepcopy(cfg.to_dict())
    rec = Recalibrator(cfg, Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding, D_T, 2)
    assert cfg.to_dict() == before
    assert rec.config.layer_types == ["full_attention"] * 2  # fresh blocks: full causal attention
    assert rec.mrope and rec.config._attn_implementation == "sdpa"


def test_from_student_finds_the_text_decoder() -> None:
    llama = LlamaForCausalLM(llama_config())
    assert student_block_classes(llama) == (LlamaDecoderLayer, LlamaRotaryEmbedding)
    assert student_block_classes(llama.config) == (LlamaDecoderLayer, LlamaRotaryEmbedding)

    vl_cfg = Qwen2VLConfig(text_config=qwen2vl_text_config().to_dict(),
                           vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2),
                           image_token_id=5, video_token_id=6, vision_start_token_id=7)
    qwen = Qwen2VLForConditionalGeneration(vl_cfg)
    assert student_block_classes(qwen) == (Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding)  # not the vision tower
    assert student_block_classes(vl_cfg) == (Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding)

    llava_cfg = LlavaConfig(text_config=llama_config().to_dict(), image_token_id=5,
                            vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                             num_attention_heads=2, image_size=28,
                                                             patch_size=14).to_dict())
    llava = LlavaForConditionalGeneration(llava_cfg)  # SigLIP's encoder has `layers` but no `rotary_emb`
    assert student_block_classes(llava) == (LlamaDecoderLayer, LlamaRotaryEmbedding)

    for student in (qwen, vl_cfg, llama):
        rec = Recalibrator.from_student(student, d_teacher=D_T, num_layers=2)
        assert rec.d_student == 64 and rec.d_teacher == D_T
        assert rec.mrope == (student is not llama)
        out = rec.main_pass(torch.randn(1, 3, 64), torch.randn(1, 2, D_T))
        assert out.shape == (1, 2, D_T)
    # an adapter's own lookups take precedence
    rec = Recalibrator.from_student(llama, D_T, 1, decoder_layer_cls=LlamaDecoderLayer,
                                    rotary_factory=lambda c: LlamaRotaryEmbedding(c))
    assert isinstance(rec.layers[0], LlamaDecoderLayer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_rows_folded_into_the_projection(dtype: torch.dtype) -> None:
    """A low-rank row projected with its basis folded in (`project_lowrank`, what training does with a default
    cache's context rows) equals proj_pre of the rebuilt row, and so do the gradients it sends to proj_pre's
    weight and to everything after it (the regularization pass given `p_ql` instead of `z_ql`)."""
    rec = build("llama").train()
    torch.manual_seed(0)
    n, r = 11, 5
    mean, basis, coefficients = torch.randn(D_T), torch.randn(r, D_T) / D_T ** 0.5, torch.randn(n, r)
    rebuilt = mean + coefficients @ basis
    z_al = torch.randn(1, 3, D_T)
    grads = []
    for folded in (False, True):
        rec.zero_grad()
        if folded:
            out = rec(z_al, p_ql=rec.project_lowrank(coefficients, mean, basis)[None])[1]
        else:
            out = rec(z_al, z_ql=rebuilt[None])[1]
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in rec.parameters()]))
    (ref, ref_grads), (got, got_grads) = grads
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, h in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, h, rtol=1e-3, atol=1e-4)  # another GEMM order: float32 rounding
    rec = rec.to(dtype)
    projected = rec.project_lowrank(coefficients, mean, basis)
    assert projected.dtype == dtype  # computed in float32, handed over in the weights' dtype
    torch.testing.assert_close(projected.float(), (rebuilt.to(dtype) @ rec.proj_pre.weight.T).float(),
                               rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="once"):
        rec(z_al.to(dtype), z_ql=rebuilt[None].to(dtype), p_ql=projected[None])


def gemma3_recalibrator() -> Recalibrator:
    """Gemma 3's block: norms after attention and MLP too, a query norm, a rotary that takes a layer type."""
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3RotaryEmbedding

    from genrecal_cache.families.gemma3 import LayerTypeRotary

    cfg = Gemma3TextConfig(**TINY, head_dim=16)
    torch.manual_seed(0)
    return Recalibrator(cfg, Gemma3DecoderLayer, lambda c: LayerTypeRotary(Gemma3RotaryEmbedding(c), "full_attention"),
                        D_T, 2)


@pytest.mark.parametrize("family,checkpointed", [("llama", False), ("qwen2vl", False), ("gemma3", False),
                                                  ("llama", True)])
def test_rows_nothing_reads_are_skipped_with_the_same_outputs_and_gradients(family: str, checkpointed: bool,
                                                                            monkeypatch) -> None:
    """The blocks compute queries, attention output and MLP only at rows something reads (`_rows_only`): the last
    block at the answer rows, the others at the valid ones. Outputs and every gradient equal the full computation,
    activation-checkpointed blocks too (their recompute must skip the same rows)."""
    import genrecal_train.recalibrator as recalibrator_module
    from genrecal_train.distributed import checkpoint_layers

    def make() -> Recalibrator:
        rec = (gemma3_recalibrator() if family == "gemma3" else build(family)).train()
        if checkpointed:
            checkpoint_layers(rec.layers)
        return rec

    rec = make()
    B, Ls, Lq, La = 3, 7, 9, 5
    g = torch.Generator().manual_seed(1)
    z_qs, z_ql, z_al = torch.randn(B, Ls, 64, generator=g), torch.randn(B, Lq, D_T, generator=g), torch.randn(B, La, D_T, generator=g)
    qs_mask = torch.arange(Ls) < torch.tensor([7, 3, 5])[:, None]
    ql_mask = torch.arange(Lq) < torch.tensor([9, 4, 1])[:, None]
    a_mask = torch.arange(La) < torch.tensor([2, 5, 4])[:, None]

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rec.zero_grad(set_to_none=True)
        qs = z_qs.clone().requires_grad_(True)
        outs = rec(z_al, a_mask, z_qs=qs, qs_mask=qs_mask, z_ql=z_ql, ql_mask=ql_mask)
        (outs[0].square().sum() + outs[1].sin().sum()).backward()
        return list(outs), [qs.grad] + [p.grad for p in rec.parameters()]

    seen: list[int] = []  # rows each block's MLP computed
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].flatten(0, -2).shape[0]))
             for layer in rec.layers]
    outs, grads = run()
    packed = 2 * B * int((torch.cat([qs_mask.sum(1), ql_mask.sum(1)]) + a_mask.sum(1).repeat(2)).max())
    valid = int(qs_mask.sum() + ql_mask.sum() + 2 * a_mask.sum())
    expected = [valid, 2 * int(a_mask.sum())]  # padding and unread rows really skipped
    assert seen == expected + (expected[::-1] if checkpointed else []) and valid < packed  # the recompute too
    for h in hooks:
        h.remove()

    def full(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs.pop("rows_only", None)  # every row computed
        return args, kwargs

    monkeypatch.setattr(recalibrator_module, "_rows_only", full)
    rec = make()  # its hooks made with `full`
    full_outs, full_grads = run()
    for a, b in zip(outs + grads, full_outs + full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
