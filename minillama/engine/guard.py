"""Guards around the engine: prompts checked before they are queued, and a step that raised.

A step that raised retires the request(s) that broke it with finish reason "error" and keeps the rest.

Nothing of a step that raised has been accounted yet (no token appended, no block committed), so
the requests that are not to blame simply stay where they were and run again. Whoever is failed
has its KV blocks freed by ``Scheduler.fail``, so one bad request never holds the cache or makes
every later ``generate()`` fail.
"""

from __future__ import annotations

import logging
import numbers
from typing import TYPE_CHECKING, Any

from minillama import hooks
from minillama.context import reset_context
from minillama.engine.scheduler import ScheduledBatch, Scheduler
from minillama.engine.sequence import Sequence

if TYPE_CHECKING:
    from minillama.engine.model_runner import ModelRunner

logger = logging.getLogger("minillama.engine")


class RequestError(ValueError):
    """A request the engine cannot serve (too long, empty); the message says how to fix it."""


def prompt_token_ids(tokenizer: Any, prompt: object) -> list[int]:
    """Token ids of a prompt (text is tokenised); ``RequestError`` for anything else than text or ids."""
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. a non-UTF-8 command-line argument (surrogate escapes)
            raise RequestError(f"the prompt is not valid UTF-8 text (bad character at position {e.start}): "
                               "pass UTF-8 text") from None
        return tokenizer.encode(prompt)
    try:
        ids = None if isinstance(prompt, bytes | dict) else list(prompt)  # type: ignore[call-overload]
    except TypeError:
        ids = None
    if ids is None or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"a prompt must be a string or a list of integer token ids, got {type(prompt).__name__}")
    return [int(t) for t in ids]


def one_line(error: BaseException) -> str:
    """``TypeName: first line of the message``: what a failed request reports."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def invalid(seq: Sequence) -> str | None:
    """Why ``seq``'s sampling settings no longer validate (changed after it was queued), or None."""
    try:
        seq.sampling_params.validate()
    except Exception as e:
        return one_line(e)
    return None


def _note(error: Exception) -> None:
    # INFO, not WARNING: Python's last-resort handler would print the traceback on the user's terminal
    logger.info("a step failed: %s", one_line(error), exc_info=error)
    reset_context()


def fail_requests(scheduler: Scheduler, batch: ScheduledBatch, error: Exception) -> list[Sequence]:
    """Overlapped steps: fail the requests of ``batch`` whose settings no longer validate, or every
    request of the batch when none stands out (the error is then not any one request's)."""
    _note(error)
    culprits = [(s, why) for s in batch.seqs if (why := invalid(s)) is not None]
    for seq, why in culprits or [(s, one_line(error)) for s in batch.seqs]:
        scheduler.fail(seq, why)
    return [s for s, _ in culprits] or list(batch.seqs)


def run_apart(scheduler: Scheduler, runner: ModelRunner, step: int, batch: ScheduledBatch, error: Exception
              ) -> tuple[ScheduledBatch, list[int | None], list[Sequence]]:
    """Synchronous steps: fail invalid requests, run every other one alone as engine step ``step`` (its
    KV slots are written again with the same values) and fail those that still raise.

    Returns the batch that ran, its sampled tokens and the failed requests. A seeded request that
    is run again may draw from its generator twice in this step. With a hook listener attached
    (the debugger) an error no request's settings explain is raised as before.
    """
    reasons = [invalid(s) for s in batch.seqs]
    if hooks.enabled and not any(reasons):
        # A debugger is attached and no request is to blame: the error is most likely its listener's
        # or the engine's, which is what it wants to see (and re-running would repeat hook sites).
        raise error
    _note(error)
    kept, sampled, failed = ScheduledBatch([], []), [], []
    alone = len(batch.seqs) == 1
    for seq, n, why in zip(batch.seqs, batch.num_new_tokens, reasons, strict=True):
        why = why or (one_line(error) if alone else None)
        if why is None:
            try:
                token = runner.run(ScheduledBatch([seq], [n]), step)[0]
            except Exception as e:
                reset_context()
                why = one_line(e)
        if why is not None:
            scheduler.fail(seq, why)
            failed.append(seq)
            continue
        kept.seqs.append(seq)
        kept.num_new_tokens.append(n)
        sampled.append(token)
    return kept, sampled, failed
