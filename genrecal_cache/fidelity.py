"""How much a lossy hidden-state codec changes the teacher: measured with the teacher's own head.

`fidelity(head, exact, decoded)` compares the teacher distribution softmax(lm_head(h)) from exact
states with the one from decoded states, token by token:

- `mean_kl`: mean over tokens of KL(p_exact || p_decoded) in nats (full vocabulary, float64);
- `top1_agreement`: fraction of tokens whose argmax is unchanged;
- `max_abs_err`, `rel_rms_err`: of the states themselves (max |h - h^|; ||h - h^|| / ||h||).

`codec_fidelity(head, states, codec)` round-trips `states` through a codec first (one chunk at a
time, as the writer would). `topk_fidelity(head, cached sample)` needs no exact states: it compares
the decoded states of a cache with the top-k logprobs that extraction computed from the exact ones
(a lower bound of the KL, by the log-sum inequality, and the top-1 agreement), so a lossy cache can
be checked after the fact.

`SyntheticTeacher` makes post-norm states and a head that look like a trained LLM's, for measuring
codecs without a big model: lognormal per-channel scales, student-t(5) values, a few fixed
"massive activation" channels, RMS-normalised per token and multiplied by a lognormal norm weight;
the head is calibrated so the teacher's next-token distributions have the entropy and confidence
typical of a trained LM scoring its own answers. Real activations differ: recheck on the real teacher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import torch

from .format.codecs import HiddenCodec, hidden_codec
from .format.head import HeadConfig, TeacherHead

__all__ = ["ExactReference", "Fidelity", "StateModel", "SyntheticTeacher", "TeacherStats", "codec_fidelity",
           "fidelity", "synthetic_post_norm_states", "synthetic_topk", "teacher_stats", "topk_fidelity"]


@dataclass
class Fidelity:
    tokens: int
    mean_kl: float          # nats, KL(p_exact || p_decoded) averaged over tokens
    p99_kl: float           # 99th percentile over tokens
    top1_agreement: float   # fraction of tokens with the same argmax
    max_abs_err: float      # max |h - h^| over all elements
    rel_rms_err: float      # ||h - h^||_F / ||h||_F
    max_flip_margin: float = 0.0  # largest exact top-1/top-2 logprob gap (nats) among tokens whose argmax changed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _logprobs(head: TeacherHead, h: np.ndarray) -> torch.Tensor:
    logits = head.logits(torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32)), post_norm=True)
    return torch.log_softmax(logits.double(), dim=-1)


class ExactReference:
    """The teacher's distributions on exact states, computed once, to compare many decodings with
    (holds N x V float64 log-probabilities: for a few thousand tokens)."""

    @torch.no_grad()
    def __init__(self, head: TeacherHead, exact: np.ndarray, chunk_tokens: int = 256) -> None:
        self.head, self.chunk = head, chunk_tokens
        self.exact = np.asarray(exact, dtype=np.float32)
        if self.exact.ndim != 2 or self.exact.shape[1] != head.hidden_size:
            raise ValueError(f"fidelity: exact states {self.exact.shape} must be [N, hidden_size={head.hidden_size}]")
        self._lp = [_logprobs(head, self.exact[a:a + chunk_tokens]) for a in range(0, len(self.exact), chunk_tokens)]

    @torch.no_grad()
    def compare(self, decoded: np.ndarray) -> Fidelity:
        return _compare(self.head, self.exact, decoded, self.chunk, lambda j, a: self._lp[j])

    def stats(self) -> TeacherStats:
        """The teacher's own statistics on the exact states (no extra forward)."""
        return _stats(self._lp)


def _compare(head: TeacherHead, exact: np.ndarray, decoded: np.ndarray, chunk: int, exact_lp) -> Fidelity:
    decoded = np.asarray(decoded, dtype=np.float32)
    if exact.shape != decoded.shape or exact.ndim != 2 or exact.shape[1] != head.hidden_size:
        raise ValueError(f"fidelity: exact {exact.shape} and decoded {decoded.shape} must both be [N, "
                         f"hidden_size={head.hidden_size}]")
    kls, agree, flip_margin = [], 0, 0.0
    for j, a in enumerate(range(0, exact.shape[0], chunk)):
        lp = exact_lp(j, a)
        lq = _logprobs(head, decoded[a:a + chunk])
        kls.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0).numpy())
        same = lp.argmax(-1) == lq.argmax(-1)
        agree += int(same.sum())
        if not bool(same.all()) and lp.shape[1] > 1:
            top2 = lp[~same].topk(2, dim=-1).values
            flip_margin = max(flip_margin, float((top2[:, 0] - top2[:, 1]).max()))
    kl = np.concatenate(kls) if kls else np.zeros(0)
    diff = exact.astype(np.float64) - decoded
    n = exact.shape[0]
    return Fidelity(tokens=n, mean_kl=float(kl.mean()) if n else 0.0,
                    p99_kl=float(np.quantile(kl, 0.99)) if n else 0.0,
                    top1_agreement=agree / max(n, 1), max_abs_err=float(np.abs(diff).max(initial=0.0)),
                    rel_rms_err=float(np.linalg.norm(diff) / max(np.linalg.norm(exact.astype(np.float64)), 1e-30)),
                    max_flip_margin=flip_margin)


