"""Dequantize the tensors of a parsed GGUF file into Hugging Face Llama names and shapes.

llama.cpp renames every tensor and permutes the q/k rows for its RoPE; both are undone here, one
tensor at a time, checked against the shapes the config implies.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from minillama.models.config import ModelConfig
from minillama.models.errors import ModelLoadError
from minillama.models.gguf_file import _GGUFFile, _TensorInfo

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
