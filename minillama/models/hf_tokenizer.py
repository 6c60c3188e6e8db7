"""Read a Hugging Face tokenizer folder into the arguments ``Tokenizer`` is built from."""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Tokenizer as _Backend
from tokenizers import processors

from minillama.models.errors import ModelLoadError


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


def hf_tokenizer_args(folder: str | os.PathLike) -> tuple[_Backend, dict[str, Any]]:
    """The backend and the other ``Tokenizer`` arguments of ``folder``: ``tokenizer.json`` (+
    ``tokenizer_config.json``, ``chat_template.jinja``, ``special_tokens_map.json``, and stop ids
    from ``generation_config.json``/``config.json``)."""
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

    return backend, dict(
        bos_token=bos,
        eos_token=eos,
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        extra_eos_token_ids=extra_eos,
        chat_template=_find_chat_template(folder, cfg),
        clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
        source=folder,
    )


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
