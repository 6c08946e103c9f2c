"""What the teacher hands to the student's loss, and what that costs to keep between phases.

In on-policy distillation the teacher scores the student's sampled responses in one phase and the student
trains on them in another, so the teacher's output has to be stored (on CPU) per response token. Full logits
are exact but huge; this module holds the four ways of storing it and builds each from a teacher forward:

- ``logits``: teacher logits (N, V). Exact for every divergence.
- ``hidden``: the teacher's final hidden states (N, H) plus a reference to its output head (V, H) (+ bias):
  logits are recomputed chunk by chunk inside the loss. Exact (up to the head's own precision).
- ``topk``: the teacher's K largest log-probs, their token ids and the log of the remaining ("tail") mass.
  The loss sees K+1 buckets: an approximation.
- ``sampled``: the teacher's log-prob of the sampled token only (plus that token's id): an unbiased
  per-token estimator of the reverse KL and nothing else.

Bytes per token as stored by default, computed by ``storage_table()`` at V=151,936, H=1536, K=64 (the output
head is shared by all tokens and not counted; sampled = 4 B teacher log-prob + 4 B token id):

    mode     storage          bytes/token bf16 logits / this
    logits   bf16                 303,872               1.0x
    logits   fp32                 607,744               0.5x
    hidden   bf16                   3,072              98.9x
    hidden   fp32                   6,144              49.5x
    topk     fp32 + int32 ids         516             588.9x
    sampled  fp32 + int32 id            8          37,984.0x
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opd.distill.config import SIGNALS

MODES = SIGNALS

# Per-token tensors of each mode (the head weight/bias are shared by all tokens, never sliced or counted).
_PER_TOKEN_FIELDS = {
    "logits": ("logits_N_V",),
    "hidden": ("hidden_N_H",),
    "topk": ("topk_logp_N_K", "topk_ids_N_K", "tail_logmass_N"),
    "sampled": ("sampled_logp_N", "sampled_ids_N"),
}
_SHARED_FIELDS = ("head_weight_V_H", "head_bias_V")


@dataclass
class TeacherSignal:
    """The teacher's output for N response tokens in one of ``MODES`` (only that mode's fields are set)."""

    mode: str
    logits_N_V: torch.Tensor | None = None
    hidden_N_H: torch.Tensor | None = None
    head_weight_V_H: torch.Tensor | None = None
    head_bias_V: torch.Tensor | None = None
    topk_logp_N_K: torch.Tensor | None = None
    topk_ids_N_K: torch.Tensor | None = None
    tail_logmass_N: torch.Tensor | None = None
    sampled_logp_N: torch.Tensor | None = None
    sampled_ids_N: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown teacher signal mode {self.mode!r}; choose one of {MODES}")
        needed = _PER_TOKEN_FIELDS[self.mode] + (("head_weight_V_H",) if self.mode == "hidden" else ())
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"teacher signal mode {self.mode!r} needs {', '.join(missing)}")
        extra = [
            f.name
            for f in dataclasses.fields(self)
            if f.name != "mode" and getattr(self, f.name) is not None and f.name not in self._fields()
        ]
        if extra:
            raise ValueError(f"teacher signal mode {self.mode!r} does not use {', '.join(extra)}")
        for name in _PER_TOKEN_FIELDS[self.mode]:
            if getattr(self, name).shape[0] != self.num_tokens:
                shapes = {n: tuple(getattr(self, n).shape) for n in _PER_TOKEN_FIELDS[self.mode]}
                raise ValueError(f"teacher signal tensors disagree on the number of tokens: {shapes}")
        if self.mode == "hidden":
            hidden_size = self.head_weight_V_H.shape[1]
            if self.hidden_N_H.ndim != 2 or self.hidden_N_H.shape[1] != hidden_size:
                raise ValueError(
                    f"hidden_N_H {tuple(self.hidden_N_H.shape)} does not match head_weight_V_H "
                    f"{tuple(self.head_weight_V_H.shape)} (hidden sizes must agree)"
                )
            if self.head_bias_V is not None and self.head_bias_V.shape != self.head_weight_V_H.shape[:1]:
                raise ValueError(f"head_bias_V {tuple(self.head_bias_V.shape)} must have one entry per row")
        if self.mode == "topk" and self.topk_ids_N_K.shape != self.topk_logp_N_K.shape:
            raise ValueError(
                f"topk_ids_N_K {tuple(self.topk_ids_N_K.shape)} and topk_logp_N_K "
                f"{tuple(self.topk_logp_N_K.shape)} must have the same shape"
            )
        if self.mode == "sampled" and self.sampled_ids_N.shape != self.sampled_logp_N.shape:
            raise ValueError("sampled_ids_N and sampled_logp_N must both have shape (N,)")

    def _fields(self) -> tuple[str, ...]:
        return _PER_TOKEN_FIELDS[self.mode] + (_SHARED_FIELDS if self.mode == "hidden" else ())

    @property
    def num_tokens(self) -> int:
        return getattr(self, _PER_TOKEN_FIELDS[self.mode][0]).shape[0]

    @property
    def vocab_width(self) -> int | None:
        """Columns of the teacher's output head (None where the mode does not keep them)."""
        if self.mode == "logits":
            return self.logits_N_V.shape[1]
        if self.mode == "hidden":
            return self.head_weight_V_H.shape[0]
        return None

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TeacherSignal:
        kwargs = {
            name: fn(name, getattr(self, name)) for name in self._fields() if getattr(self, name) is not None
        }
        return TeacherSignal(self.mode, **kwargs)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherSignal:
        return self._map(lambda _, t: t.to(device, non_blocking=non_blocking))

    def slice(self, rows: slice | torch.Tensor) -> TeacherSignal:
        """The signal for a subset of tokens (a slice or an index tensor), e.g. one micro-batch."""
        return self._map(lambda name, t: t if name in _SHARED_FIELDS else t[rows])

    def nbytes_per_token(self) -> int:
        """Bytes stored per token (the shared output head is not counted)."""
        return sum(_row_nbytes(getattr(self, name)) for name in _PER_TOKEN_FIELDS[self.mode])

    @classmethod
    def from_logits(
        cls,
        logits_N_V: torch.Tensor,
        mode: str = "logits",
        *,
        k: int = 64,
        sampled_ids_N: torch.Tensor | None = None,
        vocab_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        chunk_size: int = 1024,
    ) -> TeacherSignal:
        """A signal from the teacher's logits (N, V).

        ``vocab_size`` keeps only the tokenizer's columns (heads are often padded); ``dtype`` is the storage
        dtype of logits (default bf16) or of the top-k/sampled log-probs (default fp32).
        """
        if mode == "hidden":
            raise ValueError("mode 'hidden' cannot be built from logits: use TeacherSignal.from_hidden")
        logits_N_V = logits_N_V.detach()[:, :vocab_size]

        def chunks():
            for start in range(0, logits_N_V.shape[0], chunk_size):
                yield logits_N_V[start : start + chunk_size]

        return cls._from_chunks(chunks, logits_N_V, mode, k, sampled_ids_N, dtype, device, chunk_size)

    @classmethod
    def from_hidden(
        cls,
        hidden_N_H: torch.Tensor,
        head_weight_V_H: torch.Tensor,
        head_bias_V: torch.Tensor | None = None,
        mode: str = "hidden",
        *,
        k: int = 64,
        sampled_ids_N: torch.Tensor | None = None,
        vocab_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        chunk_size: int = 1024,
    ) -> TeacherSignal:
        """A signal from the teacher's final hidden states and output head (logits = hidden @ head.T + bias).

        Mode ``hidden`` stores the hidden states (default bf16) and references the head; the other modes
        compute the logits chunk by chunk, in the head's dtype, and reduce them as ``from_logits`` does.
        """
        hidden_N_H, head_weight_V_H = hidden_N_H.detach(), head_weight_V_H.detach()
        head_bias_V = None if head_bias_V is None else head_bias_V.detach()
        if mode == "hidden":
            return cls(
                "hidden",
                hidden_N_H=hidden_N_H.to(device, dtype or torch.bfloat16),
                head_weight_V_H=head_weight_V_H.to(device),
                head_bias_V=None if head_bias_V is None else head_bias_V.to(device),
            )
        weight = head_weight_V_H[:vocab_size]
        bias = None if head_bias_V is None else head_bias_V[:vocab_size]

        def chunks():
            for start in range(0, hidden_N_H.shape[0], chunk_size):
                yield F.linear(hidden_N_H[start : start + chunk_size].to(weight.dtype), weight, bias)

        if mode == "logits":  # the full logits, chunk by chunk
            dtype = dtype or torch.bfloat16
            parts = [c.to(device, dtype) for c in chunks()]
            empty = torch.empty(0, weight.shape[0], dtype=dtype, device=device)
            return cls("logits", logits_N_V=torch.cat(parts) if parts else empty)
        return cls._from_chunks(chunks, hidden_N_H, mode, k, sampled_ids_N, dtype, device, chunk_size)

    @classmethod
    def _from_chunks(cls, chunks, source, mode, k, sampled_ids_N, dtype, device, chunk_size) -> TeacherSignal:
        if mode == "logits":
            return cls("logits", logits_N_V=source.to(device, dtype or torch.bfloat16))
        if mode not in ("topk", "sampled"):
            raise ValueError(f"unknown teacher signal mode {mode!r}; choose one of {MODES}")
        if mode == "sampled":
            if sampled_ids_N is None or sampled_ids_N.shape != source.shape[:1]:
                raise ValueError(
                    "mode 'sampled' needs sampled_ids_N: the id of each response token, shape (N,)"
                )
            sampled_ids_N = sampled_ids_N.to(source.device, torch.int64)
        parts = []
        for i, logits in enumerate(chunks()):
            logp = torch.log_softmax(logits.float(), dim=-1)
            if mode == "sampled":
                ids = sampled_ids_N[i * chunk_size : i * chunk_size + len(logits)]
                if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < logits.shape[1]:
                    raise ValueError(
                        f"sampled_ids_N must lie in [0, {logits.shape[1]}) (the compared vocabulary)"
                    )
                parts.append(logp.gather(1, ids[:, None]).squeeze(1))
                continue
            topk_logp, topk_ids = logp.topk(k, dim=-1)
            # The tail mass summed directly (not 1 - sum(top-k), which cancels when the tail is small).
            tail = logp.exp_().scatter_(1, topk_ids, 0.0).sum(-1).log_()
            parts.append((topk_logp, topk_ids, tail))
        logp_dtype = dtype or torch.float32
        if mode == "sampled":
            logp = torch.cat(parts) if parts else torch.empty(0)
            return cls(
                "sampled",
                sampled_logp_N=logp.to(device, logp_dtype),
                sampled_ids_N=sampled_ids_N.to(device, torch.int32),
            )
        if not parts:
            parts = [(torch.empty(0, k), torch.empty(0, k, dtype=torch.int64), torch.empty(0))]
        topk_logp, topk_ids, tail = (torch.cat(p) for p in zip(*parts, strict=True))
        return cls(
            "topk",
            topk_logp_N_K=topk_logp.to(device, logp_dtype),
            topk_ids_N_K=topk_ids.to(device, torch.int32),
            tail_logmass_N=tail.to(device, logp_dtype),
        )


