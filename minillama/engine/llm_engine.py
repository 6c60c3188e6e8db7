"""The step loop: schedule -> run the model -> postprocess, with hook sites around each step."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from minillama import hooks
from minillama.attention import get_backend
from minillama.config import Config
from minillama.engine.block_manager import BlockManager
from minillama.engine.guard import RequestError, fail_requests, prompt_token_ids, run_apart
from minillama.engine.model_runner import ModelRunner, PendingTokens
from minillama.engine.scheduler import ScheduledBatch, Scheduler
from minillama.engine.sequence import Sequence
from minillama.models.config import ModelConfig
from minillama.models.llama import LlamaForCausalLM
from minillama.models.loader import load_weights, open_model
from minillama.options import DTYPES
from minillama.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
__all__ = ["LLMEngine", "RequestError", "init_random_weights", "resolve_device", "resolve_dtype"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but no CUDA GPU is usable here: use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of auto, float32, bfloat16, float16")
    return getattr(torch, DTYPES[name])


class TokenIdsOnly:
    """Stands in for the tokenizer of a model built from a bare ``ModelConfig``: prompts are token ids."""

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        raise RequestError("this engine was built from a ModelConfig and has no tokenizer: pass token ids")

    encode_chat = encode

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""

    def stream_decoder(self, skip_special_tokens: bool = True) -> TokenIdsOnly:
        return self  # text pieces are empty too

    def push(self, token_id: int) -> str:
        return ""

    def skip(self, token_ids: list[int]) -> None:
        pass

    def flush(self) -> str:
        return ""


def init_random_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Seeded N(0, std) matrices and unit norms, drawn where the model lives (for benchmarks, no files)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():  # a tied LM head is listed once
        if param.dim() >= 2:
            param.data.normal_(0.0, std, generator=gen)
        elif name.endswith("norm.weight"):
            param.data.fill_(1.0)


class LLMEngine:
    """Owns the model, the KV cache, the block manager and the scheduler.

    ``config.model`` is a checkpoint path, None for the built-in model, or a ``ModelConfig``:
    then the network gets seeded random weights (``init_random_weights``) and prompts must be
    token ids, which is what throughput benchmarks need.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.backend = get_backend(config.backend)
        if config.kvcache_block_size == 0:
            # Small blocks show prefix caching at a readable grain on CPU; on a GPU, 256-token
            # blocks (flash-attn's minimum) keep the per-step block tables a few entries wide.
            config.kvcache_block_size = max(256 if self.device.type == "cuda" else 16,
                                            self.backend.block_size_multiple)
        if config.kvcache_block_size % self.backend.block_size_multiple:
            raise ValueError(
                f"kvcache_block_size {config.kvcache_block_size} does not work with the {self.backend.name} backend: "
                f"use a multiple of {self.backend.block_size_multiple}")
        if isinstance(config.model, ModelConfig):
            loaded = None
            self.model_config, self.tokenizer = config.model, TokenIdsOnly()
        else:
            loaded = open_model(config.model)
            self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.model_source = loaded
        self.backend.check(self.model_config.head_dim, self.dtype, self.device)
        config.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        self.model = self._build_model(loaded)
        self.runner = ModelRunner(config, self.model_config, self.model, self.device, self.dtype)
        num_blocks = config.num_kvcache_blocks or self._num_blocks_from_memory()
        self.runner.allocate_kv_cache(num_blocks)
        self.num_kvcache_blocks = num_blocks
        self._report_kv_cache()
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.model_config.eos_token_ids)
        self.num_steps = 0
        self._pending: _InFlight | None = None  # overlapped steps: the batch launched last
        if self.device.type == "cuda" and not config.enforce_eager:
            from minillama.engine.cuda_graph import DecodeGraphs

            self.runner.graphs = DecodeGraphs(self.runner)

    def _build_model(self, loaded) -> LlamaForCausalLM:
        old = torch.get_default_dtype()
        try:
            torch.set_default_dtype(self.dtype)
            with torch.device(self.device):
                model = LlamaForCausalLM(self.model_config, self.config.max_model_len, self.backend)
        finally:
            torch.set_default_dtype(old)
        if loaded is None:
            init_random_weights(model)
        else:
            load_weights(model, loaded.weights())  # streamed: one host tensor at a time
        return model.eval()

    def _num_blocks_from_memory(self) -> int:
        per_block = self.runner.bytes_per_block()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - self.config.gpu_memory_utilization) - self._activation_reserve()
        else:
            budget = self.config.cpu_kvcache_bytes
        # no point in more blocks than max_num_seqs full-length sequences can use
        cap = self.config.max_num_seqs * -(-self.config.max_model_len // self.config.kvcache_block_size)
        num_blocks = min(int(budget // per_block), cap)
        if num_blocks < -(-self.config.max_model_len // self.config.kvcache_block_size):
            raise ValueError(f"only {num_blocks} KV blocks fit in memory, fewer than one max_model_len sequence needs: "
                             "lower max_model_len or raise gpu_memory_utilization / cpu_kvcache_bytes")
        return num_blocks

    def _report_kv_cache(self) -> None:
        """Say once how large the KV cache is and where its size came from (printed when sized from GPU memory)."""
        c, bs = self.config, self.config.kvcache_block_size
        gib = self.num_kvcache_blocks * self.runner.bytes_per_block() / 2**30
        if c.num_kvcache_blocks:
            source = "num_kvcache_blocks"
        elif self.device.type == "cuda":
            source = f"free GPU memory at gpu_memory_utilization={c.gpu_memory_utilization}"
        else:
            source = "cpu_kvcache_bytes"
        self.kv_cache_summary = (f"KV cache: {self.num_kvcache_blocks} blocks of {bs} tokens "
                                 f"({self.num_kvcache_blocks * bs} tokens, {gib:.2f} GiB {self.dtype}), from {source}")
        logger.info(self.kv_cache_summary)
        if self.device.type == "cuda" and not c.num_kvcache_blocks:
            print(f"minillama: {self.kv_cache_summary}", file=sys.stderr)

    def _activation_reserve(self) -> int:
        c, n = self.model_config, self.config.max_num_batched_tokens
        return int(n * (c.vocab_size * 4 + c.intermediate_size * 2 * 4 + c.hidden_size * 16) * 2)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Queue one request; anything wrong with it raises ``RequestError`` (or ``SamplingParamsError``) now."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}: "
                               "build one with SamplingParams(temperature=..., max_tokens=...)")
        params.validate()  # fields may have been changed since construction
        token_ids = prompt_token_ids(self.tokenizer, prompt)
        self.check_prompt(token_ids, params.max_tokens)
        seq = Sequence(token_ids, params, self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq

    def check_prompt(self, token_ids: list[int], max_tokens: int = 1) -> None:
        """Raise ``RequestError`` (one line naming the fix) for a prompt this engine cannot run."""
        if not token_ids:
            raise RequestError("the prompt is empty: give at least one token")
        limit = self.config.max_model_len
        if len(token_ids) >= limit:
            raise RequestError(f"the prompt has {len(token_ids)} tokens but max_model_len is {limit}: "
                               f"shorten the prompt or raise max_model_len (--max-model-len; the model allows "
                               f"{self.model_config.max_position_embeddings})")
        if max(token_ids) >= self.model_config.vocab_size or min(token_ids) < 0:
            raise RequestError(f"token ids must be in [0, {self.model_config.vocab_size}): the prompt has "
                               f"{max(token_ids)}")
        bs = self.config.kvcache_block_size
        need = -(-min(len(token_ids) + max_tokens, limit) // bs)
        if need > self.num_kvcache_blocks:  # it could never run, and would block the queue
            raise RequestError(f"the request needs {need} KV blocks of {bs} tokens but the cache has "
                               f"{self.num_kvcache_blocks}: lower max_tokens or max_model_len, or give the "
                               "cache more blocks")

    def has_unfinished(self) -> bool:
        return not self.scheduler.is_finished() or self._pending is not None

    def step(self) -> tuple[ScheduledBatch, list[Sequence]]:
        """Run one scheduler step; returns the batch that ran and the sequences it finished.

        With overlapped steps (``async_scheduling``, on by default on CUDA unless a hook listener
        needs synchronous steps) the batch is launched without waiting for its tokens: they are
        collected in the next call, while the GPU computes that call's batch, so the host's
        scheduling and bookkeeping hide behind GPU work. Finished sequences are then reported one
        call late, and a sequence that stops on EOS computes one extra token that is dropped.

        Hook events: ``step.begin`` before the batch runs, ``step.launched`` once its work is
        enqueued, ``step.end`` when its tokens are known (one call later when steps overlap).
        """
        overlap = self._overlap()
        if self._pending is not None and not overlap:
            return ScheduledBatch([], []), self._collect()  # a listener needs synchronous steps: finish this one
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return batch, self._empty_step(batch)
        step = self.num_steps
        if hooks.enabled:
            hooks.emit(hooks.STEP_BEGIN, None, step=step, batch=batch, engine=self)
        failed: list[Sequence] = []
        if overlap:
            try:
                launched = self._launch(batch, step)
            except Exception as e:  # one bad request must not poison the engine: fail it alone
                launched, failed = None, fail_requests(self.scheduler, batch, e)
            finished = (self._collect() if self._pending is not None else []) + failed
            self._pending = launched
        else:
            try:
                tokens = self.runner.launch(batch, step)
                if hooks.enabled:
                    hooks.emit(hooks.STEP_LAUNCHED, None, step=step, batch=batch, engine=self,
                               graphed=self.runner.graphed)
                sampled = [t if t >= 0 else None for t in tokens.tolist()]
            except Exception as e:  # one bad request must not poison the engine: fail it alone
                batch, sampled, failed = run_apart(self.scheduler, self.runner, self.num_steps, batch, e)
            finished = self.scheduler.postprocess(batch, sampled) + failed
            if hooks.enabled:
                hooks.emit(hooks.STEP_END, None, step=step, batch=batch, sampled=sampled, finished=finished,
                           engine=self)
        self.num_steps += 1
        return batch, finished

    def _empty_step(self, batch: ScheduledBatch) -> list[Sequence]:
        """A batch with nothing to compute: an idle engine, the last tokens all in flight, or a step that
        only preempted. Finishes the step in flight; only a preemption is a step of its own, announced
        begin to end at once (there is no forward pass)."""
        finished = self._collect() if self._pending is not None else []
        if batch.preempted:
            step = self.num_steps
            if hooks.enabled:
                hooks.emit(hooks.STEP_BEGIN, None, step=step, batch=batch, engine=self)
                hooks.emit(hooks.STEP_LAUNCHED, None, step=step, batch=batch, engine=self, graphed=False)
                hooks.emit(hooks.STEP_END, None, step=step, batch=batch, sampled=[], finished=[], engine=self)
            self.num_steps += 1
        return finished

    def _overlap(self) -> bool:
        on = self.config.async_scheduling
        return (self.device.type == "cuda" if on is None else on) and (not hooks.enabled or hooks.overlap)

    def _launch(self, batch: ScheduledBatch, step: int) -> _InFlight:
        prev = self._pending.tokens if self._pending is not None else None
        tokens = self.runner.launch(batch, step, prev)
        rows = self.scheduler.launched(batch)
        row_of = {seq.seq_id: i for i, seq in enumerate(batch.seqs)}
        if tokens.is_cuda:  # copy to pinned memory behind the GPU work, with an event to wait on
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = tokens, None
        if hooks.enabled:
            hooks.emit(hooks.STEP_LAUNCHED, None, step=step, batch=batch, engine=self, graphed=self.runner.graphed)
        return _InFlight(PendingTokens(tokens, row_of), rows, host, done, batch, step, hooks.enabled)

    def _collect(self) -> list[Sequence]:
        """Wait for the step in flight's tokens (only for that step, not the one launched after it)."""
        pending, self._pending = self._pending, None
        if pending.done is not None:
            pending.done.synchronize()
        tokens = pending.host.tolist()
        finished = self.scheduler.confirm(pending.rows, [t for t in tokens if t >= 0])
        if hooks.enabled and pending.announced:  # listeners that saw it begin see it end
            hooks.emit(hooks.STEP_END, None, step=pending.step, batch=pending.batch,
                       sampled=[t if t >= 0 else None for t in tokens], finished=finished, engine=self)
        return finished


@dataclass
class _InFlight:
    """A launched step whose tokens have not been read yet."""

    tokens: PendingTokens
    rows: list[tuple[Sequence, int]]  # sampling sequences and the index of their placeholder
    host: torch.Tensor  # the tokens, copied to host memory once ``done`` fires
    done: torch.cuda.Event | None
    batch: ScheduledBatch
    step: int
    announced: bool  # step.begin was emitted for it
