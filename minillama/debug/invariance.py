"""Does a request's result depend on what else the engine did? Run it under conditions that should not matter.

Each prompt runs once alone (the reference) and then under each condition (``conditions``): alone
again (run-to-run determinism); batched with other prompts at several batch sizes and positions;
after a prefix-cache hit on its first blocks (a run of the same prompt first); with chunked prefill
(a token budget of a third of the prompt); preempted after its second generated token and recomputed
from scratch (what the scheduler does when the KV cache runs out, prefix caching off for that run); with another KV block size; and on CUDA eagerly
instead of replaying CUDA graphs. Every run is recorded at engine speed (``Recorder``, full tensors
unless ``full=False``) and the prompt's request is diffed against the reference with
``trace.diff.diff_request``: bit-identical, or the first position and site where its computation
changed, by how much, and whether its tokens changed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from minillama.config import Config
from minillama.debug.manifest import build_manifest
from minillama.debug.recorder import Recorder
from minillama.engine.block_manager import BlockManager
from minillama.engine.llm_engine import resolve_device
from minillama.llm import LLM
from minillama.sampling_params import SamplingParams
from minillama.trace.background import BackgroundWriter
from minillama.trace.diff import RequestDiff, diff_request
from minillama.trace.reader import TraceReader
from minillama.trace.writer import TraceWriter


@dataclass(frozen=True)
class Condition:
    """One way of running the prompt that must not change its result."""

    name: str
    batch: int = 1  # requests in the batch, the prompt included
    position: int = 0  # the prompt's place among them (submission order)
    budget: int | None = None  # max_num_batched_tokens: chunked prefill
    warm: bool = False  # run the prompt once first, so that its first blocks are prefix-cache hits
    preempt_after: int | None = None  # preempt after this many generated tokens, then recompute
    block_size: int | None = None  # another KV block size (another engine)
    eager: bool = False  # no CUDA graphs


@dataclass
class Outcome:
    """One prompt under one condition."""

    prompt: int
    condition: Condition
    diff: RequestDiff | None = None
    skipped: str | None = None
    trace: str | None = None

    @property
    def identical(self) -> bool:
        return self.diff is not None and self.diff.identical and self.diff.token is None


def conditions(prompt_len: int, block_size: int, block_multiple: int, cuda: bool) -> list[tuple[Condition, str | None]]:
    """The conditions for a prompt of ``prompt_len`` tokens, each with the reason it cannot run (or None)."""
    other = block_size // 2 if block_size % (2 * block_multiple) == 0 else 2 * block_size
    budget = max(1, -(-prompt_len // 3))
    out = [(Condition("alone, again"), None),
           (Condition("batched: 2 requests, it is 1st", batch=2, position=0), None),
           (Condition("batched: 2 requests, it is 2nd", batch=2, position=1), None),
           (Condition("batched: 4 requests, it is 3rd", batch=4, position=2), None),
           (Condition(f"after a prefix-cache hit on its first {(prompt_len - 1) // block_size} block(s)", warm=True),
            None if prompt_len > block_size else f"the prompt has {prompt_len} tokens, not more than one "
                                                 f"{block_size}-token KV block"),
           (Condition(f"chunked prefill ({budget}-token budget)", budget=budget),
            None if budget < prompt_len else "the prompt is too short to chunk"),
           (Condition("preempted after 2 generated tokens, recomputed from scratch", preempt_after=2), None),
           (Condition(f"KV block size {other} (reference {block_size})", block_size=other), None),
           (Condition("eager (reference replays CUDA graphs)", eager=True),
            None if cuda else "no CUDA graphs on this device")]
    return out


def filler_prompts(n: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of seeded random token ids, of lengths around the prompt's (all different)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(max(1, prompt_len + 5 + 7 * k))] for k in range(n)]


def fresh_cache(llm: LLM) -> None:
    """Forget every prefix-cache entry (the engine must be idle): each run starts from an empty cache."""
    bm = llm.block_manager
    llm.block_manager = llm.scheduler.block_manager = BlockManager(len(bm.blocks), bm.block_size,
                                                                   llm.config.enable_prefix_caching)


def record(llm: LLM, prompts: Sequence[list[int]], params: SamplingParams, path: str, *,
           texts: Sequence[str | list[int]] | None = None, full_sites: Sequence[str] = (),
           after_step: Callable[[list], None] | None = None) -> list:
    """Run ``prompts`` to the end while recording every step into the trace folder ``path``
    (what ``minillama record`` does); ``after_step(seqs)`` runs after each step. Returns the sequences."""
    rec = Recorder(llm, full_sites=full_sites)
    seqs = [llm.add_request(p, params) for p in prompts]
    manifest = build_manifest(llm, rec, prompts=list(texts or prompts), params=params, seqs=seqs, chat=None)
    rec.set_sink(BackgroundWriter(TraceWriter(path, manifest)))
    rec.attach()
    try:
        while llm.has_unfinished():
            llm.step()
            if after_step is not None:
                after_step(seqs)
    finally:
        rec.detach()
    return seqs


class Checker:
    """Runs prompts under every condition on engines built from ``engine`` (``Config`` fields) and diffs them."""

    def __init__(self, engine: dict, out_dir: str, max_tokens: int = 8, full: bool = True) -> None:
        self.engine = dict(engine)
        self.engine.setdefault("max_num_seqs", 8)  # few CUDA graphs to capture per recording
        self.out_dir = out_dir
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.full_sites = ["*"] if full else []
        self._llms: dict[int | None, LLM] = {}
        self._runs = 0

    def llm(self, block_size: int | None = None) -> LLM:
        """The engine (one per KV block size, built on first use)."""
        if block_size not in self._llms:
            kw = dict(self.engine) if block_size is None else {**self.engine, "kvcache_block_size": block_size}
            if resolve_device(kw.get("device", "auto")).type == "cuda" and not kw.get("num_kvcache_blocks"):
                # sized from free GPU memory, a second engine would find none left: size both for the runs
                bs = kw.get("kvcache_block_size") or 256
                kw["num_kvcache_blocks"] = kw["max_num_seqs"] * -(-kw.get("max_model_len", 4096) // bs) + 8
            self._llms[block_size] = LLM(kw.pop("model", None), **kw)
        return self._llms[block_size]

    def check_prompt(self, ids: list[int]) -> None:
        """Raise the engine's one-line error for a prompt it cannot run (too long, bad ids)."""
        self.llm().check_prompt(ids)

    def run(self, ids: list[int], others: list[list[int]], cond: Condition | None, text: str | list[int]) -> tuple[str, int]:
        """Record the prompt under ``cond`` (None: the reference); returns (trace folder, its seq id)."""
        cond = cond or Condition("alone")
        llm = self.llm(cond.block_size)
        fresh_cache(llm)
        path = os.path.join(self.out_dir, f"run{self._runs:03d}")
        self._runs += 1
        batch = others[: cond.batch - 1]
        prompts = batch[: cond.position] + [ids] + batch[cond.position:]
        texts = [text if p is ids else p for p in prompts]
        saved = (llm.scheduler.max_num_batched_tokens, llm.runner.graphs, llm.config.async_scheduling)
        if cond.budget is not None:
            llm.scheduler.max_num_batched_tokens = cond.budget
        if cond.eager:
            llm.runner.graphs = None
        preempt = None
        if cond.preempt_after is not None:
            llm.config.async_scheduling = False  # no step in flight when the request is taken out
            llm.block_manager.enable_prefix_caching = False  # recompute every position, not just the last block
            preempt = _preempter(llm, cond.position, cond.preempt_after)
        try:
            if cond.warm:  # the same prompt once, unrecorded: its full blocks become prefix-cache entries
                llm.add_request(ids, replace(self.params, max_tokens=1))
                while llm.has_unfinished():
                    llm.step()
            seqs = record(llm, prompts, self.params, path, texts=texts, full_sites=self.full_sites, after_step=preempt)
        finally:
            llm.scheduler.max_num_batched_tokens, llm.runner.graphs, llm.config.async_scheduling = saved
        return path, seqs[cond.position].seq_id

    def check(self, prompts: list[list[int]], texts: Sequence[str | list[int]] | None = None,
              on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Every prompt under every condition; ``on_outcome`` sees each result as it comes."""
        texts = list(texts or prompts)
        for ids in prompts:
            self.check_prompt(ids)
        llm = self.llm()
        out = []
        for k, ids in enumerate(prompts):
            others = [p for j, p in enumerate(prompts) if j != k]
            others += filler_prompts(3, len(ids), llm.model_config.vocab_size, seed=k)
            others = [p[: llm.config.max_model_len - self.params.max_tokens - 1] for p in others]
            ref, ref_seq = self.run(ids, others, None, texts[k])
            for cond, why in conditions(len(ids), llm.config.kvcache_block_size, llm.backend.block_size_multiple,
                                        llm.device.type == "cuda"):
                if why is None:
                    path, seq = self.run(ids, others, cond, texts[k])
                    res = Outcome(k, cond, diff_request(TraceReader(ref), TraceReader(path), ref_seq, seq), trace=path)
                else:
                    res = Outcome(k, cond, skipped=why)
                out.append(res)
                if on_outcome is not None:
                    on_outcome(res)
        return out


def _preempter(llm: LLM, index: int, after: int) -> Callable[[list], None]:
    """Preempt ``seqs[index]`` once it has ``after`` generated tokens: the scheduler's own preemption
    (its blocks freed, back to the front of the queue), as when the KV cache runs out."""
    done = []

    def step(seqs: list) -> None:
        seq = seqs[index]
        if not done and not seq.is_finished and seq.num_completion_tokens >= after and seq in llm.scheduler.running:
            llm.scheduler._preempt(seq)  # noqa: SLF001 - the checker forces the scheduler's own path
            done.append(True)
    return step


def engine_config(**kw) -> dict:
    """Keep only ``Config`` fields (a typo fails here, before a model loads)."""
    fields = Config.__dataclass_fields__
    bad = [k for k in kw if k not in fields]
    if bad:
        raise ValueError(f"unknown engine setting {bad[0]!r}: use one of {', '.join(fields)}")
    return kw
