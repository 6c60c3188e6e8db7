"""A debug session: generation runs in a worker thread and pauses at hook sites.

The controlling thread (the TUI, a test, a notebook) calls ``step()``, ``next_layer()``,
``next_site()``, ``continue_()`` or ``stop()``; the worker blocks inside the hook until told to
go on, the way a debugger holds a thread at a breakpoint. Every step is recorded (statistics,
shadow attention) by a ``Recorder``, and can also be written to a trace folder on demand.
"""

from __future__ import annotations

import fnmatch
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from minillama import hooks
from minillama.debug.recorder import Recorder, site_layer
from minillama.sampling_params import SamplingParams

_LAYER_END = re.compile(r"layers\.\d+\.output$")


class SessionStopped(Exception):
    """Raised inside the worker to abandon the step in progress when the session stops."""


@dataclass
class Breakpoint:
    """Pause at sites matching ``pattern`` (fnmatch; "step" = each step start), if ``condition`` holds.

    Conditions: None (always), "nan" (a NaN or Inf in the tensor), "absmax" (absmax > value),
    "shadow" (at ``layers.N.attn.call``: shadow backend differs by more than value).
    """

    pattern: str = "*"
    condition: str | None = None
    value: float = 0.0
    enabled: bool = True

    def matches(self, site: str) -> bool:
        name = "step" if site == "step.begin" else site
        return self.enabled and fnmatch.fnmatchcase(name, self.pattern)

    def describe(self) -> str:
        cond = {None: "", "nan": " if NaN/Inf", "absmax": f" if absmax > {self.value:g}",
                "shadow": f" if shadow diff > {self.value:g}"}[self.condition]
        return f"{self.pattern}{cond}"


@dataclass
class Position:
    """Where the worker is paused."""

    step: int
    site: str
    layer: int | None
    reason: str  # "step", "layer", "site" or "breakpoint: ..."


