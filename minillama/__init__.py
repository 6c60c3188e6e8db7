"""minillama: a small, readable Llama inference engine with a paged KV cache."""

from minillama.llm import LLM, RequestOutput
from minillama.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
