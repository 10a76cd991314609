"""Role-aware storage (format version 3): which rows of a sample a cache stores, and how.

A row is a position t of a sample; `hidden[t]` predicts token t+1. Rows have roles:
- **answer rows**: t such that token t+1 is answer content (`answer_mask[t+1]`, inside the sample). They
  carry every target (KL/CE) and the main pass: always stored exactly, at the answer codec (`hidden`).
- **context rows**: every other row (image tokens, question, template, earlier turns). The trainer reads
  them only as the regularization pass's input, so the `context` policy may store them compactly:
    full     in `hidden`, at the answer codec (as format version 2)
    lowrank  in `context` [T, r]: coefficients on a per-cache basis (`context_basis.safetensors`: mean [d],
             basis [r, d], orthonormal rows, fitted on the run's first context rows), stored as fp8
    text     image-token rows dropped, the other context rows in `hidden`
    none     no context rows
Top-k logprobs are stored at answer rows only (`topk_rows="answer"`, the default) or at every row ("all").

The array `row_flags` [T] uint8 says, per row, what is stored (bits below), so a reader needs neither the
policy nor the image token ids to know which rows hold what.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from .codecs import hidden_codec

__all__ = ["CONTEXT_CODEC", "CONTEXT_POLICIES", "ContextBasis", "FLAG_COMPACT", "FLAG_EXACT", "FLAG_TOPK", "Storage",
           "TOPK_ROWS", "answer_rows", "default_rank", "role_arrays", "row_flags"]

CONTEXT_POLICIES = ("full", "lowrank", "text", "none")
TOPK_ROWS = ("answer", "all")
# What a new extraction stores unless told otherwise (`--context`, `--topk-rows`, `--topk` of extract and plan),
# with the options' help; `Storage()`'s own defaults are the format's (caches written before roles: everything).
NEW_CONTEXT, NEW_TOPK_ROWS, NEW_TOPK = "lowrank", "answer", 64
CONTEXT_HELP = ("How context rows (image tokens, question: read only by the regularization pass) are stored: lowrank "
                "(coefficients on a basis fitted on the run's first states, fp8: ~r+4 bytes/row), full (as answer "
                "rows), text (image-token rows dropped, text rows in full) or none. See docs/cache-format.md.")
RANK_HELP = "Rank of the low-rank context basis [default: hidden size / 8, at most 64]."
TOPK_ROWS_HELP = "Rows whose top-k logprobs are stored: answer (the trainer's targets) or all."
# Low-rank context coefficients: fp8 with one scale per row (r + 4 bytes; d=8192, r=64: 68 B/token).
CONTEXT_CODEC = hidden_codec("fp8")
EXACT_SVD_MAX_DIM = 1024  # above: randomized SVD for the basis fit
FLAG_EXACT = 1    # hidden[t] holds the state at the answer codec
FLAG_COMPACT = 2  # context[t] holds its low-rank coefficients (hidden[t] is zero)
FLAG_TOPK = 4     # topk_ids[t] / topk_logprobs[t] hold the top-k (zero otherwise)


def default_rank(hidden_size: int) -> int:
    """Rank of the low-rank context basis when not given: d/8, at most 64 (d=8192: 64, 68 bytes/row as fp8;
    the suite's d=64 teacher: 8)."""
    return max(1, min(64, hidden_size // 8))


@dataclass(frozen=True)
class Storage:
    """How a cache stores rows by role (manifest field `storage`, format version 3)."""
    context: str = "full"                                   # one of CONTEXT_POLICIES
    rank: int | None = None                                 # lowrank: rows of the basis
    topk_rows: str = "all"                                  # one of TOPK_ROWS
    image_token_ids: list[int] = field(default_factory=list)  # text: the teacher's image-token ids (dropped)

    def __post_init__(self) -> None:
        if self.context not in CONTEXT_POLICIES:
            raise ValueError(f"context policy {self.context!r}: use one of {', '.join(CONTEXT_POLICIES)}")
        if self.topk_rows not in TOPK_ROWS:
            raise ValueError(f"topk_rows {self.topk_rows!r}: use one of {', '.join(TOPK_ROWS)}")
        if (self.context == "lowrank") != (self.rank is not None):
            raise ValueError(f"context policy {self.context!r} with rank {self.rank!r}: a rank goes with 'lowrank' only")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"context rank must be >= 1, got {self.rank}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Storage:
        return cls(context=d["context"], rank=d["rank"], topk_rows=d["topk_rows"],
                   image_token_ids=list(d["image_token_ids"]))

    @property
    def is_full(self) -> bool:
        """Stores what a version-2 cache stores (every row's state and top-k)."""
        return self.context == "full" and self.topk_rows == "all"


def role_arrays(storage: Storage) -> tuple[str, ...]:
    """The arrays version 3 adds to the five of every version: `row_flags`, and `context` for low-rank context.
    None for full storage, which writers write as format version 2 (byte for byte what version 2 stores)."""
    if storage.is_full:
        return ()
    return ("row_flags",) + (("context",) if storage.context == "lowrank" else ())


def answer_rows(answer_mask: np.ndarray) -> np.ndarray:
    """bool [L]: rows whose state predicts an answer token (t with answer_mask[t+1]) of one sample."""
    m = np.asarray(answer_mask, dtype=bool)
    out = np.zeros_like(m)
    out[:-1] = m[1:]
    return out


def row_flags(token_ids: np.ndarray, answer_mask: np.ndarray, storage: Storage) -> np.ndarray:
    """uint8 [L]: what the cache stores at each row of one sample (FLAG_* bits), by `storage`."""
    ans = answer_rows(answer_mask)
    ctx = ~ans
    if storage.context == "text":
        ctx &= ~np.isin(np.asarray(token_ids), storage.image_token_ids)
    exact = ans | ctx if storage.context in ("full", "text") else ans
    flags = np.where(exact, FLAG_EXACT, 0).astype(np.uint8)
    if storage.context == "lowrank":
        flags[ctx] |= FLAG_COMPACT
    flags[ans if storage.topk_rows == "answer" else slice(None)] |= FLAG_TOPK
    return flags


class ContextBasis:
    """A rank-r affine subspace of the teacher's states: h ~ mean + c @ basis, basis [r, d] orthonormal rows."""

    def __init__(self, mean: np.ndarray, basis: np.ndarray) -> None:
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, basis) per device
        if self.mean.ndim != 1 or self.basis.ndim != 2 or self.basis.shape[1] != self.mean.shape[0]:
            raise ValueError(f"context basis: mean {self.mean.shape} and basis {self.basis.shape} do not fit")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.basis).all()):
            raise ValueError("context basis holds NaN or inf")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tensors": {}}  # the device copies stay in this process

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    @classmethod
    def fit(cls, states: np.ndarray, rank: int) -> ContextBasis:
        """Principal subspace of `states` [n, d] (deterministic for the same input and machine): exact (eigenvectors
        of the float64 Gram matrix) for d <= 1024, else after a seeded randomized range finder in float32 (4 power
        iterations; d=8192, 4096 rows: about a second). Fewer rows or dimensions than `rank` leave the
        remaining basis rows zero (their coefficients are then zero)."""
        # torch: the linear algebra shares the thread pool of the extraction it runs in (numpy's own BLAS
        # threads beside torch's were 30x slower on a busy 2-core machine)
        import torch  # here: the format (and the CLIs reading its options) loads without torch

        x = torch.from_numpy(np.asarray(states, dtype=np.float64))
        mean = x.mean(dim=0) if len(x) else torch.zeros(x.shape[1], dtype=torch.float64)
        basis = torch.zeros(rank, x.shape[1], dtype=torch.float64)
        if len(x):
            xc = x - mean
            if x.shape[1] > EXACT_SVD_MAX_DIM and rank + 10 < min(xc.shape):
                # float32 GEMMs (the centring in float64): the same subspace as float64 to 4 digits of the variance
                # kept, 2.5x faster (0.31 s at d=4096 on 4,096 rows; bench/roles.py --fit-only)
                xc = xc.float()
                omega = torch.from_numpy(np.random.default_rng(0).standard_normal((xc.shape[1], rank + 10))).float()
                q = torch.linalg.qr(xc @ omega).Q
                for _ in range(4):  # power iterations: the spectrum of hidden states decays slowly
                    q = torch.linalg.qr(xc @ (xc.T @ q)).Q
                _, sv, vt = torch.linalg.svd(q.T @ xc, full_matrices=False)  # (rank + 10) x d: small
                w, v = sv.double().square(), vt.T.double()
            else:  # eigenvectors of the d x d Gram matrix: one GEMM and a small eigh (an SVD of the n x d rows
                w, v = torch.linalg.eigh(xc.T @ xc)  # is 10-100x slower for the same subspace)
                w, v = w.flip(0), v.flip(1)  # largest first
            n = min(rank, int((w > w[0] * 1e-12).sum()) if w.numel() and w[0] > 0 else 0)
            basis[:n] = v[:, :n].T
        mean, basis = mean.numpy(), basis.numpy()
        return cls(mean, basis)

    def encode(self, h: np.ndarray | torch.Tensor) -> np.ndarray:
        """[n, d] states -> [n, r] float32 coefficients (numpy). A tensor is coded on its device (a GPU's states
        cross to the host as r floats per row); numpy on the CPU, by the same torch kernels, so that a resumed
        extraction codes its rows exactly as an uninterrupted one."""
        import torch  # here: the format (and the CLIs reading its options) loads without torch

        x = h if isinstance(h, torch.Tensor) else torch.from_numpy(np.require(h, np.float32, ["C", "W"]))
        mean, basis = self.tensors(x.device)
        return ((x.float() - mean) @ basis.T).cpu().numpy()

    def decode(self, c: np.ndarray) -> np.ndarray:
        """[n, r] coefficients -> [n, d] float32 states."""
        out = np.asarray(c, dtype=np.float32) @ self.basis  # float32 GEMM; then the mean in place (no copies)
        out += self.mean
        return out

    def decode_into(self, out: np.ndarray, c: np.ndarray, rows: np.ndarray) -> None:
        """out[rows] = decode(c[rows]) for float32 `out` [n, d], `c` [n, r]: one GEMM per run of consecutive rows,
        written in place (no gathered copy of the rows, no scatter back)."""
        edges = np.flatnonzero(np.diff(np.concatenate([[False], rows, [False]]).astype(np.int8)))
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
            np.matmul(c[a:b], self.basis, out=out[a:b])
            out[a:b] += self.mean

    def decode_tensor(self, c: torch.Tensor) -> torch.Tensor:
        """[n, r] coefficients (a tensor on any device) -> [n, d] float32 states on that device: `decode` where the
        rows are used, for readers that hand them over as coefficients (`iter_samples(precision="stored")`: a
        trainer's GPU gets r floats per row instead of d). Equal to `decode` to float32 rounding (another GEMM
        kernel, the mean added in it), not bit for bit."""
        mean, basis = self.tensors(c.device)
        return mean.addmm(c.float(), basis)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, basis) as tensors on `device`, moved once per device."""
        if device not in self._tensors:
            import torch  # here: the format (and the CLIs reading its options) loads without torch

            self._tensors[device] = (torch.from_numpy(self.mean).to(device), torch.from_numpy(self.basis).to(device))
        return self._tensors[device]

    def to_bytes(self) -> bytes:
        """context_basis.safetensors: tensors `mean` [d] and `basis` [r, d] (safetensors: no code runs on load)."""
        return safetensors_save({"mean": self.mean, "basis": self.basis}, metadata={"format": "genrecal_context_basis"})

    @classmethod
    def from_bytes(cls, data: bytes) -> ContextBasis:
        """The basis `to_bytes` wrote; ValueError naming what is wrong otherwise."""
        try:
            t = safetensors_load(data)
            return cls(t["mean"], t["basis"])
        except Exception as e:  # noqa: BLE001 - safetensors' own errors, a missing tensor, wrong shapes
            raise ValueError(f"not a context basis ({type(e).__name__}: {str(e)[:200]})") from None
