"""Rebuild the tokenizer metadata of a GGUF file into a ``tokenizers`` byte-level BPE.

The result encodes exactly like transformers' own GGUF conversion; ``Tokenizer.from_gguf`` wraps it.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from minillama.models.errors import ModelLoadError
from minillama.models.hf_tokenizer import _set_post_processor

if TYPE_CHECKING:
    from minillama.models.gguf_metadata import GGUFTokenizerData


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


def gguf_tokenizer_args(data: GGUFTokenizerData) -> tuple[_Backend, dict[str, Any]]:
    """The byte-level BPE a GGUF describes and the other ``Tokenizer`` arguments.

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
    return backend, dict(
        bos_token=bos,
        eos_token=eos,
        pad_token=token(data.pad_token_id),
        unk_token=token(data.unk_token_id),
        extra_eos_token_ids=extra,
        chat_template=data.chat_template,
        source=data.source,
    )
