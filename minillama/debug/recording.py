"""Start recording a live session at any moment without losing what came before.

A recording that starts mid-run must first say what the requests already running are (their prompt
ids and text, the text generated so far) and keep the keys already cached, or replay cannot show
their prompts nor rebuild their attention weights. ``start_recording`` does both: it lists every
running or waiting request in the first step the trace will hold (the step open now, if paused
inside one), and writes the K cache of every block that holds data (in use, or free but still
cached for prefix hits that a later request may revive) to ``kv_start.safetensors`` in the trace
folder, which ``keys.KeyBook`` reads for the slots no recorded step wrote.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import torch

from minillama import hooks
from minillama.debug.keys import KV_START


def start_recording(session: Any, path: str, max_bytes: int | None = None) -> dict[str, int]:
    """Record every following step of ``session`` to ``path``; returns what was caught up (requests, blocks)."""
    session.start_recording(path, max_bytes)
    caught = catch_up_open_step(session)
    blocks = 0
    full = session.recorder.full_sites
    if any(fnmatch.fnmatchcase(hooks.layer_site(0, "attn.k"), p) for p in full) and session.llm.num_steps:
        blocks = write_cache_snapshot(session.llm, os.path.join(path, KV_START))
    return {"requests": caught, "blocks": blocks}


def catch_up_open_step(session: Any) -> int:
    """List the running and waiting requests in the open step (the first one the new trace writes).

    The recorder lists them itself from the next step on; a step already begun when the recording
    starts would otherwise be written without them. Returns how many were added.
    """
    rec = session.recorder
    sched = session.llm.scheduler
    added = 0
    for st in list(rec._open.values()):
        for seq in (*sched.running, *sched.waiting):
            key = str(seq.seq_id)
            if key not in st.prompts:
                st.prompts[key] = {"token_ids": seq.token_ids[: seq.num_prompt_tokens],
                                   "generated": seq.completion_token_ids}
                added += 1
    return added


def cached_blocks(llm: Any) -> list[int]:
    """Blocks that hold keys a request may read: in use, or free but still cached for prefix hits."""
    bm = llm.block_manager
    cached_free = [b for b in bm.free_block_ids if bm.blocks[b].hash != -1]
    return sorted({*bm.used_block_ids, *cached_free})


def write_cache_snapshot(llm: Any, path: str) -> int:
    """Write the K cache of ``cached_blocks`` (every layer) with their slot numbers; returns the block count."""
    from safetensors.torch import save_file

    blocks = cached_blocks(llm)
    cache = llm.runner.kv_cache
    if not blocks or cache.numel() == 0:
        return 0
    bs = cache.shape[3]
    idx = torch.tensor(blocks, dtype=torch.long, device=cache.device)
    out = {"slots": (torch.tensor(blocks, dtype=torch.long).unsqueeze(1) * bs + torch.arange(bs)).flatten()}
    for layer in range(cache.shape[1]):
        k = cache[0, layer].index_select(0, idx)  # (blocks, block_size, kv_heads, head_dim)
        out[f"layers.{layer}.k"] = k.reshape(-1, *k.shape[2:]).cpu().contiguous()
    save_file(out, path, metadata={"what": "K cache at the start of a mid-run recording", "block_size": str(bs)})
    return len(blocks)
