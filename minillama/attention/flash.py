"""Adapter for the real ``flash_attn`` package (Dao-AILab flash-attention 2.x).

The package is imported only inside ``load()``: it needs CUDA, takes a while to import, and is
not installable on CPU machines, so merely importing minillama must never touch it.
"""

from __future__ import annotations

import torch

from minillama.attention.backend import AttentionBackend, BackendError

# flash-attn's paged KV cache requires page_block_size % 256 == 0.
FLASH_BLOCK_SIZE_MULTIPLE = 256
# flash-attn 2 kernels exist for head dims up to 256; it pads others to a multiple of 8 by copying
# q/k/v on every call (and the KV cache when appending), so we only accept multiples of 8.
FLASH_MAX_HEAD_DIM = 256


class FlashAttnBackend(AttentionBackend):
    """``AttentionBackend`` whose ``check`` knows flash-attn 2's limits."""

    def check(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``BackendError`` unless flash-attn 2 can run these heads (fp16/bf16, CUDA sm80+, head_dim <= 256)."""
        device = torch.device(device)
        if device.type != "cuda":
            raise BackendError(
                f"attention backend '{self.name}' runs only on CUDA devices, got device '{device}': "
                "use --device cuda or --backend torch"
            )
        if dtype not in (torch.float16, torch.bfloat16):
            raise BackendError(
                f"attention backend '{self.name}' supports only float16/bfloat16, got {dtype}: "
                "use --dtype bfloat16 or --backend torch"
            )
        if head_dim <= 0 or head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8 != 0:
            raise BackendError(
                f"attention backend '{self.name}' supports head_dim that is a multiple of 8 and at most "
                f"{FLASH_MAX_HEAD_DIM}, this model has {head_dim}: use --backend torch"
            )
        if not torch.cuda.is_available():
            raise BackendError(
                f"attention backend '{self.name}' needs a CUDA GPU, but torch sees none here: use --backend torch"
            )
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise BackendError(
                f"attention backend '{self.name}' needs a GPU of compute capability 8.0+ (Ampere or newer), "
                f"this one is sm{major}{minor}: use --backend torch"
            )


def _one_line(e: BaseException) -> str:
    # Loader errors from compiled extensions can span lines; the BackendError must be one line.
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load() -> AttentionBackend:
    """Import ``flash_attn`` and wrap its two functions; ``BackendError`` if it cannot be imported."""
    try:
        # Any failure counts: missing package, CUDA/ABI mismatch of the compiled extension, ...
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except Exception as e:
        raise BackendError(
            "attention backend 'flash-attn' needs the flash_attn package, which is not importable here "
            f"({_one_line(e)}): install flash-attn on a CUDA machine or use --backend torch"
        ) from e
    return FlashAttnBackend(
        name="flash-attn",
        varlen=flash_attn_varlen_func,
        with_kvcache=flash_attn_with_kvcache,
        block_size_multiple=FLASH_BLOCK_SIZE_MULTIPLE,
    )