@torch.no_grad()
def fidelity(head: TeacherHead, exact: np.ndarray, decoded: np.ndarray, chunk_tokens: int = 256) -> Fidelity:
    """Compare teacher distributions from `exact` and `decoded` post-norm states [N, d] (streamed:
    memory stays at a chunk of logits)."""
    exact = np.asarray(exact, dtype=np.float32)
    return _compare(head, exact, decoded, chunk_tokens, lambda j, a: _logprobs(head, exact[a:a + chunk_tokens]))


def codec_fidelity(head: TeacherHead, states: np.ndarray, codec: str | HiddenCodec,
                   chunk_tokens: int = 512) -> Fidelity:
    """Fidelity of `codec` on `states` [N, d] (encoded and decoded `chunk_tokens` rows at a time,
    like the writer's inner chunks)."""
    c = hidden_codec(codec)
    states = np.asarray(states, dtype=np.float32)
    decoded = np.concatenate([c.round_trip(states[a:a + chunk_tokens])
                              for a in range(0, states.shape[0], chunk_tokens)]) if len(states) else states.copy()
    return fidelity(head, states, decoded)


@torch.no_grad()
def topk_fidelity(head: TeacherHead, samples: Iterable[Any], max_tokens: int | None = None) -> dict[str, float]:
    """Check a cache's decoded states against its stored top-k (computed from the exact states).

    `samples`: CachedSample-like objects (`hidden`, `topk_ids`, `topk_logprobs`; the rows holding the top-k
    and an exact state, where a role-aware cache says which). Returns
    `kl_lower_bound` (mean over tokens of the KL between exact and decoded distributions with all
    tokens outside the stored top-k merged into one bin: never more than the full KL),
    `top1_agreement` (decoded argmax == stored top-1) and `tokens`.
    """
    kls, agree, n = [], 0, 0
    for s in samples:
        if max_tokens is not None and n >= max_tokens:
            break
        rows = getattr(s, "topk_rows", None)  # role-aware caches: top-k (and exact states) at answer rows only
        rows = slice(None) if rows is None else rows & s.exact_rows
        h = np.asarray(s.hidden, dtype=np.float32)[rows]
        if h.shape[0] == 0:
            continue
        lq = _logprobs(head, h)
        ids = torch.from_numpy(np.asarray(s.topk_ids, dtype=np.int64)[rows])
        lp = torch.from_numpy(np.asarray(s.topk_logprobs, dtype=np.float64)[rows])
        lq_k = lq.gather(1, ids)
        p, q = lp.exp(), lq_k.exp()
        p_rest = (1 - p.sum(-1)).clamp_min(0)
        q_rest = (1 - q.sum(-1)).clamp_min(1e-300)
        rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), torch.zeros_like(p_rest))
        kls.append(((p * (lp - lq_k)).sum(-1) + rest).clamp_min(0).numpy())
        agree += int((lq.argmax(-1) == ids[:, 0]).sum())
        n += h.shape[0]
    kl = np.concatenate(kls) if kls else np.zeros(0)
    return {"tokens": n, "kl_lower_bound": float(kl.mean()) if n else 0.0, "top1_agreement": agree / max(n, 1)}


# ---- a realistic synthetic teacher -------------------------------------------------------------------------

@dataclass
class TeacherStats:
    mean_entropy: float      # nats
    mean_top1_prob: float
    bulk_logit_std: float    # std of the logits over the vocabulary, averaged over tokens


