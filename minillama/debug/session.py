"""A debug session: generation runs in a worker thread and pauses at hook sites.

The controlling thread (the TUI, a test, a notebook) calls ``step()``, ``next_layer()``,
``next_site()``, ``continue_()`` or ``stop()``; the worker blocks inside the hook until told to
go on, the way a debugger holds a thread at a breakpoint. Every step is recorded by a ``Recorder``
(per-request statistics on the device, the shadow attention) and can be written to a trace.

The session runs the engine as fast as what it is asked allows (its ``hook_mode``): pausing inside
a step (``next_layer``, ``next_site``, a breakpoint on a site) needs an eager step; pausing at each
step start needs synchronous steps; ``continue_()`` with only conditional breakpoints (NaN/Inf,
absmax, shadow over budget) runs at full speed, CUDA graphs and overlapped steps included, and
checks the conditions on each finished step's statistics: when one fires it pauses at the end of
that step, naming the first site where it fired.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from minillama import hooks
from minillama.debug.breakpoints import Breakpoint
from minillama.debug.recorder import Recorder
from minillama.debug.records import batch_summary, decode_tables, step_counts
from minillama.debug.snapshot import views
from minillama.engine.llm_engine import RequestError
from minillama.sampling_params import SamplingParams
from minillama.trace.tables import layer_metrics

__all__ = ["Breakpoint", "DebugSession", "Position", "SessionStopped"]

_LAYER_END = re.compile(r"layers\.\d+\.output$")


class SessionStopped(Exception):
    """Raised inside the worker to abandon the step in progress when the session stops."""


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
                 keep_steps: int = 256) -> None:
        self.llm = llm
        self.recorder = Recorder(llm, shadow=shadow, full_sites=full_sites, history=keep_steps)
        self.recorder.on_record = self._on_record
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
        self._pending: list[tuple[list[int], SamplingParams]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._writer = None

    # ---- how the engine may run ----------------------------------------------------------------
    @property
    def hook_mode(self) -> str:
        """``eager`` to pause inside steps, ``step`` to pause at step starts, else ``device`` (full speed)."""
        if self._mode in ("layer", "site") or any(bp.needs_site_pause for bp in self.breakpoints):
            return "eager"
        if self._mode == "step" or any(bp.enabled and bp.pattern == "step" for bp in self.breakpoints):
            return "step"
        return "device"

    # ---- controls (any thread) ----------------------------------------------------------------
    def start(self) -> DebugSession:
        self._thread = threading.Thread(target=self._run, name="minillama-debug", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = True) -> None:
        """Queue a request; it joins the batch at the next step boundary. Raises ``RequestError`` (one
        line, the session unharmed) for a prompt the engine cannot take, e.g. longer than max_model_len."""
        if isinstance(prompt, str):
            tok = self.llm.tokenizer
            prompt = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
        self.llm.check_prompt(list(prompt), (params or SamplingParams()).max_tokens)
        with self._cond:
            self._pending.append((list(prompt), params or SamplingParams(temperature=0, max_tokens=64)))
            self._cond.notify_all()

    def _resume(self, mode: str) -> None:
        with self._cond:
            self._mode = mode
            hooks.refresh()
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
    def num_pending(self) -> int:
        """Requests submitted that join the batch at the next step boundary."""
        with self._cond:
            return len(self._pending)

    @property
    def idle(self) -> bool:
        """True when the worker has nothing to do (all requests finished)."""
        return self._idle

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until the worker is paused, idle or dead; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._paused or self._idle or self.error is not None
                                       or (self._thread is not None and not self._thread.is_alive()), timeout)

    def add_breakpoint(self, bp: Breakpoint) -> None:
        self.breakpoints.append(bp)
        hooks.refresh()

    def clear_breakpoints(self) -> None:
        self.breakpoints.clear()
        hooks.refresh()

    def toggle_breakpoint(self, pattern: str) -> bool:
        """Add an unconditional breakpoint on ``pattern``, or remove it; returns True if now set."""
        for bp in self.breakpoints:
            if bp.pattern == pattern and bp.condition is None:
                self.breakpoints.remove(bp)
                hooks.refresh()
                return False
        self.add_breakpoint(Breakpoint(pattern))
        return True

    # ---- recording ----------------------------------------------------------------------------
    def start_recording(self, path: str, max_bytes: int | None = None) -> None:
        """Write every following step to a trace folder (``minillama.trace`` format)."""
        from minillama.debug.manifest import build_manifest
        from minillama.debug.writer_process import trace_sink
        from minillama.trace.writer import TraceWriter

        manifest = build_manifest(self.llm, self.recorder, max_bytes=max_bytes)
        # not waiting for a writer process to start: a UI calls this on its own thread
        self._writer = trace_sink(TraceWriter(path, manifest, max_bytes), self.recorder, wait=False)
        self.recorder.set_sink(self._writer)

    def stop_recording(self) -> None:
        """Stop writing; what was queued is written first, then the trace's end line."""
        writer, self._writer = self._writer, None
        if writer is not None:
            self.recorder.set_sink(None)
            writer.close("recording switched off")
            self.recorder.sink_closed()

    @property
    def recording(self) -> bool:
        return self._writer is not None and not self._writer.stopped

    # ---- what happened ------------------------------------------------------------------------
    @property
    def events(self) -> list[dict[str, Any]]:
        """Finished steps' events still in the history (the same dicts a trace stores)."""
        return [self.recorder.event_of(rec) for rec in list(self.recorder.history)]

    @property
    def current_event(self) -> dict[str, Any] | None:
        """The step in progress (its batch), if paused inside one."""
        st = self.recorder._open.get(self._step)
        if st is None or not self._paused:
            return None
        return {"type": "step", "step": st.step, "phase": st.raw["phase"], "batch": batch_summary(st.raw),
                "prompts": st.prompts, "sampled": {}, "finished": [], "in_progress": True}

    def peek_tables(self) -> dict[str, Any] | None:
        """The statistics of the step in progress so far (only while paused inside it)."""
        st = self.recorder._open.get(self._step)
        if st is None or not self._paused or not st.ok:
            return None
        buf = self.recorder.buffer
        buf.finish(st.reqs, step_counts(st.raw), clear=False)  # the step goes on: its sums stay
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)
        raw = views(buf.finished[: st.reqs].cpu().numpy(), buf.rows[: max(st.rows, st.samples)].cpu().numpy(),
                    buf.num_sites, buf.shadow_shape)
        return decode_tables(raw, self.recorder.shadow is not None)

    def tensor(self, step: int, site: str) -> torch.Tensor | None:
        """A site's tensor from one of the last steps that ran eagerly (paused inside), or a full site."""
        t = self._tensors.get(step, {}).get(site)
        if t is None:
            for rec in self.recorder.history:
                if rec.step == step:
                    return rec.full.get(site)
        return t

    # ---- the worker ---------------------------------------------------------------------------
    def graphs_captured(self) -> None:
        """CUDA graphs were captured with the recorder's work inside: let it finish their setup."""
        self.recorder.graphs_captured()

    def __call__(self, site: str, tensor: torch.Tensor | None, info: dict[str, Any]) -> None:
        if hooks.capturing:  # graph capture: only the recorder's device work belongs there
            self.recorder(site, tensor, info)
            return
        if self._stop:
            raise SessionStopped
        self.recorder(site, tensor, info)
        if site == hooks.STEP_BEGIN:
            self._step = info["step"]
            self._tensors[self._step] = {}
            while len(self._tensors) > 8:
                self._tensors.popitem(last=False)
        elif hooks.eager and tensor is not None and site not in hooks.STEP_EVENTS:
            kept = self._tensors.setdefault(self._step, {})
            if site.endswith(hooks.ATTN_CALL):  # the shadow's outputs, beside the active one's
                base = hooks.layer_site(hooks.site_layer(site), "attn.out")
                for name, t in self.recorder.last_attention.items():
                    kept[f"{base}@{name}"] = t
            else:
                kept[site] = tensor
        reason = self._pause_reason(site, tensor)
        if reason:
            self._pause(Position(self._step, site, hooks.site_layer(site), reason))

    def _pause_reason(self, site: str, tensor: torch.Tensor | None) -> str | None:
        if site in (hooks.STEP_LAUNCHED, hooks.STEP_END):
            return None
        for bp in self.breakpoints:
            if not bp.matches(site):
                continue
            if bp.condition is None or (hooks.eager and self._holds_here(bp, site, tensor)):
                return f"breakpoint: {bp.describe()}"
        mode = self._mode
        if site == hooks.STEP_BEGIN and mode in ("step", "layer", "site"):
            return mode
        if mode == "layer" and (_LAYER_END.match(site) or site == "logits"):
            return "layer"
        if mode == "site" and tensor is not None and site != hooks.STEP_BEGIN and not site.endswith(hooks.ATTN_CALL):
            return "site"
        return None

    def _holds_here(self, bp: Breakpoint, site: str, tensor: torch.Tensor | None) -> bool:
        """A condition checked on the tensor in hand (eager steps only; device steps check at the end)."""
        if bp.condition != "shadow":
            return bp.holds_on_tensor(tensor)
        layer = hooks.site_layer(site)
        st = self.recorder._cur
        if layer is None or self.recorder.shadow is None or st is None or not site.endswith("attn.out"):
            return False
        table = self.recorder.buffer.shadow[: st.reqs].cpu().numpy()
        per_row = tensor[0].numel() if tensor is not None and tensor.shape[0] else 1
        rec = layer_metrics(table, batch_summary(st.raw), layer, per_row, str(self.llm.dtype).removeprefix("torch."),
                            self.recorder.shadow.backend is not None)
        return bp.holds_on_shadow(rec)

    def _on_record(self, rec) -> None:
        """A step finished: check conditional breakpoints on its statistics (steps that ran at speed)."""
        armed = [bp for bp in self.breakpoints if bp.enabled and bp.condition]
        if self._stop or hooks.eager or not armed:
            return
        if rec.snapshot is None:
            return  # statistics skipped for this step (the batch was larger than the tables)
        if all(bp.condition == "nan" for bp in armed) and not rec.snapshot.any_bad():
            return  # the common case of "continue to the next NaN", without decoding the tables
        event = {**rec.event, "batch": rec.rows()}  # the row layout is all the conditions need
        tables = rec.tables(self.recorder.shadow is not None)
        catalog = [s.to_json() for s in self.recorder.catalog]
        dtype = str(self.llm.dtype).removeprefix("torch.")
        backend = self.recorder.shadow is not None and self.recorder.shadow.backend is not None
        for bp in armed:
            site = bp.first_hit(event, tables, catalog, dtype, backend)
            if site:
                self._pause(Position(rec.step, site, hooks.site_layer(site), f"breakpoint: {bp.describe()}"))
                return

    def _pause(self, pos: Position) -> None:
        # sites held for one launch (the step ran at speed until a UI thread asked for a pause) are
        # launched first, so a view of the step so far sees them
        self.recorder.stats.flush()
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

    def _admit(self) -> None:
        for prompt, params in self._pending:
            try:
                seq = self.llm.add_request(prompt, params)
            except RequestError as e:  # refused alone; the session goes on
                self._emit("rejected", str(e))
                continue
            self.requests[seq.seq_id] = seq
        self._pending.clear()

    def _run(self) -> None:
        hooks.attach(self)
        try:
            graphs = getattr(self.llm.runner, "graphs", None)
            if graphs is not None:
                graphs.capture()  # inside the try: a failed capture is shown, not a silent dead thread
            while True:
                with self._cond:
                    if self._stop:
                        break
                    self._admit()
                    idle_now = not self.llm.has_unfinished()
                    self._idle = idle_now
                    if idle_now:
                        self._cond.notify_all()
                if idle_now:
                    self._emit("idle")
                    with self._cond:
                        self._cond.wait_for(lambda: self._pending or self._stop)
                        self._idle = False
                    continue
                hooks.refresh()
                _, finished = self.llm.step()
                history = self.recorder.history
                self._emit("step", history[-1] if history else None)
                for seq in finished:
                    self._emit("finished", seq)
        except SessionStopped:
            pass
        except Exception as e:  # shown by the UI; the session ends
            self.error = e
            self._emit("error", e)
        finally:
            hooks.detach(self)
            self.recorder.stats.begin_pass()  # a step abandoned mid-pass leaves no held tensors behind
            with self._cond:
                self._paused = False
                self._cond.notify_all()
