"""A request as the engine sees it: its tokens, how many have KV in the cache, its block table."""

from __future__ import annotations

from enum import Enum, auto
from itertools import count

from minillama.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


#: Stands for a sampled token whose value is still on the GPU (overlapped steps, see ``LLMEngine``).
PENDING = -1


class Sequence:
    """Prompt plus generated tokens. ``num_computed_tokens`` tokens already have their KV cached.

    With overlapped steps the last one or two token ids may be ``PENDING`` placeholders
    (``num_pending`` of them) until the step that sampled them is collected.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits on the latest admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # "stop", "length" or "error"
        self.error: str | None = None  # why it failed, when finish_reason == "error"
        self.block_hashes: list[int] = []  # hash chain of its full, computed blocks
        self.num_pending = 0  # trailing PENDING placeholders

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        """Generated ids known so far (placeholders of steps still in flight left out)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold every token of the sequence."""
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token still lacks KV (a prompt, or a recompute after preemption)."""
        return len(self.token_ids) - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block(self, i: int) -> list[int]:
        """Token ids of logical block ``i``."""
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
