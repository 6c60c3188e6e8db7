"""Load a Llama model from a GGUF file (llama.cpp's format) into Hugging Face names and shapes.

The header is parsed here rather than with ``gguf.GGUFReader`` because the reader fails on a short
file with whatever numpy error comes first (or memmaps short data without complaint), and a user
with a half-copied download deserves "truncated: copy it again". Only the dequantization kernels
come from the ``gguf`` package.

GGUF layout (version 2 and 3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64
metadata count, the metadata key/values, the tensor infos (name, dims innermost first, type,
offset), padding to ``general.alignment``, then the tensor data.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from minillama.models.config import ModelConfig
from minillama.models.config_checks import as_float, as_int, num_parameters
from minillama.models.errors import ModelLoadError

__all__ = [
    "GGUFTokenizerData",
    "load_gguf",
    "load_gguf_metadata",
    "open_gguf",
    "GGUFWeights",
    "iter_gguf_tensors",
    "gguf_to_hf_name",
]

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_SUPPORTED_ARCHITECTURES = ("llama",)

# Metadata value type ids -> struct format of one scalar.
_SCALAR_FORMATS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING, _ARRAY = 8, 9

# llama.cpp tensor names -> Hugging Face Llama names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp stores Llama 3.1+ RoPE frequency factors as a tensor; it becomes config.rope_scaling.
_ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFTokenizerData:
    """The tokenizer a GGUF file describes, as raw metadata (``tokenizer.ggml.*`` keys).

    ``model`` is llama.cpp's tokenizer kind: ``"gpt2"`` is byte-level BPE, ``"llama"`` is
    SentencePiece. ``pre`` names the pre-tokenizer llama.cpp recognised (e.g. ``"smollm"``).
    ``token_types`` follow llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte.
    """

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    eom_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    source: str = ""


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: innermost (columns) first
    qtype: GGMLQuantizationType
    start: int  # absolute file offset
    n_bytes: int


@dataclass
class _GGUFFile:
    path: str
    size: int
    version: int
    metadata: dict[str, Any]
    tensors: list[_TensorInfo] = field(default_factory=list)
    data_start: int = 0


class _Truncated(Exception):
    """Raised inside the header parser when a read runs past the end of the file."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _HeaderReader:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(self.pos + max(n, 0))

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("I")
            count = self.scalar("Q")
            if etype in _SCALAR_FORMATS:
                # Numeric arrays (token types, scores) in one go instead of 50k struct calls.
                fmt = "<" + _SCALAR_FORMATS[etype]
                itemsize = struct.calcsize(fmt)
                self.need(count * itemsize)
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
                self.pos += count * itemsize
                return arr.tolist()
            if count > self.size - self.pos:  # every element takes at least one byte
                raise _Truncated(self.size + 1)
            return [self.value(etype) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        return self.scalar(fmt)


def _truncated_message(path: str, detail: str) -> str:
    return f"GGUF file {path} is truncated or corrupt ({detail}): copy or download it again"


def _open_gguf(path: str | os.PathLike) -> tuple[_GGUFFile, mmap.mmap]:
    """Parse the header of ``path`` and check the file holds all tensor data it declares."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"GGUF file {path} does not exist: check the path")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a directory, not a GGUF file: pass the path of the .gguf file itself")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(_truncated_message(path, "the file is empty"))
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"GGUF file {path} cannot be read ({e.strerror}): check its permissions") from e

    head = bytes(buf[:4])
    if head != _MAGIC:
        if len(head) < 4 and _MAGIC.startswith(head):
            raise ModelLoadError(_truncated_message(path, f"only {size} bytes long"))
        raise ModelLoadError(
            f"{path} is not a GGUF file (it starts with {head!r}, not {_MAGIC!r}): "
            "pass a .gguf model file or a Hugging Face model folder"
        )

    reader = _HeaderReader(buf, size)
    reader.pos = 4
    try:
        version = reader.scalar("I")
        if version & 0xFFFF == 0 and version != 0:
            raise ModelLoadError(
                f"GGUF file {path} is big-endian, which minillama does not read: use a little-endian GGUF"
            )
        if version not in (2, 3):
            raise ModelLoadError(
                f"GGUF file {path} has format version {version}, which minillama does not read "
                "(it reads 2 and 3): convert the model again with a recent llama.cpp"
            )
        n_tensors = reader.scalar("Q")
        n_kv = reader.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.scalar("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = tuple(reader.scalar("Q") for _ in range(n_dims))
            infos.append((name, dims, reader.scalar("I"), reader.scalar("Q")))
    except ModelLoadError:
        raise
    except _Truncated as t:
        raise ModelLoadError(
            _truncated_message(path, f"the header needs at least {t.offset} bytes, the file has {size}")
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(_truncated_message(path, f"bad header: {e}")) from None

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(_truncated_message(path, f"bad general.alignment {alignment!r}"))
    data_start = -(-reader.pos // alignment) * alignment

    gf = _GGUFFile(path=path, size=size, version=version, metadata=metadata, data_start=data_start)
    data_end = data_start
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(
                f"GGUF file {path} stores tensor {name} as ggml type {type_id}, which this gguf package "
                "does not know: upgrade gguf (pip install -U gguf) or use another quantization"
            ) from None
        n_elems = math.prod(dims)
        if dims and dims[0] % block:
            raise ModelLoadError(_truncated_message(path, f"tensor {name} row of {dims[0]} is not whole blocks"))
        n_bytes = n_elems // block * type_size
        gf.tensors.append(_TensorInfo(name, dims, qtype, data_start + offset, n_bytes))
        data_end = max(data_end, data_start + offset + n_bytes)
    if data_end > size:
        found = max(size - data_start, 0)
        raise ModelLoadError(
            _truncated_message(
                path, f"expected {data_end - data_start} bytes of tensor data, found {found}"
            )
        )
    return gf, buf


def _float32(value: Any) -> float:
    """Metadata floats are float32: ``1e-5`` is stored as 9.9999997e-06. Give back the short
    decimal that float32 round-trips to, which is what the original config said."""
    return float(str(np.float32(value)))


def _tensor_array(buf: mmap.mmap, info: _TensorInfo) -> np.ndarray:
    """Dequantize one tensor to a writable float32 array in Hugging Face shape (outer dim first)."""
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    dims = info.dims or (1,)
    row_bytes = dims[0] // block * type_size
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.n_bytes, offset=info.start)
    raw = raw.reshape(*reversed(dims[1:]), row_bytes)
    try:
        arr = dequantize(raw, info.qtype)
    except NotImplementedError:
        raise ModelLoadError(
            f"GGUF tensor {info.name} uses {info.qtype.name}, which gguf cannot dequantize yet: "
            "use a file with another quantization (Q4_0, Q4_K, Q8_0, F16...)"
        ) from None
    # F32 comes back as a read-only view of the mapped file; torch needs memory of its own.
    # The quantized types already come back as fresh arrays, so they are not copied twice.
    arr = np.asarray(arr, dtype=np.float32)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    del raw
    _drop_pages(buf, info.start, info.n_bytes)
    return arr


def _drop_pages(buf: mmap.mmap, start: int, length: int) -> None:
    """Let the kernel take back the mapped pages of a tensor already read: they would otherwise
    count in the process's RSS until the file is closed (re-reading them just faults them in)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or length <= 0:
        return
    begin = start - start % mmap.PAGESIZE
    try:
        buf.madvise(advice, begin, start + length - begin)
    except (OSError, ValueError):
        pass  # only an optimisation


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's RoPE rotates adjacent pairs (x0, x1), HF's rotates the two halves of each head
    (x_i, x_{i+d/2}), so the converter interleaved each head's rows; this puts them back in halves.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    out = w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    return np.ascontiguousarray(out)


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face Llama name of a llama.cpp tensor, or ``None`` if it has none."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _meta(gf: _GGUFFile, key: str, default: Any = None) -> Any:
    return gf.metadata.get(key, default)


def _rope_scaling(gf: _GGUFFile, buf: mmap.mmap, arch: str, head_dim: int, theta: float) -> dict | None:
    """RoPE scaling from ``{arch}.rope.scaling.*`` keys, or recovered from a ``rope_freqs`` tensor."""
    kind = _meta(gf, f"{arch}.rope.scaling.type")
    factor = _meta(gf, f"{arch}.rope.scaling.factor", _meta(gf, f"{arch}.rope.scale_linear"))
    orig = _meta(gf, f"{arch}.rope.scaling.original_context_length")
    if kind is None and factor is not None:
        kind = "linear"  # old files only had rope.scale_linear
    if kind in ("linear", "yarn") and factor is not None and _float32(factor) != 1.0:
        out: dict[str, Any] = {"rope_type": kind, "factor": _float32(factor)}
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        attn = _meta(gf, f"{arch}.rope.scaling.attn_factor")
        if kind == "yarn" and attn is not None:
            out["attention_factor"] = _float32(attn)
        return out
    if kind not in (None, "none", "linear", "yarn"):
        raise ModelLoadError(
            f"GGUF file {gf.path} uses RoPE scaling {kind!r}, which minillama does not support: "
            "use a model with linear, yarn or llama3 RoPE scaling"
        )

    info = next((t for t in gf.tensors if t.name == _ROPE_FREQS), None)
    if info is None:
        return None
    stored = _tensor_array(buf, info).astype(np.float64).reshape(-1)
    return _llama3_scaling_from_factors(gf.path, stored, head_dim, theta)


def _llama3_scaling_from_factors(path: str, stored: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Turn llama.cpp's per-frequency divisors back into HF's ``llama3`` rope_scaling dict.

    Every Llama 3.1/3.2 release used low_freq_factor 1, high_freq_factor 4 and an original context
    of 8192, varying only ``factor``; we rebuild the divisors from those and insist they match, so a
    file with anything else fails loudly instead of generating garbage.
    """
    if np.allclose(stored, 1.0):
        return None
    factor = float(stored.max())
    low, high, orig = 1.0, 4.0, 8192
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1 - smooth) / factor + smooth)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-3):
        raise ModelLoadError(
            f"GGUF file {path} has RoPE frequency factors (rope_freqs) that are not Llama 3 style: "
            "use the model's Hugging Face folder instead"
        )
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def _build(gf: _GGUFFile, buf: mmap.mmap) -> tuple[ModelConfig, GGUFTokenizerData]:
    path = gf.path
    arch = _meta(gf, "general.architecture")
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {path} holds a {arch!r} model, but minillama runs only Llama-architecture "
            "models: pick a Llama-family GGUF (Llama, SmolLM, TinyLlama, Mistral 7B...)"
        )

    def need(key: str) -> Any:
        value = _meta(gf, f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(
                f"GGUF file {path} lacks the metadata key {arch}.{key}: convert the model again with llama.cpp"
            )
        return value

    tok = _tokenizer_data(gf)
    where = f"GGUF file {path}"
    hidden = as_int(need("embedding_length"), f"{arch}.embedding_length", where)
    heads = as_int(need("attention.head_count"), f"{arch}.attention.head_count", where)
    kv_heads = _meta(gf, f"{arch}.attention.head_count_kv", heads)
    head_dim = as_int(_meta(gf, f"{arch}.attention.key_length", hidden // heads), f"{arch}.attention.key_length",
                      where)
    rope_dim = _meta(gf, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelLoadError(
            f"GGUF file {path} rotates only {rope_dim} of {head_dim} head dims (partial RoPE), which "
            "Llama models do not do: use a Llama-architecture model"
        )
    theta = _float32(as_float(_meta(gf, f"{arch}.rope.freq_base", 10000.0), f"{arch}.rope.freq_base", where))
    tensor_names = {t.name for t in gf.tensors}
    token_embd = next((t for t in gf.tensors if t.name == "token_embd.weight"), None)
    # The embedding's row count is what the weights need; it can exceed the token list when a
    # vocabulary was padded, so the token list is only the fallback.
    if token_embd is not None and len(token_embd.dims) == 2:
        vocab = token_embd.dims[1]
    else:
        vocab = len(tok.tokens) or _meta(gf, f"{arch}.vocab_size", 0)

    eos_ids = [i for i in (tok.eos_token_id, tok.eot_token_id, tok.eom_token_id) if i is not None]
    file_type = _meta(gf, "general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else ""
    except ValueError:
        file_type_name = f"file_type {file_type}"
    dtype = {0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type) if file_type is not None else None

    config = ModelConfig(
        hidden_size=hidden,
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=need("feed_forward_length"),
        vocab_size=vocab,
        rms_norm_eps=_float32(as_float(need("attention.layer_norm_rms_epsilon"), "layer_norm_rms_epsilon", where)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(gf, buf, arch, head_dim, theta),
        max_position_embeddings=_meta(gf, f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        torch_dtype=dtype,
        source=f"{path} (GGUF v{gf.version}{', ' + file_type_name if file_type_name else ''})",
    )
    return config, tok


def _check_holds(gf: _GGUFFile, config: ModelConfig) -> None:
    """Bound what the header claims by what the file holds, before anything is sized from it
    (a flipped bit must not make the engine allocate 1e9 layers)."""
    held = sum(math.prod(t.dims) for t in gf.tensors)
    if num_parameters(config) > held:
        raise ModelLoadError(
            f"GGUF file {gf.path} describes a model of {num_parameters(config):,} weights but holds only "
            f"{held:,}: the header is corrupt, copy or download the file again"
        )


def _tokenizer_data(gf: _GGUFFile) -> GGUFTokenizerData:
    def opt_int(key: str) -> int | None:
        value = _meta(gf, f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    def opt_bool(key: str) -> bool | None:
        value = _meta(gf, f"tokenizer.ggml.{key}")
        return bool(value) if value is not None else None

    tokens = list(_meta(gf, "tokenizer.ggml.tokens", []))
    return GGUFTokenizerData(
        model=str(_meta(gf, "tokenizer.ggml.model", "")),
        pre=_meta(gf, "tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=list(_meta(gf, "tokenizer.ggml.token_type", [])),
        merges=list(_meta(gf, "tokenizer.ggml.merges", [])),
        scores=_meta(gf, "tokenizer.ggml.scores"),
        bos_token_id=opt_int("bos_token_id"),
        eos_token_id=opt_int("eos_token_id"),
        eot_token_id=opt_int("eot_token_id"),
        eom_token_id=opt_int("eom_token_id"),
        unk_token_id=opt_int("unknown_token_id"),
        pad_token_id=opt_int("padding_token_id"),
        add_bos_token=opt_bool("add_bos_token"),
        add_eos_token=opt_bool("add_eos_token"),
        add_space_prefix=opt_bool("add_space_prefix"),
        chat_template=_meta(gf, "tokenizer.chat_template"),
        source=gf.path,
    )


def load_gguf_metadata(path: str | os.PathLike) -> tuple[ModelConfig, GGUFTokenizerData]:
    """Config and tokenizer data only, without dequantizing any weights (fast)."""
    gf, buf = _open_gguf(path)
    return _build(gf, buf)


def _iter_tensors(gf: _GGUFFile, buf: mmap.mmap, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    expected = _expected_shapes(config)
    seen = set()
    for info in gf.tensors:
        if info.name == _ROPE_FREQS:
            continue  # already folded into config.rope_scaling
        hf_name = gguf_to_hf_name(info.name)
        if hf_name is None or (hf_name not in expected and not hf_name.endswith(".bias")):
            raise ModelLoadError(
                f"GGUF file {gf.path} has tensor {info.name}, which a Llama model does not have: "
                "use a plain Llama-architecture GGUF"
            )
        arr = _tensor_array(buf, info)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _unpermute(arr, config.num_attention_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _unpermute(arr, config.num_key_value_heads)
        shape = expected.get(hf_name)
        if shape is not None and tuple(arr.shape) != shape:
            raise ModelLoadError(
                f"GGUF file {gf.path} tensor {info.name} has shape {tuple(arr.shape)}, the metadata implies "
                f"{shape}: the file is inconsistent, convert the model again"
            )
        seen.add(hf_name)
        yield hf_name, torch.from_numpy(arr)
    missing = [n for n in expected if n not in seen and n != "lm_head.weight"]
    if missing:
        raise ModelLoadError(
            f"GGUF file {gf.path} lacks {len(missing)} tensors (first: {missing[0]}): "
            "the file is incomplete, convert or download it again"
        )


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> (out, in) shape for every weight a Llama with config ``c`` has."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
        }
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


class GGUFWeights:
    """The tensors of an open GGUF file, dequantised one at a time as they are iterated, so loading
    never holds a second float32 copy of the model (only the tensor being copied in)."""

    def __init__(self, gf: _GGUFFile, buf: mmap.mmap, config: ModelConfig) -> None:
        self._gf, self._buf, self._config = gf, buf, config

    def __len__(self) -> int:
        return sum(1 for t in self._gf.tensors if t.name != _ROPE_FREQS)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return _iter_tensors(self._gf, self._buf, self._config)


def open_gguf(path: str | os.PathLike) -> tuple[ModelConfig, GGUFWeights, GGUFTokenizerData]:
    """Like :func:`load_gguf`, but the weights are read lazily (iterate them once, in file order)."""
    gf, buf = _open_gguf(path)
    config, tok = _build(gf, buf)
    _check_holds(gf, config)
    return config, GGUFWeights(gf, buf, config), tok


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` one at a time, so a caller copying each into its model
    (and casting to bf16, moving to GPU...) never holds a second full copy of the weights.

    The whole file is validated (header, truncation, architecture) before the first tensor.
    """
    gf, buf = _open_gguf(path)
    config, _ = _build(gf, buf)
    _check_holds(gf, config)
    return _iter_tensors(gf, buf, config)


def load_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], GGUFTokenizerData]:
    """Read a Llama GGUF: its config, a float32 state dict with Hugging Face names and shapes (q/k
    rows un-permuted; ``lm_head.weight`` only when the file has ``output.weight``), and the raw
    tokenizer metadata for :meth:`minillama.models.tokenizer.Tokenizer.from_gguf`.

    Raises :class:`ModelLoadError` with a one-line message for a missing, truncated, non-GGUF or
    non-Llama file.
    """
    gf, buf = _open_gguf(path)
    config, tok = _build(gf, buf)
    _check_holds(gf, config)
    state = dict(_iter_tensors(gf, buf, config))
    return config, state, tok
