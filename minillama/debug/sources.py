"""What a debugger front end opens: a recorded trace, or a live session it can submit to and restart.

``check_options`` rejects a bad ``--backend`` / ``--shadow`` / ``--device`` in one line before any
model is loaded. ``LiveRun`` owns a ``DebugSession`` on an engine and survives its errors: the
request that broke a step is failed alone (``recover``), a new session goes on with the others on
the same engine, and ``ChainTimeline`` keeps every session's history as one timeline.
``submit_check`` refuses a prompt that cannot run (empty, too long, more KV blocks than exist).
Requests the engine itself fails (``engine.guard``) finish with reason "error" like any other.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from minillama.debug.chain import ChainTimeline

DEFAULT_PROMPTS = ("What is the capital of France?", "What is the capital of Italy?",
                   "Write a haiku about a paged KV cache.")
#: Full tensors a live session keeps (and records), so the attention and inspector views have values.
DEFAULT_FULL_SITES = ("layers.*.attn.q", "layers.*.attn.k", "layers.*.attn.out", "layers.*.attn.out@*",
                      "logits")


class OptionError(ValueError):
    """A command-line choice that cannot work here; the message names it and the fix."""


@dataclass
class LiveOptions:
    """What a live session starts with."""

    model: str | None = None
    backend: str = "torch"
    device: str = "auto"
    shadow: str | None = None
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_tokens: int = 32
    temperature: float = 0.0
    max_num_batched_tokens: int = 64
    num_kvcache_blocks: int = 64
    max_model_len: int = 1024
    full_sites: tuple[str, ...] = DEFAULT_FULL_SITES


def check_options(opts: LiveOptions) -> None:
    """Raise ``OptionError`` for a device, backend or shadow that cannot run here (before loading a model)."""
    import torch

    from minillama.attention import BackendError, get_backend
    from minillama.engine.llm_engine import resolve_device, resolve_dtype

    for name in ("max_tokens", "max_num_batched_tokens", "num_kvcache_blocks", "max_model_len"):
        if getattr(opts, name) <= 0:
            raise OptionError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(opts, name)}")
    try:
        device = resolve_device(opts.device)
    except (ValueError, RuntimeError) as e:
        raise OptionError(f"--device {opts.device}: {e}") from None
    dtype = resolve_dtype("auto", device)
    for flag, name in (("--backend", opts.backend), ("--shadow", opts.shadow)):
        if name is None or (flag == "--shadow" and name == "reference"):
            continue
        try:
            get_backend(name).check(64, dtype, device)
        except BackendError as e:
            if str(e).startswith("unknown attention backend"):
                raise OptionError(f"{flag} {name}: {e}") from None
            reason = str(e).rsplit(": ", 1)[0]  # "problem: fix" -> the problem; the fix names this flag
            fix = ("use --backend torch" if flag == "--backend" else
                   "use --shadow torch, or --shadow alone for the float64 reference")
            where = ", or run on a CUDA GPU (--device cuda)" if device.type != "cuda" and (
                "CUDA" in reason or "flash" in reason) else ""
            raise OptionError(f"{flag} {name}: {reason}: {fix}{where}") from None
    if device.type == "cuda" and not torch.cuda.is_available():  # resolve_device already says so; be sure
        raise OptionError("--device cuda: no CUDA GPU is usable here: use --device cpu")


def submit_check(llm: Any, token_ids: list[int], max_tokens: int) -> None:
    """Raise ``RequestError`` (one line) for a prompt the engine could never run, before it is queued (empty,
    longer than max_model_len, more KV blocks than the cache has: ``LLMEngine.check_prompt``)."""
    llm.check_prompt(token_ids, max_tokens)


def open_trace(path: str):
    """A ``TraceTimeline`` over ``path`` (raises ``TraceError`` with a one-line reason)."""
    from minillama.debug.timeline import TraceTimeline
    from minillama.trace.reader import TraceReader

    return TraceTimeline(TraceReader(path))


def load_engine(opts: LiveOptions):
    """The engine ``opts`` asks for (blocking: seconds; call it from a worker thread)."""
    from minillama import LLM

    check_options(opts)
    return LLM(opts.model, backend=opts.backend, device=opts.device, max_model_len=opts.max_model_len,
               max_num_batched_tokens=opts.max_num_batched_tokens, num_kvcache_blocks=opts.num_kvcache_blocks)


class LiveRun:
    """A restartable live session over one engine; ``timeline`` spans every session it ran."""

    def __init__(self, llm: Any, opts: LiveOptions) -> None:
        self.llm, self.opts = llm, opts
        self.session = self._new_session()
        self.timeline = ChainTimeline(self.session)

    def _new_session(self):
        from minillama.debug.session import DebugSession

        full = self.opts.full_sites
        if full == DEFAULT_FULL_SITES and self.opts.shadow is None:  # no shadow: no @shadow / @ref outputs to keep
            full = tuple(p for p in full if "@" not in p)
        session = DebugSession(self.llm, shadow=self.opts.shadow, full_sites=full, pause_at_start=True)
        graph_copies(session.recorder)
        return session

    def params(self):
        """The sampling parameters of typed prompts."""
        from minillama import SamplingParams

        return SamplingParams(temperature=self.opts.temperature, max_tokens=self.opts.max_tokens)

    def submit(self, prompt: str | list[int]) -> list[int]:
        """Check and queue a prompt (chat template for text); returns its token ids. ``RequestError`` if refused."""
        if isinstance(prompt, str):
            if not prompt.strip():
                from minillama.engine.llm_engine import RequestError

                raise RequestError("the prompt is empty: type some text first")
            ids = self.llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = list(prompt)
        submit_check(self.llm, ids, self.opts.max_tokens)
        self.session.submit(ids, self.params())
        return ids

    def restart(self, fail: dict[int, str] | None = None):
        """Stop the current session, fail the requests in ``fail`` (seq id -> reason) alone, and start a new
        session that goes on with the others, paused at its first step. Returns the new session."""
        old = self.session
        old.on_pause = old.on_event = None
        old.stop()
        known = {}
        for sid, why in (fail or {}).items():
            seq = abort_request(self.llm, sid, why)
            if seq is not None:
                ids = seq.token_ids[: seq.num_prompt_tokens]
                known[sid] = {"reason": why, "prompt_token_ids": ids,
                              "prompt": self.llm.tokenizer.decode(ids, skip_special_tokens=False) or None}
        self.llm._pending = None  # an overlapped step in flight died with the old session
        self.session = self._new_session()
        self.timeline.add(self.session, known)
        return self.session


def graph_copies(recorder: Any) -> None:
    """Give ``recorder`` the buffers its copies of full sites write to inside CUDA graphs.

    ``Recorder.attach`` makes them before capturing the decode graphs; a ``DebugSession`` attaches
    itself instead (and captures the graphs when it starts), so without these a decode step that
    replays a graph keeps none of its full tensors (attention q, k, out) for the views.
    """
    import torch

    graphs = getattr(recorder.llm.runner, "graphs", None)
    if graphs is None:
        return
    for spec in recorder.catalog:
        if spec.rows == "tokens" and recorder.is_full(spec.name) and spec.name not in recorder._static:
            recorder._static[spec.name] = torch.empty((graphs.sizes[-1], *spec.shape), dtype=getattr(torch, spec.dtype),
                                                      device=recorder.llm.device)


def culprits(session: Any, error: BaseException) -> dict[int, str]:
    """The requests to fail for an engine error: those the message names, else those that joined the failing
    step, else every request of that step (seq id -> one-line reason)."""
    why = (str(error).strip().splitlines() or [type(error).__name__])[0]
    why = f"{type(error).__name__}: {why}"
    running = {s.seq_id for s in (*session.llm.scheduler.running, *session.llm.scheduler.waiting)}
    named = {int(m) for m in re.findall(r"request (\d+)", str(error))} & running
    if named:
        return {sid: why for sid in named}
    open_steps = list(session.recorder._open.values())
    seqs = open_steps[-1].raw["seqs"].tolist() if open_steps else []  # rows of trace.batch.SEQ_COLUMNS
    joined = [s[0] for s in seqs if s[3] == 0 or s[3] == s[5]]  # num_computed == 0 or == prefix-cache hit
    return {sid: why for sid in (joined or [s[0] for s in seqs])}


def abort_request(llm: Any, seq_id: int, reason: str) -> Any:
    """Retire request ``seq_id`` with finish reason "error" (``Scheduler.fail``: its blocks freed); returns its
    ``Sequence`` (None: it is not running or waiting)."""
    sched = llm.scheduler
    for seq in (*sched.running, *sched.waiting):
        if seq.seq_id == seq_id:
            sched.fail(seq, reason)
            return seq
    return None


class Locked:
    """A timeline whose every call holds one lock (``.lock``): trace readers keep caches that are not
    thread-safe, and views read from worker threads too."""

    def __init__(self, tl: Any) -> None:
        self.inner = tl
        self.lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return attr(*args, **kwargs)

        return call
