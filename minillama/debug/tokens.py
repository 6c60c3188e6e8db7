"""The text of token ids, for attention axes, top-k logits and sampled tokens, live or in replay.

Live, the engine's tokenizer decodes. A trace carries no tokenizer, only the text of each sampled
token; ``TokenText.load`` (blocking: about a second for a GGUF, call it from a worker) opens the
tokenizer of the model the manifest names, or the built-in model's when the name matches (a GPU
trace recorded elsewhere names a path that does not exist here). Until then ids read ``#1234``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any


class TokenText:
    """Decodes single token ids; ``ready`` once a tokenizer is there."""

    def __init__(self, tokenizer: Any = None, manifest: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.manifest = manifest or {}
        self.note = "" if tokenizer is not None else "no tokenizer yet: token ids shown as #id"
        self._piece = lru_cache(maxsize=8192)(self._decode)
        self._text = lru_cache(maxsize=1024)(self._decode_text)

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None

    def load(self) -> None:
        """Open the tokenizer of the trace's model (blocking); on failure ``note`` says why."""
        if self.tokenizer is not None:
            return
        from minillama.models.loader import BUILTIN_GGUF, builtin_model_path
        from minillama.models.tokenizer import Tokenizer

        model = self.manifest.get("model") or {}
        path, name = model.get("path"), str(model.get("name") or "")
        try:
            if not (path and os.path.exists(path)) and name == BUILTIN_GGUF:
                path = builtin_model_path()
            if not path or not os.path.exists(path):
                self.note = f"the trace's model {name or '?'} is not on this machine: token ids shown as #id"
                return
            self.tokenizer = Tokenizer.from_gguf_file(path) if path.endswith(".gguf") else \
                Tokenizer.from_hf_folder(path)
            self.note = ""
        except Exception as e:  # any unreadable tokenizer: ids stay ids
            self.note = f"cannot open the tokenizer of {name or path} ({type(e).__name__}): ids shown as #id"

    def _decode(self, token_id: int) -> str:
        try:
            return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        except Exception:
            return f"#{token_id}"

    def text(self, token_ids: list[int]) -> str | None:
        """The text of a whole prompt (None without a tokenizer): a live step in progress lists its new
        requests' prompt ids before their text is decoded on the writer's thread."""
        if self.tokenizer is None or not token_ids:
            return None
        return self._text(tuple(token_ids))

    def _decode_text(self, ids: tuple[int, ...]) -> str | None:
        try:
            return self.tokenizer.decode(list(ids), skip_special_tokens=False) or None
        except Exception:
            return None

    def piece(self, token_id: int | None) -> str:
        """The text of one token (``#id`` without a tokenizer)."""
        if token_id is None:
            return "?"
        return self._piece(int(token_id)) if self.tokenizer is not None else f"#{int(token_id)}"


def sequence_ids(request: dict[str, Any] | None) -> list[int]:
    """A request's token ids by position: its prompt, then what it generated (as the request fold knows it)."""
    if not request:
        return []
    return list(request.get("prompt_token_ids") or []) + list(request.get("token_ids") or [])