class StateModel:
    """Post-norm hidden states like a trained LLM's: x = t5 * sigma_c (sigma_c ~ lognormal(0, 0.6) per
    channel), `outliers` fixed channels at +-30x the typical magnitude ("massive activations"),
    h = norm_weight * x / rms(x) with norm_weight ~ lognormal(0, 0.3)."""

    def __init__(self, hidden_size: int, outliers: int = 6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.d = hidden_size
        self.channel_scale = rng.lognormal(0.0, 0.6, hidden_size).astype(np.float32)
        self.outliers = rng.choice(hidden_size, size=min(outliers, hidden_size), replace=False)
        self.outlier_sign = rng.choice([-1.0, 1.0], size=len(self.outliers)).astype(np.float32)
        self.norm_weight = rng.lognormal(0.0, 0.3, hidden_size).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_t(5, size=(n, self.d)).astype(np.float32) * self.channel_scale
        typical = float(np.median(self.channel_scale))
        x[:, self.outliers] = self.outlier_sign * 30.0 * typical * (1 + 0.1 * rng.standard_normal((n, len(self.outliers))))
        x /= np.sqrt(np.mean(np.square(x), axis=1, keepdims=True))
        return (x * self.norm_weight).astype(np.float32)


def synthetic_post_norm_states(n: int, hidden_size: int, seed: int = 0) -> np.ndarray:
    """[n, d] float32 states from `StateModel(hidden_size, seed=seed)` (deterministic)."""
    return StateModel(hidden_size, seed=seed).sample(n, np.random.default_rng(seed + 1))


def synthetic_topk(n: int, vocab_size: int, k: int, seed: int = 0, logit_std: float = 2.5,
                   boost: tuple[float, float] = (8.0, 24.0)) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, k] int32, logprobs [n, k] float32, sorted) like a top-k of LLM next-token logits:
    `vocab_size` Gaussian logits (std `logit_std`) plus one token raised by m ~ U(boost). Costs
    O(n k), not O(n V): the largest bulk logits are drawn as order statistics (exponential spacings
    of uniforms through the normal quantile) and the log-normaliser uses the bulk's expectation."""
    rng = np.random.default_rng(seed)
    k = min(k, vocab_size)
    spacings = np.cumsum(rng.exponential(size=(n, k)), axis=1) / (vocab_size + 1)  # 1 - the top-k uniforms
    bulk = logit_std * torch.special.ndtri(torch.from_numpy(1 - np.clip(spacings, 1e-300, 1 - 1e-16))).numpy()
    target = rng.standard_normal(n) * logit_std + rng.uniform(*boost, n)
    vals = np.sort(np.concatenate([bulk, target[:, None]], axis=1), axis=1)[:, ::-1][:, :k]
    lse = np.logaddexp(np.log(vocab_size) + logit_std ** 2 / 2, target)[:, None]
    # k distinct ids per token: sorted draws from [0, V - k] plus 0..k-1 are strictly increasing and < V
    ids = np.sort(rng.integers(0, vocab_size - k + 1, (n, k)), axis=1) + np.arange(k)
    ids = np.take_along_axis(ids, rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1), axis=1)
    return ids.astype(np.int32), (vals - lse).astype(np.float32)


class SyntheticTeacher:
    """A `StateModel` plus a head, with a trained LLM's output statistics (see module docstring).

    - head: Gaussian lm_head rows scaled so the bulk logits have std `logit_std` (2.5; trained LMs
      are typically 2-3); the columns of the outlier channels are 30x smaller (massive activations
      act as biases, the head largely ignores them);
    - each token's state gets a component along its target token's lm_head row that puts that
      logit m ~ U(boost) above the mean, so the teacher is confident on some tokens and unsure on
      others (defaults: mean top-1 probability ~0.66 at V = 32k).
    """

    def __init__(self, hidden_size: int = 4096, vocab_size: int = 32000, outliers: int = 6, logit_std: float = 2.5,
                 boost: tuple[float, float] = (8.0, 24.0), seed: int = 0) -> None:
        self.d, self.V, self.boost = hidden_size, vocab_size, boost
        self.model = StateModel(hidden_size, outliers, seed)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(vocab_size, hidden_size, generator=g)
        w[:, torch.from_numpy(self.model.outliers)] /= 30.0
        probe = self.model.sample(64, np.random.default_rng(seed + 1))
        w *= logit_std / float((torch.from_numpy(probe) @ w.T).std(dim=1).mean())
        w = w.to(torch.bfloat16)  # as a GPU teacher exports it (logits are still computed in float32)
        self.head = TeacherHead(HeadConfig(hidden_size, vocab_size, norm_type="rms", norm_eps=1e-6),
                                torch.from_numpy(self.model.norm_weight.copy()), w)

    def states(self, n: int, seed: int = 0) -> np.ndarray:
        """[n, d] float32 post-norm states, deterministic for (teacher seed, seed)."""
        rng = np.random.default_rng(10_000 + seed)
        h = torch.from_numpy(self.model.sample(n, rng))
        w = self.head.lm_head_weight.float()
        target = torch.from_numpy(rng.integers(0, self.V, n))
        m = torch.from_numpy(rng.uniform(*self.boost, n).astype(np.float32))
        rows = w[target]
        cur = (rows * h).sum(1)  # move h along the target's row until that logit is m
        h += ((m - cur) / rows.pow(2).sum(1))[:, None] * rows
        return h.numpy()

    def stats(self, states: np.ndarray) -> TeacherStats:
        return teacher_stats(self.head, states)


@torch.no_grad()
def teacher_stats(head: TeacherHead, states: np.ndarray, chunk_tokens: int = 256) -> TeacherStats:
    """Mean entropy, top-1 probability and logit spread of the teacher on `states`."""
    return _stats(_logprobs(head, states[a:a + chunk_tokens]) for a in range(0, len(states), chunk_tokens))


def _stats(logprobs: Iterable[torch.Tensor]) -> TeacherStats:
    ent, top1, std = [], [], []
    for lp in logprobs:  # log-softmax differs from the logits by a constant per token: same std
        ent.append(-(lp.exp() * lp).sum(-1).numpy())
        top1.append(lp.max(-1).values.exp().numpy())
        std.append(lp.std(-1).numpy())
    cat = lambda xs: float(np.concatenate(xs).mean()) if xs else 0.0  # noqa: E731
    return TeacherStats(mean_entropy=cat(ent), mean_top1_prob=cat(top1), bulk_logit_std=cat(std))

