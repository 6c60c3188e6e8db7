"""Seeded fuzzing of model files: every corruption ends in one clear line (or still loads), never a
traceback, a hang, or a read outside the model folder.

A tiny Llama (2 layers, hidden 16) is written here without transformers, as a safetensors folder
and as a GGUF file; then its safetensors header, index, config.json and GGUF header are corrupted
(random byte and bit flips, and hand-written hostile values) and each copy goes through
``minillama generate``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import sys

import numpy as np
import pytest
import torch

from minillama.cli import main

H, LAYERS, HEADS, KV, D, FFN, VOCAB = 16, 2, 2, 1, 8, 32, 64
CONFIG = {"model_type": "llama", "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV, "head_dim": D, "intermediate_size": FFN, "vocab_size": VOCAB,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
          "bos_token_id": 1, "eos_token_id": 2}
_opened: list[str] | None = None  # paths opened while a case runs (audit hook), or None when not watching


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str):
        _opened.append(os.path.realpath(args[0]))


sys.addaudithook(_audit)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    out = {"model.embed_tokens.weight": w(VOCAB, H), "model.norm.weight": torch.ones(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": w(HEADS * D, H), p + "self_attn.k_proj.weight": w(KV * D, H),
                p + "self_attn.v_proj.weight": w(KV * D, H), p + "self_attn.o_proj.weight": w(H, HEADS * D),
                p + "mlp.gate_proj.weight": w(FFN, H), p + "mlp.up_proj.weight": w(FFN, H),
                p + "mlp.down_proj.weight": w(H, FFN), p + "input_layernorm.weight": torch.ones(H),
                p + "post_attention_layernorm.weight": torch.ones(H)}
    return out


def write_folder(path: str) -> str:
    """A complete tiny safetensors model folder (word-level tokenizer over w0..w63)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(path, exist_ok=True)
    save_file(_weights(), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(os.path.join(path, "tokenizer.json"))
    return path


def write_gguf(path: str) -> str:
    """The same tiny model as a GGUF file with a byte-level BPE vocabulary."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    for fn, v in (("add_block_count", LAYERS), ("add_context_length", 64), ("add_embedding_length", H),
                  ("add_feed_forward_length", FFN), ("add_head_count", HEADS), ("add_head_count_kv", KV),
                  ("add_rope_freq_base", 10000.0), ("add_layer_norm_rms_eps", 1e-5), ("add_tokenizer_model", "gpt2")):
        getattr(writer, fn)(v)
    letters = [chr(c) for c in range(ord("a"), ord("a") + 20)]
    tokens = ["<s>", "</s>", *letters, *(a + b for a in letters[:6] for b in letters[:7])][:VOCAB]
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges([f"{t[0]} {t[1]}" for t in tokens if len(t) == 2])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in _weights().items():
        if name not in names:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            names[name] = f"blk.{i}.{parts[rest.removesuffix('.weight')]}.weight"
        writer.add_tensor(names[name], t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_case(capsys, model: str, folder: str, prompt: str = "w1 w2") -> tuple[int, str]:
    """``minillama generate`` on ``model``: exit code and stderr, with a time limit and an open() watch."""
    global _opened

    def hang(signum, frame):
        raise TimeoutError(f"{model} hung")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    _opened = []
    try:
        rc = main(["generate", prompt, "--model", model, "--raw", "--max-tokens", "2", "--max-model-len", "32"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        opened, _opened = _opened, None
    root = os.path.realpath(folder)
    outside = [p for p in opened if p.startswith(os.path.dirname(root)) and not p.startswith(root)]
    assert not outside, f"{model}: read outside the model folder: {outside}"
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert err.startswith("minillama: error: ") and "\n" not in err, err
    return rc, err


def _flip_bytes(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(out)


def hostile_headers(weights: bytes) -> list[bytes]:
    """Shards whose header is valid JSON with wrong contents (what ``KeyError: 'data_offsets'`` came from)."""
    (n,) = struct.unpack("<Q", weights[:8])
    header, data = json.loads(weights[8:8 + n]), weights[8 + n:]
    first = next(k for k in header if k != "__metadata__")

    def shard(h: object, tail: bytes = data) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + tail

    def edit(**change: object) -> dict:
        return {**header, first: {**header[first], **change}}

    no_offsets = {**header, first: {k: v for k, v in header[first].items() if k != "data_offsets"}}
    return [shard([]), shard([header]), shard("x"), shard(no_offsets), shard(edit(dtype="Q8")),
            shard(edit(shape=[-1, 16])), shard(edit(shape="16")), shard(edit(data_offsets=[8, 4])),
            shard(edit(data_offsets=[0, 8])), shard({**header, "__metadata__": []}), shard(header, data + b"\0" * 8),
            shard(edit(data_offsets=[0.5, 16]))]


HOSTILE_CONFIGS = [[], {}, "llama", {**CONFIG, "num_attention_heads": 0}, {**CONFIG, "num_hidden_layers": 0},
                   {**CONFIG, "num_hidden_layers": 10**9}, {**CONFIG, "vocab_size": 10**12},
                   {**CONFIG, "hidden_size": "16"}, {**CONFIG, "num_key_value_heads": 3}, {**CONFIG, "head_dim": 7},
                   {**CONFIG, "rope_scaling": "llama3"}, {**CONFIG, "rope_scaling": {"rope_type": "llama3"}},
                   {**CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, {**CONFIG, "rms_norm_eps": -1},
                   {**CONFIG, "rope_theta": float("nan")}, {**CONFIG, "eos_token_id": "x"},
                   {**CONFIG, "intermediate_size": 1.5}, {**CONFIG, "tie_word_embeddings": "no"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("fuzz")
    return {"folder": write_folder(str(base / "tiny")), "gguf": write_gguf(str(base / "tiny.gguf")),
            "base": str(base)}


def test_fuzzed_model_files_fail_in_one_line(models, capsys):
    rng = random.Random(14)
    base, good = models["base"], models["folder"]
    assert run_case(capsys, good, good)[0] == 0, "the uncorrupted folder must load"
    assert run_case(capsys, models["gguf"], models["gguf"], "abc de")[0] == 0, "the uncorrupted GGUF must load"
    weights = open(os.path.join(good, "model.safetensors"), "rb").read()
    (n,) = struct.unpack("<Q", weights[:8])
    gguf_bytes = open(models["gguf"], "rb").read()
    from minillama.models.gguf_file import _open_gguf

    data_start = _open_gguf(models["gguf"])[0].data_start
    # a decoy shard next to the folder: nothing may ever read it
    decoy = os.path.join(base, "other")
    os.makedirs(decoy, exist_ok=True)
    shutil.copy(os.path.join(good, "model.safetensors"), decoy)
    outside = os.path.relpath(os.path.join(decoy, "model.safetensors"), good)
    indexes = [b"not json", b"[]", b'{"weight_map": []}', b'{"weight_map": {"x": 3}}',
               json.dumps({"weight_map": {"model.norm.weight": outside}}).encode(),
               json.dumps({"weight_map": {"model.norm.weight": os.path.join(decoy, "model.safetensors")}}).encode()]
    cases: list[tuple[str, str, bytes]] = []  # (kind, file name, contents)
    cases += [("header", "model.safetensors", _flip_bytes(weights, 0, 8 + n, rng)) for _ in range(30)]
    cases += [("header", "model.safetensors", b) for b in hostile_headers(weights)]
    cases += [("index", "model.safetensors.index.json", b) for b in indexes]
    cases += [("config", "config.json", json.dumps(c).encode()) for c in HOSTILE_CONFIGS]
    text = json.dumps(CONFIG).encode()
    cases += [("config", "config.json", _flip_bytes(text, 0, len(text), rng)) for _ in range(10)]
    counts = {"loaded": 0, "one line": 0}
    for i, (kind, name, data) in enumerate(cases):
        folder = os.path.join(base, f"case{i}")
        shutil.copytree(good, folder)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        rc, err = run_case(capsys, folder, folder)
        counts["loaded" if rc == 0 else "one line"] += 1
        if kind == "index" and rc == 2 and "outside" not in err:
            assert "index" in err or "weight" in err, err
    link = os.path.join(base, "linked")
    shutil.copytree(good, link)
    os.remove(os.path.join(link, "model.safetensors"))
    os.symlink(os.path.join(decoy, "model.safetensors"), os.path.join(link, "model.safetensors"))
    rc, err = run_case(capsys, link, link)
    assert rc == 2 and "outside the model folder" in err, err
    for i in range(40):  # single-bit flips anywhere in the GGUF header
        data = bytearray(gguf_bytes)
        bit = rng.randrange(data_start * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        path = os.path.join(base, f"flip{i}.gguf")
        with open(path, "wb") as f:
            f.write(data)
        rc, err = run_case(capsys, path, path, "abc de")
        counts["loaded" if rc == 0 else "one line"] += 1
        if rc == 2:  # names the file, or the prompt a flipped vocabulary no longer encodes
            assert path in err or "prompt" in err, err
    assert counts["one line"] >= len(cases) // 2, counts  # the corruptions did break things
