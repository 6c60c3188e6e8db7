"""Errors raised while loading a model or its tokenizer."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model, config or tokenizer file cannot be used.

    The message is always one line that names the file, the problem and the fix, so the CLI and the
    TUI can print it as is instead of a traceback.
    """


class ChatFormatError(ValueError):
    """A chat conversation is not a list of ``{"role", "content"}`` messages with known roles."""
