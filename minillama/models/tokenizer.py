"""Text <-> token ids, chat templates and streaming decode, on top of the ``tokenizers`` library.

Two sources give the same object: a Hugging Face folder (``tokenizer.json`` plus
``tokenizer_config.json``) and the tokenizer metadata of a GGUF file, which is rebuilt here into a
``tokenizers`` byte-level BPE that encodes exactly like transformers' own GGUF conversion.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from minillama.models.chat import check_messages
from minillama.models.errors import ModelLoadError

if TYPE_CHECKING:
    from minillama.models.gguf_loader import GGUFTokenizerData

__all__ = ["Tokenizer", "IncrementalDecoder"]

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns for the byte-level vocabularies whose merges were learned on something other than
# GPT-2's pattern, keyed by tokenizer.ggml.pre. Anything else (including SmolLM2's "smollm") gets
# GPT-2's pattern via ByteLevel(use_regex=True), which is what transformers' GGUF converter does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# transformers' clean_up_tokenization: only used when a tokenizer_config.json asks for it.
_CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


@cache
def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are given the
    code points from 256 upward, in byte order, so no token contains whitespace or controls.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path} cannot be read as JSON ({detail}): copy the file again") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object: copy the file again")
    return data


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF marks assistant spans with it); renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@cache
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers renders them in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


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
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ModelLoadError(f"tokenizer folder {folder} does not exist: pass a Hugging Face model folder")
        tok_path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise ModelLoadError(
                f"{folder} has no tokenizer.json: save the fast tokenizer there "
                "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
            )
        try:
            backend = _Backend.from_file(tok_path)
        except Exception as e:  # the Rust side raises a bare Exception with a multi-line text
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelLoadError(f"{tok_path} cannot be loaded ({first}): copy the file again") from None

        def optional(name: str) -> dict:
            path = os.path.join(folder, name)
            return _read_json(path) if os.path.isfile(path) else {}

        cfg = optional("tokenizer_config.json")
        special_map = optional("special_tokens_map.json")

        def special(name: str) -> str | None:
            return _token_content(cfg.get(name)) or _token_content(special_map.get(name))

        bos, eos = special("bos_token"), special("eos_token")
        # An explicit add_bos/add_eos flag overrides tokenizer.json's post-processor (transformers
        # does the same); without one the post-processor stays as saved.
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            _set_post_processor(backend, bos, eos, bool(cfg.get("add_bos_token")), bool(cfg.get("add_eos_token")))

        # Stop ids the model declares beyond the tokenizer's eos_token (e.g. Llama 3's <|eot_id|>).
        extra_eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = optional(name).get("eos_token_id")
            extra_eos += value if isinstance(value, list) else [value] if isinstance(value, int) else []

        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=special("pad_token"),
            unk_token=special("unk_token"),
            extra_eos_token_ids=extra_eos,
            chat_template=_find_chat_template(folder, cfg),
            clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
            source=folder,
        )

    @classmethod
    def from_gguf(cls, data: GGUFTokenizerData) -> Tokenizer:
        """Rebuild the byte-level BPE a GGUF describes (see ``_from_gguf``); a vocabulary the
        ``tokenizers`` library refuses is one ``ModelLoadError`` line, not its bare ``Exception``."""
        try:
            return cls._from_gguf(data)
        except ModelLoadError:
            raise
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelLoadError(f"{data.source or 'GGUF file'} has a tokenizer that cannot be built "
                                 f"({first[:200]}): the file is corrupt, copy or download it again") from None

    @classmethod
    def _from_gguf(cls, data: GGUFTokenizerData) -> Tokenizer:
        """Rebuild the byte-level BPE a GGUF describes.

        Matches transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` token for
        token: control tokens become special added tokens, user-defined ones plain added tokens,
        and the split pattern is GPT-2's unless ``tokenizer.ggml.pre`` names a known other one.
        """
        where = data.source or "GGUF file"
        if data.model != "gpt2":
            raise ModelLoadError(
                f"{where} has a {data.model!r} tokenizer, but minillama builds only byte-level BPE ('gpt2') "
                "tokenizers from GGUF: use the model's Hugging Face folder with its tokenizer.json"
            )
        if not data.tokens or not data.merges:
            raise ModelLoadError(f"{where} has no tokenizer vocabulary or merges: convert the model again with llama.cpp")

        spell = _byte_to_char()
        alphabet = set(spell.values())
        # Tokens are stored in the byte alphabet already; one with other characters (a raw space,
        # say) is re-spelled from its UTF-8 bytes so the BPE model can ever produce it.
        vocab: dict[str, int] = {}
        for i, tok in enumerate(data.tokens):
            key = tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8"))
            vocab[key] = i
        merges = []
        for m in data.merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise ModelLoadError(f"{where} has a malformed merge {m!r}: convert the model again with llama.cpp")
            merges.append((parts[0], parts[1]))

        backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        split = _PRE_SPLITS.get(data.pre or "")
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()

        types = data.token_types or []
        control = [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(data.tokens, types, strict=False)
            # A "control" token outside the byte alphabet is a llama.cpp mislabel; adding it would
            # create an id past the embedding, so (like transformers) it is left out.
            if kind == _CONTROL and set(tok) <= alphabet
        ]
        if control:
            backend.add_special_tokens(control)
        user = [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(data.tokens, types, strict=False)
            if kind == _USER_DEFINED and tok in vocab
        ]
        if user:
            backend.add_tokens(user)

        def token(i: int | None) -> str | None:
            return data.tokens[i] if i is not None and 0 <= i < len(data.tokens) else None

        bos, eos = token(data.bos_token_id), token(data.eos_token_id)
        _set_post_processor(backend, bos, eos, bool(data.add_bos_token), bool(data.add_eos_token))
        extra = [i for i in (data.eot_token_id, data.eom_token_id) if i is not None]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=token(data.pad_token_id),
            unk_token=token(data.unk_token_id),
            extra_eos_token_ids=extra,
            chat_template=data.chat_template,
            source=data.source,
        )

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

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder for generated ids that hands out text as soon as it is complete."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never splitting a character.

    Byte-level tokens can end in the middle of a multi-byte UTF-8 character (one emoji is often
    two or three tokens); decoding such a prefix yields U+FFFD. We keep the ids since the last
    emitted piece, decode them as one span, and hold back while the span ends in U+FFFD.
    Decoding a short window (not the whole history) keeps each push cheap, and starting the window
    one emitted token back lets decoders that treat a sequence's first token specially see context.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: the first id whose text is already emitted
        self._read = 0  # ids before this are fully emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.ids.append(int(token_id))
        return self._advance(self._decode(self.ids[self._prefix : self._read]), self._decode(self.ids[self._prefix :]))

    def _windows(self, token_id: int) -> tuple[list[int], list[int]]:
        self.ids.append(int(token_id))
        return self.ids[self._prefix : self._read], self.ids[self._prefix :]

    def _advance(self, done: str, full: str) -> str:
        # Hold back while the last character is incomplete, or when nothing new appeared (a
        # skipped special token): those ids stay in the window and are decoded with the next.
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        piece = full[len(done) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """Text still held back at the end of generation (a trailing partial character as U+FFFD)."""
        done = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        piece = full[len(done) :] if full.startswith(done) else ""
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece


def push_tokens(decoders: list[IncrementalDecoder], token_ids: list[int]) -> list[str]:
    """``d.push(t)`` for many decoders of one tokenizer at once, with one batched decode call."""
    if not decoders:
        return []
    first = decoders[0]
    windows = [w for d, t in zip(decoders, token_ids, strict=True) for w in d._windows(t)]
    texts = first.tokenizer.decode_batch(windows, skip_special_tokens=first.skip_special_tokens)
    return [d._advance(texts[2 * k], texts[2 * k + 1]) for k, d in enumerate(decoders)]


def _set_post_processor(backend: _Backend, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """Make ``encode(add_special_tokens=True)`` add BOS/EOS exactly when the model asks."""
    add_bos = add_bos and bos is not None and backend.token_to_id(bos) is not None
    add_eos = add_eos and eos is not None and backend.token_to_id(eos) is not None
    single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
    specials = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _find_chat_template(folder: str, cfg: dict) -> str | None:
    """``chat_template.jinja`` (transformers 4.50+), ``chat_template.json``, or the config entry."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    json_path = os.path.join(folder, "chat_template.json")
    template: Any = _read_json(json_path).get("chat_template") if os.path.isfile(json_path) else None
    if template is None:
        template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
