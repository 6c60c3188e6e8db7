"""Errors raised while loading a model or its tokenizer (and the JSON read that raises them)."""

from __future__ import annotations

import json
from typing import Any


class ModelLoadError(ValueError):
    """A model, config or tokenizer file cannot be used.

    The message is always one line that names the file, the problem and the fix, so the CLI and the
    TUI can print it as is instead of a traceback.
    """


class ChatFormatError(ValueError):
    """A chat conversation is not a list of ``{"role", "content"}`` messages with known roles."""


def read_json(path: str, what: str) -> Any:
    """Parse a JSON file; a missing or broken one is a ``ModelLoadError`` naming ``what`` it is."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{what} {path} is missing: the model folder is incomplete, copy it again") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}): "
                             "copy the model folder again") from None
