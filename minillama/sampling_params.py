"""Per-request sampling settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy; ``seed`` makes sampling reproducible."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    max_tokens: int = 256
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens}: ask for at least 1 token")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}: use 0 for greedy decoding")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}: use 0 to turn top-k off")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}: use 1.0 to turn top-p off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
