"""Sampling the next token: temperature, top-k and nucleus (top-p) filtering, reproducible with a generator.

Shapes:
    b batch, v vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flamingo_pytorch._validation import check_count


@dataclass(frozen=True)
class SamplingSettings:
    """How ``generate`` picks tokens; see ``FlamingoPaLM.generate`` for the meaning of each field."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0
    generator: torch.Generator | None = None

    def check(self, num_tokens: int) -> None:
        """Raise ValueError/TypeError naming the first bad setting."""
        check_count("max_new_tokens", self.max_new_tokens)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")
        for name in ("eos_token_id", "pad_token_id"):
            token = getattr(self, name)
            if token is not None and not (isinstance(token, int) and 0 <= token < num_tokens):
                raise ValueError(f"{name} must be a token id in [0, {num_tokens}), got {token!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")


def keep_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Set all but the ``top_k`` largest logits of each row (b, v) to -inf (exactly k survive)."""
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (b, k) each
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def keep_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if top_p >= 1:
        return logits  # everything (the cumulative sum may round past 1 before the last token)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, v) each
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the top token always stays
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from logits (b, v) -> (b,) long. ``temperature=0`` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    if top_p is not None:
        logits = keep_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
