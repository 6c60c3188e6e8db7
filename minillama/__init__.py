"""minillama: a small, readable Llama inference engine with a paged KV cache.

``LLM``, ``RequestOutput`` and ``SamplingParams`` are imported on first use, so ``import
minillama`` (and the command lines, which check their options first) do not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from minillama.llm import LLM, RequestOutput
    from minillama.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from minillama import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from minillama.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'minillama' has no attribute {name!r}")
