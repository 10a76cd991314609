"""The teacher's language head (final norm + lm_head), exported once into the cache.

Cached hidden states are *post*-norm, so the teacher's own distribution is `lm_head(h)`.
Anything produced by a student-side module (the Recalibrator) is pre-norm and goes through
`lm_head(final_norm(x))`, which keeps the head exactly the teacher's, frozen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

__all__ = ["HeadConfig", "TeacherHead", "all_finite"]


@dataclass
class HeadConfig:
    hidden_size: int
    vocab_size: int
    norm_type: str = "rms"  # "rms": x*w | "rms_1p": x*(1+w) (Gemma) | "layer": LayerNorm
    norm_eps: float = 1e-6
    logit_scale: float = 1.0  # multiplied into the logits (some families scale them)
    logit_softcap: float | None = None  # tanh soft-capping (Gemma-style); None = off


class TeacherHead(torch.nn.Module):
    """Frozen final norm + lm_head. Gradients flow through it to its inputs, never into it."""

    def __init__(self, config: HeadConfig, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 norm_bias: torch.Tensor | None = None):
        super().__init__()
        if lm_head_weight.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"lm_head weight has shape {tuple(lm_head_weight.shape)}, expected "
                             f"({config.vocab_size}, {config.hidden_size}) from the head config")
        self.config = config
        self.register_buffer("norm_weight", norm_weight.detach().clone())
        self.register_buffer("norm_bias", None if norm_bias is None else norm_bias.detach().clone())
        self.register_buffer("lm_head_weight", lm_head_weight.detach().clone())

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        w = self.norm_weight
        if c.norm_type in ("rms", "rms_1p"):
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + c.norm_eps)
            # Gemma stores w around 0 and scales by (1 + w), in float32 before the cast (as its RMSNorm does)
            return ((w.float() + 1.0 if c.norm_type == "rms_1p" else w.float()) * y).to(x.dtype)
        if c.norm_type == "layer":
            b = self.norm_bias
            return F.layer_norm(x, (c.hidden_size,), w.to(x.dtype), None if b is None else b.to(x.dtype), c.norm_eps)
        raise ValueError(f"unknown norm_type {c.norm_type!r} in teacher head config (expected 'rms', 'rms_1p' "
                         f"or 'layer')")

    def logits(self, h: torch.Tensor, post_norm: bool = True) -> torch.Tensor:
        """Full-vocabulary logits. `post_norm=True` for cached teacher states, False for pre-norm inputs."""
        x = h if post_norm else self.final_norm(h)
        out = F.linear(x, self.lm_head_weight.to(x.dtype))
        if self.config.logit_scale != 1.0:
            out = out * self.config.logit_scale
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            out = torch.tanh(out / cap) * cap
        return out

    @torch.no_grad()
    def topk_logprobs(self, h: torch.Tensor, k: int, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (ids int32, logprobs float32) per row of post-norm `h` [T, d].

        Works in chunks of tokens so a [T, 152k] logits tensor never exists at once.
        """
        ids, lps = [], []
        for start in range(0, h.shape[0], chunk_tokens):
            logits = self.logits(h[start:start + chunk_tokens].to(self.lm_head_weight.dtype)).float()
            logp = torch.log_softmax(logits, dim=-1)
            v, i = torch.topk(logp, k, dim=-1)
            ids.append(i.to(torch.int32))
            lps.append(v)
        if not ids:
            return (torch.empty(0, k, dtype=torch.int32, device=h.device),
                    torch.empty(0, k, dtype=torch.float32, device=h.device))
        return torch.cat(ids), torch.cat(lps)

    def save(self, path: str) -> None:
        tensors = {"norm.weight": self.norm_weight, "lm_head.weight": self.lm_head_weight}
        if self.norm_bias is not None:
            tensors["norm.bias"] = self.norm_bias
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, path, metadata={"genrecal_head_config": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "TeacherHead":
        """Load from a local `teacher_head.safetensors` (safetensors only: no code runs on load)."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for bad headers
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
        if "genrecal_head_config" not in meta:
            raise ValueError(f"{path}: not a genrecal teacher head (metadata 'genrecal_head_config' missing)")
        cfg = _parse_head_config(meta["genrecal_head_config"], path)
        try:
            t = load_file(path, device=str(device))
        except Exception as e:  # noqa: BLE001 - truncated or corrupt tensor data
            raise ValueError(f"{path}: unreadable tensors ({type(e).__name__}: {str(e)[:200]})") from None
        for name in ("norm.weight", "lm_head.weight", "norm.bias"):
            if name in t and not t[name].is_floating_point():
                raise ValueError(f"{path}: tensor {name} has dtype {t[name].dtype}, expected a floating-point type")
        if "norm.weight" not in t or "lm_head.weight" not in t:
            raise ValueError(f"{path}: tensors norm.weight and lm_head.weight are required, found {sorted(t)[:5]}")
        if t["norm.weight"].shape != (cfg.hidden_size,):
            raise ValueError(f"{path}: norm.weight has shape {tuple(t['norm.weight'].shape)}, expected "
                             f"({cfg.hidden_size},) from the head config")
        for name in ("norm.weight", "norm.bias", "lm_head.weight"):
            if name in t and not all_finite(t[name]):
                raise ValueError(f"{path}: tensor {name} holds NaN or inf; every logit of the teacher would be "
                                 f"NaN (the head was exported from a broken model or the file was altered)")
        return cls(cfg, t["norm.weight"], t["lm_head.weight"], t.get("norm.bias"))


def all_finite(t: torch.Tensor, block_bytes: int = 64 << 20) -> bool:
    """Whether every value of `t` is finite, checked in row blocks (a 152k x 8192 head would need a
    1.2 GB mask at once)."""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    rows = max(1, block_bytes // max(1, flat.shape[1] * flat.element_size()))
    return all(bool(torch.isfinite(flat[i:i + rows]).all()) for i in range(0, flat.shape[0], rows))


def _parse_head_config(text: str, path: str) -> HeadConfig:
    """HeadConfig from the safetensors metadata, checked field by field (the file may be untrusted)."""
    import math

    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: metadata 'genrecal_head_config' is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(raw, dict) or set(raw) - {f for f in HeadConfig.__dataclass_fields__}:
        raise ValueError(f"{path}: metadata 'genrecal_head_config' must be an object with the keys "
                         f"{sorted(HeadConfig.__dataclass_fields__)}, got {str(raw)[:120]}")
    real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    checks = {"hidden_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24,
              "vocab_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 26,
              "norm_type": lambda v: v in ("rms", "rms_1p", "layer"), "norm_eps": lambda v: real(v) and v >= 0,
              "logit_scale": real, "logit_softcap": lambda v: v is None or (real(v) and v > 0)}
    for key in ("hidden_size", "vocab_size"):
        if key not in raw:
            raise ValueError(f"{path}: head config lacks {key!r}")
    for key, ok in checks.items():
        if key in raw and not ok(raw[key]):
            raise ValueError(f"{path}: head config field {key!r} has an invalid value {raw[key]!r:.60}")
    return HeadConfig(**raw)
