"""Write a synthetic trace: fixed, model-free content for the TUI's snapshot tests, demos and benchmarks.

    python -m tui.synthetic traces/demo            # a small trace (6 layers, 3 requests, a planted error)
    minillama-tui traces/demo

A toy scheduler (token budget, paged blocks, prefix hits, chunked prefill, a request arriving
later so one step is mixed) drives random but seeded tensors; attention outputs are real softmax
attention over the keys in a toy paged cache, so the attention view's recomputed weights agree
with them. One layer's active attention output gets ``planted`` added, as a buggy kernel would.
Values are rounded to multiples of 2**-10, so statistics and hashes are the same on every machine.
The trace is written with the engine's own ``TraceWriter``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from minillama.debug.records import row_ranges, tensor_stats
from minillama.debug.shadow import compare
from minillama.trace.writer import TraceWriter

WORDS = ("the", "cache", "block", "token", "paged", "attention", "layer", "step", "query", "key", "value",
         "prefix", "batch", "chunk", "decode", "prefill")


@dataclass
class SyntheticSpec:
    """The shape of the run. The defaults give a small trace that fits a 120x40 screen."""

    num_layers: int = 6
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    vocab: int = 64
    block_size: int = 4
    num_blocks: int = 24
    token_budget: int = 12
    #: (prompt length, tokens shared with request 0's prompt, step it arrives at, tokens to generate)
    requests: list[tuple[int, int, int, int]] = field(
        default_factory=lambda: [(14, 0, 0, 4), (13, 8, 0, 4), (6, 0, 2, 2)])
    planted_layer: int | None = 2
    planted: float = 0.5
    seed: int = 0


class _Seq:
    def __init__(self, sid: int, prompt: list[int], arrive: int, max_tokens: int) -> None:
        self.sid, self.tokens, self.prompt_len = sid, list(prompt), len(prompt)
        self.arrive, self.max_tokens = arrive, max_tokens
        self.computed = self.cached = 0
        self.blocks: list[int] = []
        self.done: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def _q(t: torch.Tensor) -> torch.Tensor:
    """Round to multiples of 2**-10 (exact in float32: the same bits everywhere)."""
    return torch.round(t * 1024) / 1024


class _Run:
    """The toy engine: scheduler, block manager (with prefix cache), paged K/V and the fake network."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.gen = torch.Generator().manual_seed(spec.seed)
        self.seqs: list[_Seq] = []
        for sid, (n, shared, arrive, max_tokens) in enumerate(spec.requests):
            own = [int(x) for x in torch.randint(3, spec.vocab, (n,), generator=self.gen)]
            base = self.seqs[0].tokens[:shared] if self.seqs else []
            self.seqs.append(_Seq(sid, base + own[: n - len(base)], arrive, max_tokens))
        self.ref = [0] * spec.num_blocks
        self.block_hash: dict[int, tuple] = {}  # block -> the token prefix it completes (prefix cache)
        self.by_hash: dict[tuple, int] = {}
        slots = spec.num_blocks * spec.block_size
        self.k_cache = torch.zeros(spec.num_layers, slots, spec.kv_heads, spec.head_dim)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.hit_tokens = 0
        self.running: list[_Seq] = []

    # ---- blocks ---------------------------------------------------------------------------------
    def _free_blocks(self) -> list[int]:
        """Free blocks, never-hashed ones first (hashed ones keep their prefix as long as possible)."""
        free = [b for b in range(self.spec.num_blocks) if self.ref[b] == 0]
        return sorted(free, key=lambda b: (b in self.block_hash, b))

    def _take(self) -> int:
        b = self._free_blocks()[0]
        if b in self.block_hash:
            self.by_hash.pop(self.block_hash.pop(b), None)
        self.ref[b] = 1
        return b

    def _admit(self, seq: _Seq) -> None:
        bs = self.spec.block_size
        full = (seq.prompt_len - 1) // bs  # the last prompt block is never a hit
        for i in range(full):
            b = self.by_hash.get(tuple(seq.tokens[: (i + 1) * bs]))
            if b is None:
                break
            self.ref[b] += 1
            seq.blocks.append(b)
        seq.computed = seq.cached = len(seq.blocks) * bs
        self.hit_tokens += seq.cached

    def _grow(self, seq: _Seq, upto: int) -> None:
        bs = self.spec.block_size
        while len(seq.blocks) * bs < upto:
            seq.blocks.append(self._take())

    def _commit(self, seq: _Seq) -> None:
        bs = self.spec.block_size
        for i in range(seq.computed // bs):
            key = tuple(seq.tokens[: (i + 1) * bs])
            b = seq.blocks[i]
            if b not in self.block_hash and key not in self.by_hash:
                self.block_hash[b], self.by_hash[key] = key, b

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self, step: int) -> list[tuple[_Seq, int]]:
        budget = self.spec.token_budget
        batch = []
        for seq in self.running:
            n = min(len(seq.tokens) - seq.computed, budget)
            if n <= 0:
                continue
            self._grow(seq, seq.computed + n)
            batch.append((seq, n))
            budget -= n
        for seq in self.seqs:
            if seq in self.running or seq.done or seq.arrive > step or budget <= 0:
                continue
            self._admit(seq)
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.computed, budget)
            self._grow(seq, seq.computed + n)
            batch.append((seq, n))
            budget -= n
        return batch

    def summary(self, step: int, batch: list[tuple[_Seq, int]]) -> dict[str, Any]:
        bs = self.spec.block_size
        seqs, slots = [], []
        for seq, n in batch:
            a = seq.computed
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(a, a + n)]
            seqs.append({"seq_id": seq.sid, "prompt_len": seq.prompt_len, "len": len(seq.tokens), "num_computed": a,
                         "num_new": n, "chunk": [a, a + n], "num_cached": seq.cached,
                         "block_table": list(seq.blocks), "preemptions": 0, "samples": a + n == len(seq.tokens)})
        decode = [s["num_computed"] == s["len"] - 1 for s in seqs]
        phase = "decode" if all(decode) else ("prefill" if not any(decode) else "mixed")
        used = [b for b in range(self.spec.num_blocks) if self.ref[b] > 0]
        cu = [0]
        for s in seqs:
            cu.append(cu[-1] + s["num_new"])
        waiting = [s.sid for s in self.seqs if s not in self.running and not s.done and s.arrive <= step]
        return {"step": step, "phase": phase, "num_tokens": cu[-1], "seqs": seqs, "cu_seqlens_q": cu,
                "context_lens": [s["num_computed"] + s["num_new"] for s in seqs], "slot_mapping": slots,
                "block_size": bs, "num_blocks": self.spec.num_blocks,
                "num_free_blocks": self.spec.num_blocks - len(used),
                "blocks": {str(b): {"ref": self.ref[b], "cached": b in self.block_hash} for b in used},
                "num_cached_free_blocks": sum(1 for b in self.block_hash if self.ref[b] == 0),
                "prefix_hit_tokens_total": self.hit_tokens, "preempted": [], "preemptions_total": 0,
                "waiting": waiting}

    def _rand(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return _q(torch.randn(*shape, generator=self.gen) * scale)

    def forward(self, batch: list[tuple[_Seq, int]], summary: dict[str, Any]):
        """Every site's tensor for the step, the shadow metrics and the recorder-style full tensors."""
        sp = self.spec
        T = summary["num_tokens"]
        slots = torch.tensor(summary["slot_mapping"], dtype=torch.long)
        sites: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        shadow: dict[str, Any] = {}
        x = self._rand(T, sp.hidden, scale=0.1)
        sites["embed"] = x
        for layer in range(sp.num_layers):
            sites[f"layers.{layer}.input"] = x
            q = self._rand(T, sp.heads, sp.head_dim)
            k = self._rand(T, sp.kv_heads, sp.head_dim)
            v = self._rand(T, sp.kv_heads, sp.head_dim, scale=0.5)
            sites[f"layers.{layer}.attn.q"], sites[f"layers.{layer}.attn.k"] = q, k
            sites[f"layers.{layer}.attn.v"] = v
            self.k_cache[layer, slots], self.v_cache[layer, slots] = k, v
            ref = torch.zeros(T, sp.heads, sp.head_dim, dtype=torch.float64)
            rep = sp.heads // sp.kv_heads  # GQA: query head h reads kv head h // rep
            for (seq, n), a in zip(batch, summary["cu_seqlens_q"], strict=False):
                ctx = seq.computed + n
                bs = sp.block_size
                kv_slots = torch.tensor([seq.blocks[p // bs] * bs + p % bs for p in range(ctx)])
                kk = self.k_cache[layer, kv_slots].double().repeat_interleave(rep, dim=1)
                vv = self.v_cache[layer, kv_slots].double().repeat_interleave(rep, dim=1)
                s = torch.einsum("qhd,khd->hqk", q[a:a + n].double(), kk) * sp.head_dim**-0.5
                masked = torch.arange(ctx).unsqueeze(0) > torch.arange(n).unsqueeze(1) + seq.computed
                s = s.masked_fill(masked, float("-inf"))
                ref[a:a + n] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)
            plain = _q(ref.float())
            active = plain + (sp.planted if layer == sp.planted_layer else 0.0)
            shadow[str(layer)] = {"backend": "reference", **compare(active, None, ref, plain)}
            extra[f"layers.{layer}.attn.out"] = active
            extra[f"layers.{layer}.attn.out@ref"] = ref.float()
            sites[f"layers.{layer}.attn.out"] = active
            mlp = self._rand(T, sp.hidden, scale=0.2)
            sites[f"layers.{layer}.mlp.out"] = mlp
            x = _q(x + mlp + active.flatten(1)[:, : sp.hidden] * 0.1)
            sites[f"layers.{layer}.output"] = x
        sites["final_norm"] = _q(x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-3))
        sample_rows = [i for i, (seq, n) in enumerate(batch) if seq.computed + n == len(seq.tokens)]
        logits = self._rand(len(sample_rows), sp.vocab, scale=3.0)
        sites["logits"] = logits
        sites["sampled"] = logits.argmax(-1) if len(sample_rows) else torch.zeros(0, dtype=torch.long)
        return sites, extra, shadow, sample_rows


def _text(ids: list[int]) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in ids)


def write_synthetic_trace(path: str, spec: SyntheticSpec | None = None, full: bool = True) -> int:
    """Write the trace to ``path`` (a new folder); returns the number of steps. ``full`` keeps every site."""
    spec = spec or SyntheticSpec()
    run = _Run(spec)
    manifest = {
        "model": {"name": "synthetic", "path": "synthetic", "format": "synthetic"},
        "model_config": {"num_hidden_layers": spec.num_layers, "hidden_size": spec.hidden,
                         "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
                         "head_dim": spec.head_dim, "vocab_size": spec.vocab},
        "requests": [{"index": s.sid, "seq_id": s.sid, "prompt": _text(s.tokens), "chat": False,
                      "prompt_token_ids": s.tokens} for s in run.seqs],
        "backend": "torch", "shadow": "reference", "device": "cpu", "dtype": "float32",
        "recording": {"stats": True, "full_sites": ["*"] if full else [], "max_bytes": None},
        "engine_config": {"kvcache_block_size": spec.block_size, "max_num_batched_tokens": spec.token_budget},
        "num_kvcache_blocks": spec.num_blocks,
    }
    seen: set[int] = set()
    step = 0
    with TraceWriter(path, manifest) as writer:
        while any(not s.done for s in run.seqs):
            batch = run.schedule(step)
            if not batch:
                step += 1
                continue
            summary = run.summary(step, batch)
            sites, extra, shadow, sample_rows = run.forward(batch, summary)
            rows = row_ranges([s.sid for s, _ in batch], [n for _, n in batch])
            ev: dict[str, Any] = {"type": "step", "step": step, "phase": summary["phase"], "batch": summary,
                                  "sites": {}, "shadow": shadow, "site_times_ms": {}}
            for i, (name, t) in enumerate(sites.items()):
                rec = tensor_stats(t)
                if name == "sampled" or name == "logits":
                    rec["rows"] = [[batch[r][0].sid, j, j + 1] for j, r in enumerate(sample_rows)]
                else:
                    rec["rows"] = rows
                rec["full"] = full or name == "sampled"
                ev["sites"][name] = rec
                ev["site_times_ms"][name] = round(0.05 * (i + 1), 3)
            ev["prompts"] = {str(s.sid): {"token_ids": s.tokens[: s.prompt_len], "text": _text(s.tokens[: s.prompt_len])}
                             for s, _ in batch if s.sid not in seen}
            seen.update(s.sid for s, _ in batch)
            tensors = {"batch.slot_mapping": torch.tensor(summary["slot_mapping"], dtype=torch.int64)}
            width = max(len(s["block_table"]) for s in summary["seqs"])
            tensors["batch.block_tables"] = torch.tensor(
                [s["block_table"] + [-1] * (width - len(s["block_table"])) for s in summary["seqs"]], dtype=torch.int32)
            tensors.update(extra)
            tensors["sampled"] = sites["sampled"]
            if full:
                tensors.update(sites)
            # postprocess: account tokens, sample, finish
            sampled, finished = {}, []
            tokens = iter(sites["sampled"].tolist())
            for seq, n in batch:
                seq.computed += n
                run._commit(seq)
                if seq.computed == len(seq.tokens):
                    tok = next(tokens)
                    seq.tokens.append(tok)
                    sampled[str(seq.sid)] = tok
                    if len(seq.generated) >= seq.max_tokens:
                        seq.done = "length"
                        finished.append([seq.sid, "length"])
                        for b in seq.blocks:
                            run.ref[b] -= 1
                        run.running.remove(seq)
            ev["sampled"] = sampled
            ev["finished"] = finished
            ev["texts"] = {str(s.sid): _text(s.generated) for s, _ in batch}
            ev["token_ids"] = {str(s.sid): s.generated for s, _ in batch}
            ev["missing_sites"] = []
            ev["elapsed_ms"] = 1.0
            writer.write_step(ev, tensors)
            step += 1
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tui.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("out", help="a new folder to write the trace to")
    a = p.parse_args(argv)
    n = write_synthetic_trace(a.out)
    print(f"wrote {n} steps to {a.out}; open it with: minillama-tui {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
