"""Checks on chat messages before a template renders them (a template silently drops what it does not know)."""

from __future__ import annotations

from typing import Any

from minillama.models.errors import ChatFormatError

#: Roles Llama-family chat templates render: the OpenAI four, ``ipython`` (Llama 3.1's tool
#: results) and ``developer`` (newer OpenAI-style system messages).
CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")


def check_messages(messages: Any) -> None:
    """Raise ``ChatFormatError`` unless ``messages`` is a non-empty list of ``{"role", "content"}`` dicts
    with known roles and text content (``content`` may be None for an assistant's tool calls)."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ChatFormatError(f"a conversation must be a non-empty list of messages, got {type(messages).__name__}: "
                              'e.g. [{"role": "user", "content": "Hi"}]')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} is a {type(m).__name__}, not a dict: "
                                  'write it as {"role": "user", "content": "..."}')
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}, which chat templates do not know: "
                                  f"use one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if not (isinstance(content, str) or (content is None and role == "assistant" and m.get("tool_calls"))):
            raise ChatFormatError(f"message {i} ({role}) has content {type(content).__name__}, not text: "
                                  "give the message's text as a string")
