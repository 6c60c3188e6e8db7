"""The user-facing facade: ``LLM.generate``, ``LLM.chat`` and ``LLM.stream``."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from minillama import progress
from minillama.config import Config
from minillama.context import reset_context
from minillama.engine.llm_engine import LLMEngine, RequestError
from minillama.engine.scheduler import ScheduledBatch
from minillama.engine.sequence import Sequence
from minillama.sampling_params import SamplingParams

Message = dict[str, str]


@dataclass
class RequestOutput:
    """One finished request."""

    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated ids, including a final EOS when finish_reason == "stop"
    finish_reason: str  # "stop", "length", or "error" (the request failed alone; see ``error``)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # one line saying why, when finish_reason == "error"


class LLM(LLMEngine):
    """A Llama model ready to generate. ``model=None`` loads the built-in SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        super().__init__(Config(model=model, **kwargs))

    def _params(self, n: int, sampling_params: SamplingParams | Seq[SamplingParams] | None) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if not isinstance(sampling_params, list | tuple):
            raise RequestError(f"sampling_params must be a SamplingParams or a list of them, got "
                               f"{type(sampling_params).__name__}: e.g. SamplingParams(temperature=0.7)")
        if len(sampling_params) != n:
            raise RequestError(f"got {len(sampling_params)} sampling params for {n} prompts: give one, or one per prompt")
        return list(sampling_params)

    def _output(self, seq: Sequence) -> RequestOutput:
        ids = seq.completion_token_ids
        return RequestOutput(seq.token_ids[: seq.num_prompt_tokens], self.tokenizer.decode(ids), ids,
                             seq.finish_reason or "length", seq.num_cached_tokens, seq.error)

    def generate(self, prompts: Seq[str] | Seq[list[int]] | str,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs come back in prompt order.

        Without ``sampling_params`` each request samples at temperature 1.0 (as in vLLM); pass
        ``SamplingParams(temperature=0)`` for greedy decoding, which the command line uses.
        A request that fails inside a step comes back with ``finish_reason == "error"``.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, self._params(len(prompts), sampling_params),
                                                         strict=True)]
        # nothing streams here: a bar on a terminal says how far the batch is (free when not drawn)
        with progress.task("generating", total=len(seqs), unit="requests") as bar:
            while self.has_unfinished():
                self.step()
                if bar.watched:
                    bar.update(completed=sum(s.is_finished for s in seqs),
                               description=f"generating ({sum(s.num_completion_tokens for s in seqs)} tokens)")
        return [self._output(s) for s in seqs]

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are sampled (``chat`` applies the template)."""
        if chat and isinstance(prompt, str):
            prompt = self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        seq = self.add_request(prompt, sampling_params or SamplingParams())
        decoder = self.tokenizer.stream_decoder()
        seen = 0
        while not seq.is_finished:
            self.step()
            new = seq.completion_token_ids[seen:]  # tokens of steps still in flight are not in it yet
            for token_id in new:
                piece = decoder.push(token_id)
                if piece:
                    yield piece
            seen += len(new)
        # drain other requests that may share the engine
        while self.has_unfinished():
            self.step()
        if seq.finish_reason == "error":
            raise RequestError(f"the request failed: {seq.error}")

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits at every position of ``token_ids`` (one prefill through the paged cache)."""
        seq = Sequence(token_ids, SamplingParams(max_tokens=1), self.config.kvcache_block_size)
        bm = self.block_manager
        if not bm.can_allocate(seq):
            raise ValueError("the KV cache is busy or too small for this prompt")
        enable, bm.enable_prefix_caching = bm.enable_prefix_caching, False
        try:
            bm.allocate(seq)
            batch = ScheduledBatch([seq], [len(seq)])
            input_ids, positions, _ = self.runner.prepare(batch)
            hidden = self.model(input_ids, positions)
            return self.model.compute_logits(hidden)
        finally:
            reset_context()
            bm.deallocate(seq)
            bm.enable_prefix_caching = enable