class DebugSession:
    def __init__(self, llm, *, shadow: str | None = None, full_sites: tuple[str, ...] = (),
                 breakpoints: list[Breakpoint] | None = None, pause_at_start: bool = True,
                 keep_steps: int = 32) -> None:
        self.llm = llm
        self.recorder = Recorder(llm, shadow=shadow, full_sites=full_sites, keep_events=True)
        self.breakpoints = list(breakpoints or [])
        self.keep_steps = keep_steps
        self.position: Position | None = None
        self.error: BaseException | None = None
        self.on_pause: Callable[[Position], None] | None = None
        self.on_event: Callable[[str, Any], None] | None = None
        self.requests: dict[int, Any] = {}  # seq_id -> Sequence
        self._tensors: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()  # step -> site -> tensor
        self._step = -1
        self._mode = "step" if pause_at_start else "continue"
        self._paused = False
        self._stop = False
        self._idle = False
        self._pending: list[tuple[Any, SamplingParams]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._writer = None

    # ---- controls (any thread) ----------------------------------------------------------------
    def start(self) -> DebugSession:
        self._thread = threading.Thread(target=self._run, name="minillama-debug", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = True) -> None:
        """Queue a request; it joins the batch at the next step boundary."""
        if chat and isinstance(prompt, str):
            prompt = self.llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        with self._cond:
            self._pending.append((prompt, params or SamplingParams(temperature=0, max_tokens=64)))
            self._cond.notify_all()

    def _resume(self, mode: str) -> None:
        with self._cond:
            self._mode = mode
            self._paused = False
            self._cond.notify_all()

    def step(self) -> None:
        """Run to the start of the next scheduler step."""
        self._resume("step")

    def next_layer(self) -> None:
        """Run to the end of the next decoder layer (or the next step)."""
        self._resume("layer")

    def next_site(self) -> None:
        """Run to the next hook site."""
        self._resume("site")

    def continue_(self) -> None:
        """Run until a breakpoint fires (or the work runs out)."""
        self._resume("continue")

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._paused = False
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.stop_recording()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def idle(self) -> bool:
        """True when the worker has nothing to do (all requests finished)."""
        return self._idle

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until the worker is paused, idle or dead; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._paused or self._idle or self.error is not None
                                       or (self._thread is not None and not self._thread.is_alive()), timeout)

    def toggle_breakpoint(self, pattern: str) -> bool:
        """Add an unconditional breakpoint on ``pattern``, or remove it; returns True if now set."""
        for bp in self.breakpoints:
            if bp.pattern == pattern and bp.condition is None:
                self.breakpoints.remove(bp)
                return False
        self.breakpoints.append(Breakpoint(pattern))
        return True

    # ---- recording ----------------------------------------------------------------------------
    def start_recording(self, path: str, max_bytes: int | None = None) -> None:
        """Write every following step to a trace folder (``minillama.trace`` format)."""
        from minillama.trace.cli import build_manifest
        from minillama.trace.writer import TraceWriter

        self._writer = TraceWriter(path, build_manifest(self.llm, prompts=[], params=None,
                                                        shadow=self.recorder.shadow and self.recorder.shadow.name,
                                                        full_sites=self.recorder.full_sites), max_bytes)
        self.recorder.sink = self._writer

    def stop_recording(self) -> None:
        if self._writer is not None:
            self.recorder.sink = None
            self._writer.close("recording switched off")
            self._writer = None

    @property
    def recording(self) -> bool:
        return self._writer is not None

    # ---- what happened ------------------------------------------------------------------------
    @property
    def events(self) -> list[dict[str, Any]]:
        """Finished steps' events (the same dicts a trace stores)."""
        return self.recorder.events

    @property
    def current_event(self) -> dict[str, Any] | None:
        """The event of the step in progress (partial), if paused inside one."""
        return self.recorder._event

    def tensor(self, step: int, site: str) -> torch.Tensor | None:
        """A site's tensor from one of the last ``keep_steps`` steps."""
        return self._tensors.get(step, {}).get(site)

    # ---- the worker ---------------------------------------------------------------------------
    def __call__(self, site: str, tensor: torch.Tensor | None, info: dict[str, Any]) -> None:
        if self._stop:
            raise SessionStopped
        self.recorder(site, tensor, info)
        if site.endswith(".attn.call"):  # keep the shadow/reference outputs beside the active one
            base = f"layers.{site_layer(site)}.attn.out"
            for key in (f"{base}@shadow", f"{base}@ref"):
                t = self.recorder._tensors.get(key)
                if t is not None:
                    self._tensors.setdefault(self._step, {})[key] = t
        if site == "step.begin":
            self._step = info["step"]
            self._tensors[self._step] = {}
            while len(self._tensors) > self.keep_steps:
                self._tensors.popitem(last=False)
        elif tensor is not None and site != "step.end" and not site.endswith(".attn.call"):
            self._tensors.setdefault(self._step, {})[site] = tensor
        reason = self._pause_reason(site, tensor)
        if reason:
            self._pause(Position(self._step, site, site_layer(site), reason))

    def _pause_reason(self, site: str, tensor: torch.Tensor | None) -> str | None:
        for bp in self.breakpoints:
            if bp.matches(site) and self._condition_holds(bp, site, tensor):
                return f"breakpoint: {bp.describe()}"
        mode = self._mode
        if site == "step.begin" and mode in ("step", "layer", "site"):
            return mode
        if mode == "layer" and (_LAYER_END.match(site) or site == "logits"):
            return "layer"
        if mode == "site" and tensor is not None and site not in ("step.end",) and not site.endswith(".attn.call"):
            return "site"
        return None

    def _condition_holds(self, bp: Breakpoint, site: str, tensor: torch.Tensor | None) -> bool:
        if bp.condition is None:
            return True
        if bp.condition == "shadow":
            ev = self.recorder._event or {}
            m = ev.get("shadow", {}).get(str(site_layer(site)), {})
            return m.get("max_abs", m.get("err_active", 0.0)) > bp.value
        if tensor is None or not tensor.is_floating_point():
            return False
        if bp.condition == "nan":
            return not bool(torch.isfinite(tensor).all())
        if bp.condition == "absmax":
            return float(tensor.detach().abs().max()) > bp.value
        raise ValueError(f"unknown breakpoint condition {bp.condition!r}: use nan, absmax or shadow")

    def _pause(self, pos: Position) -> None:
        with self._cond:
            self.position = pos
            self._paused = True
            self._cond.notify_all()
        if self.on_pause is not None:
            self.on_pause(pos)
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self._stop)
            if self._stop:
                raise SessionStopped

    def _emit(self, kind: str, data: Any = None) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)

    def _run(self) -> None:
        hooks.attach(self)
        try:
            while True:
                with self._cond:
                    if self._stop:
                        break
                    for prompt, params in self._pending:
                        seq = self.llm.add_request(prompt, params)
                        self.requests[seq.seq_id] = seq
                    self._pending.clear()
                    if not self.llm.has_unfinished():
                        self._idle = True
                        self._cond.notify_all()
                        idle_now = True
                    else:
                        idle_now = False
                if idle_now:
                    self._emit("idle")
                    with self._cond:
                        self._cond.wait_for(lambda: self._pending or self._stop)
                        self._idle = False
                    continue
                _, finished = self.llm.step()
                self._emit("step", self.events[-1] if self.events else None)
                for seq in finished:
                    self._emit("finished", seq)
        except SessionStopped:
            pass
        except Exception as e:  # shown by the UI; the session ends
            self.error = e
            self._emit("error", e)
        finally:
            hooks.detach(self)
            with self._cond:
                self._paused = False
                self._cond.notify_all()
