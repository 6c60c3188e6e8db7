"""Per-request sampling settings, checked in full when built (and again when a request is queued)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

#: Seeds and top_k become int64 on the device: anything from 2**63 up cannot be stored there.
INT64_LIMIT = 2**63


class SamplingParamsError(ValueError):
    """A sampling setting has the wrong type or is out of range; the message says what to use instead."""


def _integer(name: str, value: Any, hint: str) -> int:
    # bool is an int subclass, but `top_k=True` is a mistake, not a 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r} ({type(value).__name__}): {hint}")
    return int(value)


def _real(name: str, value: Any, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(f"{name} must be a number, got {value!r} ({type(value).__name__}): {hint}")
    value = float(value)
    if not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value}: {hint}")
    return value


@dataclass
class SamplingParams:
    """How to pick each next token.

    ``temperature=0`` is greedy; the default 1.0 samples from the model's distribution (as vLLM
    does), while the ``minillama`` command line defaults to greedy. ``top_k=0`` and ``top_p=1``
    turn those filters off; ``seed`` (0 <= seed < 2**63) makes sampling reproducible. Every field
    is checked here, so a bad value fails when it is set, never inside an engine step.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    max_tokens: int = 256
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise to plain int/float/bool) every field; raise ``SamplingParamsError``.

        The engine calls this again when a request is queued, so fields changed after
        construction are caught before they reach a step.
        """
        self.temperature = _real("temperature", self.temperature, "use 0 for greedy decoding, e.g. 0.7 to sample")
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature}: use 0 for greedy decoding")
        self.top_k = _integer("top_k", self.top_k, "use 0 to turn top-k off")
        if not 0 <= self.top_k < INT64_LIMIT:
            raise SamplingParamsError(f"top_k must be in [0, 2**63), got {self.top_k}: use 0 to turn top-k off")
        self.top_p = _real("top_p", self.top_p, "use 1.0 to turn top-p off")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}: use 1.0 to turn top-p off")
        self.max_tokens = _integer("max_tokens", self.max_tokens, "ask for at least 1 token")
        if self.max_tokens <= 0:
            raise SamplingParamsError(
                f"max_tokens must be a positive integer, got {self.max_tokens}: ask for at least 1 token")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, "use None for an unseeded request")
            if not 0 <= self.seed < INT64_LIMIT:
                raise SamplingParamsError(f"seed must be in [0, 2**63), got {self.seed}: pick a smaller seed, "
                                          "or None for an unseeded request")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