def _row_nbytes(t: torch.Tensor) -> int:
    per_row = t.element_size()
    for size in t.shape[1:]:
        per_row *= size
    return per_row


def storage_table(vocab: int = 151_936, hidden: int = 1536, k: int = 64) -> list[tuple[str, str, int]]:
    """(mode, dtype, bytes per token) for the default storage of each mode, from real one-token signals."""
    logits = torch.zeros(1, vocab)
    head = torch.zeros((), dtype=torch.bfloat16).expand(vocab, hidden)  # no storage: only its shape matters
    ids = torch.zeros(1, dtype=torch.int64)
    signals = [
        ("logits", "bf16", TeacherSignal.from_logits(logits)),
        ("logits", "fp32", TeacherSignal.from_logits(logits, dtype=torch.float32)),
        ("hidden", "bf16", TeacherSignal("hidden", hidden_N_H=torch.zeros(1, hidden, dtype=torch.bfloat16),
                                         head_weight_V_H=head)),
        ("hidden", "fp32", TeacherSignal("hidden", hidden_N_H=torch.zeros(1, hidden), head_weight_V_H=head)),
        ("topk", "fp32 + int32 ids", TeacherSignal.from_logits(logits, "topk", k=k)),
        ("sampled", "fp32 + int32 id", TeacherSignal.from_logits(logits, "sampled", sampled_ids_N=ids)),
    ]  # fmt: skip
    return [(mode, dtype, signal.nbytes_per_token()) for mode, dtype, signal in signals]
