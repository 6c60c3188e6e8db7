"""Text <-> token ids, chat templates and streaming decode, on top of the ``tokenizers`` library.

Two sources give the same object: a Hugging Face folder (``tokenizer.json`` plus
``tokenizer_config.json``, read in ``hf_tokenizer``) and the tokenizer metadata of a GGUF file, which
``gguf_tokenizer`` rebuilds into a ``tokenizers`` byte-level BPE that encodes exactly like
transformers' own GGUF conversion. Chat templates render in ``chat_template``'s Jinja environment;
streaming decode lives in ``detokenizer``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as _Backend

from minillama.models.chat import check_messages
from minillama.models.chat_template import _compile_template
from minillama.models.detokenizer import DecodeStream, IncrementalDecoder, StreamDecoder
from minillama.models.errors import ModelLoadError
from minillama.models.gguf_tokenizer import gguf_tokenizer_args
from minillama.models.hf_tokenizer import hf_tokenizer_args

if TYPE_CHECKING:
    from minillama.models.gguf_metadata import GGUFTokenizerData

__all__ = ["Tokenizer", "IncrementalDecoder"]

# transformers' clean_up_tokenization: only used when a tokenizer_config.json asks for it.
_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


class Tokenizer:
    """Encode, decode and chat-format text for one model."""

    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    vocab_size: int
    chat_template: str | None

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_token_ids: list[int] | None = None,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        source: str = "",
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer`` whose post-processor already adds BOS/EOS as the model
        wants (so ``encode(add_special_tokens=True)`` matches transformers)."""
        self.backend = backend
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token is not None else None
        eos_id = backend.token_to_id(eos_token) if eos_token is not None else None
        ids = ([eos_id] if eos_id is not None else []) + list(extra_eos_token_ids or [])
        self.eos_token_ids = list(dict.fromkeys(ids))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        probe = backend.encode("", add_special_tokens=True).ids
        # Whether encode() puts BOS in front: the post-processor decides, this just reports it.
        self.add_bos_token = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``,
        ``special_tokens_map.json``, and stop ids from ``generation_config.json``/``config.json``)."""
        backend, kwargs = hf_tokenizer_args(folder)
        return cls(backend, **kwargs)

    @classmethod
    def from_gguf(cls, data: GGUFTokenizerData) -> Tokenizer:
        """Rebuild the byte-level BPE a GGUF describes (see ``gguf_tokenizer_args``); a vocabulary the
        ``tokenizers`` library refuses is one ``ModelLoadError`` line, not its bare ``Exception``."""
        try:
            backend, kwargs = gguf_tokenizer_args(data)
            return cls(backend, **kwargs)
        except ModelLoadError:
            raise
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelLoadError(f"{data.source or 'GGUF file'} has a tokenizer that cannot be built "
                                 f"({first[:200]}): the file is corrupt, copy or download it again") from None

    @classmethod
    def from_gguf_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Tokenizer of a GGUF file, without reading its weights."""
        from minillama.models.gguf_loader import load_gguf_metadata

        return cls.from_gguf(load_gguf_metadata(path)[1])

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special-token text such as ``<|im_end|>`` maps to its id.

        ``add_special_tokens`` adds BOS/EOS only where the model asks for them (SmolLM2: never).
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of many id lists in one call into the tokenizer library."""
        texts = self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                texts = [t.replace(old, new) for t in texts]
        return texts

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level spelling) of ``token_id``."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the model's Jinja chat template, as transformers does.

        Extra keyword arguments (``tools``, ``documents``, ``enable_thinking``...) reach the template.
        """
        check_messages(messages)
        if not self.chat_template:
            raise ModelLoadError(
                f"tokenizer from {self.source or 'this model'} has no chat template: "
                "use an instruct/chat model, or encode a raw prompt instead"
            )
        context: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "tools": None,
            "documents": None,
        }
        context.update(kwargs)
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Ids of the rendered chat. Templates write their own special tokens, so none are added,
        except BOS for a model that wants one and whose template did not write it."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        ids = self.encode(text, add_special_tokens=False)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder | StreamDecoder:
        """A decoder for generated ids that hands out text as soon as it is complete: the tokenizers
        library's own streaming decode when it has one and our ``decode`` adds nothing to its text."""
        if DecodeStream is not None and not self.clean_up_tokenization_spaces:
            return StreamDecoder(self, skip_special_tokens=skip_special_tokens)
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)
