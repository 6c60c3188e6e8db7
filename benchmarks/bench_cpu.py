"""minillama against transformers ``generate`` on this CPU: float32, one process, same torch thread count.

Two workloads on the built-in SmolLM2-135M-Instruct GGUF, greedy, EOS ignored so every run
produces exactly the asked number of tokens:

  single   one chat prompt, 128 new tokens. Reported: time to first token (prefill + first
           sample), decode throughput ((new tokens - 1) / time after the first token) and the
           end-to-end rate. The target ratio (minillama >= 1.3x) is on decode throughput.
  batch    16 chat prompts of 20..300 tokens, 64 new tokens each, all submitted at once:
           minillama's ``LLM.generate`` vs one left-padded batch of 16 in transformers.
           Output tokens / wall time (prefill included). Target: minillama >= 2x.

Fairness: both engines see the same token ids (minillama's chat template, which the tests
check against transformers'); minillama runs with prefix caching off (transformers has none, and
the repeats reuse the same prompts); runs alternate A B A B after a warm-up of each, and the
median of the repeats is reported. The greedy tokens of the two engines are compared.

The table goes to the terminal and, unless ``--no-record``, a section is appended to
``benchmarks/RESULTS.md`` with the date, machine, versions, load average and command.

    python benchmarks/bench_cpu.py            # full run (about 5 minutes on 2 idle cores)
    python benchmarks/bench_cpu.py --quick    # smoke run: smaller workloads, one repeat
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion draws a progress bar

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout without `pip install -e`
    sys.path.insert(0, str(ROOT))

from minillama import LLM, SamplingParams  # noqa: E402
from minillama.models.loader import builtin_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SINGLE_QUESTION = "Explain what a KV cache is in one paragraph, then give an example."
SYSTEM = "Answer briefly."  # a short system prompt, so the shortest chat prompt can be ~20 tokens
# Filler text for the prompts of the batch workload; prompt i starts at a different word.
FILLER = (
    "A river town wakes before dawn. Bakers light their ovens, fishermen check nets, and the ferry "
    "captain counts the crates of apples waiting on the pier. By noon the market is loud with "
    "traders from the hills who bring wool, cheese and stories about the winter storms. Children "
    "chase goats between the stalls while an old clockmaker repairs a brass compass for a sailor "
    "who plans to cross the northern sea. In the evening lanterns glow along the water, musicians "
    "play near the bridge, and the library keeps its doors open late for students reading about "
    "stars, tides, distant cities and the slow history of the mountains."
).split()


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def chat(llm: LLM, content: str) -> list[int]:
    return llm.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])


def batch_prompts(llm: LLM, n: int, min_len: int, max_len: int) -> list[list[int]]:
    """``n`` chat prompts whose lengths step evenly from about ``min_len`` to ``max_len`` tokens."""
    prompts = []
    for i in range(n):
        target = min_len + round(i * (max_len - min_len) / max(1, n - 1))
        words: list[str] = []
        ids = chat(llm, "Summarise:")
        while len(ids) < target:
            words.append(FILLER[(7 * i + len(words)) % len(FILLER)])
            ids = chat(llm, "Summarise: " + " ".join(words))
        prompts.append(ids)
    return prompts


# ---------------------------------------------------------------------------------------------
# One timed run of each engine
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # wall time of the whole generate
    first: float  # seconds until the first new token of the (first) sequence existed
    tokens: list[list[int]]  # new token ids per prompt
    cpu: float  # this process's CPU seconds / wall seconds (near the thread count when nothing competes)
    others: float  # CPU cores kept busy by other processes during the run, on average
    load: float  # 1-minute load average just before the run


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return sum(vals) - vals[3] - vals[4], sum(vals)


def _others(before: tuple[int, int] | None, after: tuple[int, int] | None, own_cpu: float, wall: float) -> float:
    """Average cores used by other processes between two ``_cpu_ticks`` readings ``wall`` seconds apart."""
    if before is None or after is None or after[1] == before[1]:
        return float("nan")
    ncpu = os.cpu_count() or 1
    busy_core_seconds = (after[0] - before[0]) / (after[1] - before[1]) * ncpu * wall
    return max(0.0, (busy_core_seconds - own_cpu) / wall)


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Sleep until other processes use fewer than ``threshold`` cores (1-s samples), at most ``max_wait`` s.

    Returns the last sample. Other engineers' test runs share this machine; starting a timed pair
    in a quiet moment keeps them out of most runs (the medians take care of the rest).
    """
    deadline = time.monotonic() + max_wait
    while True:
        b, c0, t0 = _cpu_ticks(), time.process_time(), time.perf_counter()
        time.sleep(1.0)
        busy = _others(b, _cpu_ticks(), time.process_time() - c0, time.perf_counter() - t0)
        if not busy > threshold or time.monotonic() >= deadline:  # nan (no /proc/stat) counts as quiet
            return busy


def _timed(fn) -> Run:
    load = os.getloadavg()[0]
    ticks, c0, t0 = _cpu_ticks(), time.process_time(), time.perf_counter()
    first, tokens = fn(t0)
    seconds = time.perf_counter() - t0
    own = time.process_time() - c0
    return Run(seconds, first, tokens, own / seconds, _others(ticks, _cpu_ticks(), own, seconds), load)


def run_minillama(llm: LLM, prompts: list[list[int]], new_tokens: int, step_loop: bool) -> Run:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def body(t0: float) -> tuple[float, list[list[int]]]:
        if not step_loop:
            outs = llm.generate(prompts, params)
            return float("nan"), [o.token_ids for o in outs]
        # What LLM.generate does, with a clock read after each step to catch the first token.
        seqs = [llm.add_request(p, params) for p in prompts]
        first = float("nan")
        while llm.has_unfinished():
            llm.step()
            if first != first and seqs[0].num_completion_tokens:
                first = time.perf_counter() - t0
        return first, [s.completion_token_ids for s in seqs]

    return _timed(body)


class _FirstTokenClock:
    """A transformers streamer that only notes when the first generated token arrives."""

    def __init__(self, t0: float) -> None:
        self.t0, self.puts, self.first = t0, 0, float("nan")

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


def run_hf(model, prompts: list[list[int]], new_tokens: int) -> Run:
    width = max(len(p) for p in prompts)  # left padding, zeros in the attention mask
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def body(t0: float) -> tuple[float, list[list[int]]]:
        clock = _FirstTokenClock(t0)
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
        return clock.first, out[:, width:].tolist()

    return _timed(body)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    engine: str
    workload: str
    tokens: int | None
    seconds: list[float]  # one per repeat
    higher_is_better: bool = True  # tok/s rows; False for the time-to-first-token row
    ratio: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float | None:
        return self.tokens / self.median if self.tokens else None


def fill_ratios(rows: list[Row]) -> None:
    """minillama over transformers: tok/s ratio, or for time-to-first-token the speed-up (hf s / ours s)."""
    by_key = {(r.engine, r.workload): r for r in rows}
    for r in rows:
        ref = by_key[("transformers", r.workload)]
        r.ratio = (r.rate / ref.rate) if r.higher_is_better else (ref.median / r.median)


def machine() -> tuple[str, str]:
    model, cpus = platform.processor() or "unknown", str(os.cpu_count())
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return model, cpus
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("Model name", model)
    cpus = fields.get("CPU(s)", cpus)
    per_core = fields.get("Thread(s) per core")
    if per_core and per_core != "1":
        cpus += f" ({per_core} threads per core)"
    return model, cpus


def git_state() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "minillama"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev} (minillama/ has uncommitted changes)" if dirty else rev


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_rate(r: Row) -> str:
    return f"{r.rate:.1f}" if r.rate else "-"


def fmt_ratio(r: Row) -> str:
    return "1.00x" if r.engine == "transformers" else f"{r.ratio:.2f}x"


def fmt_spread(r: Row) -> str:
    return f"{min(r.seconds):.3f}-{max(r.seconds):.3f}"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("engine", "left"), ("workload", "left"), ("tokens", "right"), ("seconds", "right"),
                          ("tok/s", "right"), ("ratio", "right"), ("min-max s", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        style = None
        if r.engine == "minillama":
            style = "bold"
        table.add_row(r.engine, r.workload, str(r.tokens or "-"), f"{r.median:.3f}", fmt_rate(r), fmt_ratio(r),
                      fmt_spread(r), style=style)
    Console(width=max(100, Console().width)).print(table)


def markdown_table(rows: list[Row]) -> list[str]:
    lines = ["| engine | workload | tokens | seconds (median) | tok/s | ratio | min-max s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.engine} | {r.workload} | {r.tokens or '-'} | {r.median:.3f} | {fmt_rate(r)} | "
                     f"{fmt_ratio(r)} | {fmt_spread(r)} |")
    return lines


def append_results(path: Path, section: list[str]) -> None:
    text = path.read_text() if path.exists() else ""
    if not text.strip():
        text = ("# Benchmark results\n\nOne section per run, newest last. Written by the benchmark scripts in this "
                "folder; timings are medians of interleaved repeats on a shared machine, so read them with the load "
                "average next to them.\n")
    path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section).rstrip("\n") + "\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 32 single-prompt tokens, 8 prompts x 16 tokens, 1 repeat (overrides the sizes)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each engine per workload (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for both engines (default: all cores)")
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=20, help="shortest batch prompt, tokens")
    ap.add_argument("--max-len", type=int, default=300, help="longest batch prompt, tokens")
    ap.add_argument("--only", choices=["single", "batch"], help="run one workload only")
    ap.add_argument("--wait-quiet", type=float, default=300, metavar="S",
                    help="before each A/B pair, wait up to S seconds for other processes to use < --quiet cores "
                         "(default 300; 0 = do not wait)")
    ap.add_argument("--quiet", type=float, default=0.15, help="cores other processes may use for 'quiet' (0.15)")
    ap.add_argument("--max-others", type=float, default=0.2,
                    help="redo an A/B pair during which other processes used more cores than this on average "
                         "(default 0.2: with 2 threads on 2 cores, a third of a core taken by others already "
                         "slows a run by half)")
    ap.add_argument("--retries", type=int, default=4, help="redos per pair at most; the last attempt is kept (4)")
    ap.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    a = ap.parse_args(argv)
    if a.quick:
        a.single_tokens, a.batch_size, a.batch_tokens, a.repeat = 32, 8, 16, 1
    if a.repeat < 1 or a.single_tokens < 2 or a.batch_size < 1 or a.batch_tokens < 1:
        ap.error("--repeat, --batch-size and --batch-tokens must be >= 1, --single-tokens >= 2")
    return a


def load_hf():
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder, name = os.path.split(builtin_model_path())
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    import transformers

    uptime_start = uptime()
    print(uptime_start)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")

    t = time.perf_counter()
    max_len = max(a.max_len, 64) + max(a.single_tokens, a.batch_tokens) + 64
    blocks_per_seq = -(-max_len // 16)
    llm = LLM(None, device="cpu", dtype="float32", enable_prefix_caching=False, max_model_len=max_len,
              max_num_seqs=max(a.batch_size, 1), num_kvcache_blocks=blocks_per_seq * max(a.batch_size, 1) + 8)
    hf = load_hf()
    print(f"loaded both engines in {time.perf_counter() - t:.1f} s")

    single = [chat(llm, SINGLE_QUESTION)]
    batch = batch_prompts(llm, a.batch_size, a.min_len, a.max_len)
    lens = sorted(len(p) for p in batch)
    print(f"single prompt: {len(single[0])} tokens; batch: {len(batch)} prompts, {lens[0]}..{lens[-1]} tokens "
          f"(sum {sum(lens)})")

    # Warm-up: first calls allocate buffers and pick kernels; keep them out of the medians.
    run_minillama(llm, single, 4, step_loop=True)
    run_hf(hf, single, 4)
    if a.only != "single":
        run_minillama(llm, batch, 2, step_loop=False)
        run_hf(hf, batch, 2)

    runs: dict[tuple[str, str], list[Run]] = {}
    discarded = 0
    workloads = [("single", single, a.single_tokens), ("batch", batch, a.batch_tokens)]
    for name, prompts, n in workloads:
        if a.only and a.only != name:
            continue
        for i in range(a.repeat):  # A B A B: drift in the machine's load hits both engines alike
            for attempt in range(a.retries + 1):
                if a.wait_quiet > 0:
                    wait_quiet(a.wait_quiet, a.quiet)
                r_ml = run_minillama(llm, prompts, n, step_loop=name == "single")
                r_hf = run_hf(hf, prompts, n)
                busy = max(r_ml.others, r_hf.others)
                redo = busy > a.max_others and attempt < a.retries
                print(f"  {name} {i + 1}/{a.repeat}: minillama {r_ml.seconds:.2f} s, transformers {r_hf.seconds:.2f} "
                      f"s (other processes {r_ml.others:.2f}/{r_hf.others:.2f} cores, own cpu "
                      f"{r_ml.cpu:.2f}/{r_hf.cpu:.2f}){'  -> busy machine, discarded' if redo else ''}")
                if not redo:
                    break
                discarded += 1
            runs.setdefault(("minillama", name), []).append(r_ml)
            runs.setdefault(("transformers", name), []).append(r_hf)
    uptime_end = uptime()

    rows: list[Row] = []
    checks: list[str] = []
    single_label = "1 prompt"
    batch_label = f"{len(batch)} prompts"
    engines = ("minillama", "transformers")
    if ("minillama", "single") in runs:
        n = a.single_tokens
        for e in engines:
            rows.append(Row(e, f"{single_label}: decode", n - 1, [r.seconds - r.first for r in runs[(e, "single")]]))
        for e in engines:
            rows.append(Row(e, f"{single_label}: first token", None,
                            [r.first for r in runs[(e, "single")]], higher_is_better=False))
        for e in engines:
            rows.append(Row(e, f"{single_label}: end to end", n, [r.seconds for r in runs[(e, "single")]]))
    if ("minillama", "batch") in runs:
        for e in engines:
            rows.append(Row(e, f"{batch_label}: end to end", len(batch) * a.batch_tokens,
                            [r.seconds for r in runs[(e, "batch")]]))
    fill_ratios(rows)

    verdicts = []
    if ("minillama", "single") in runs:
        ours, ref = runs[("minillama", "single")][0].tokens[0], runs[("transformers", "single")][0].tokens[0]
        same = sum(x == y for x, y in zip(ours, ref, strict=True))
        diverge = next((i for i, (x, y) in enumerate(zip(ours, ref, strict=True)) if x != y), None)
        stable = all(r.tokens == runs[(e, "single")][0].tokens for e in ("minillama", "transformers")
                     for r in runs[(e, "single")])
        checks.append(f"single prompt greedy tokens equal: {'yes' if ours == ref else 'NO'} ({same}/{len(ref)} "
                      f"positions{'' if diverge is None else f', first difference at token {diverge}'}); "
                      f"identical across repeats: {'yes' if stable else 'NO'}")
        ratio = next(r.ratio for r in rows if r.engine == "minillama" and r.workload == f"{single_label}: decode")
        verdicts.append(f"single decode >= 1.3x transformers: {'MET' if ratio >= 1.3 else 'MISSED'} ({ratio:.2f}x)")
    if ("minillama", "batch") in runs:
        ours_b, ref_b = runs[("minillama", "batch")][0].tokens, runs[("transformers", "batch")][0].tokens
        equal = sum(x == y for x, y in zip(ours_b, ref_b, strict=True))
        checks.append(f"batch greedy tokens equal: {equal}/{len(ours_b)} sequences "
                      "(informational: left padding changes float rounding in transformers)")
        ratio = next(r.ratio for r in rows if r.engine == "minillama" and r.workload.startswith(batch_label))
        verdicts.append(f"batch >= 2x transformers: {'MET' if ratio >= 2 else 'MISSED'} ({ratio:.2f}x)")

    all_runs = [r for rs in runs.values() for r in rs]
    loads, others = [r.load for r in all_runs], [r.others for r in all_runs]
    cpu = {e: statistics.median(r.cpu for (eng, _), rs in runs.items() if eng == e for r in rs) for e in engines}
    load_line = (f"1-min load average before the timed runs: {min(loads):.2f}..{max(loads):.2f} (median "
                 f"{statistics.median(loads):.2f}) on {os.cpu_count()} CPUs; cores used by other processes during "
                 f"the runs: {min(others):.2f}..{max(others):.2f} (median {statistics.median(others):.2f}); own "
                 f"CPU/wall, median: minillama {cpu['minillama']:.2f}, transformers {cpu['transformers']:.2f}; "
                 f"A/B pairs discarded for a busy machine: {discarded}")

    title = f"minillama vs transformers, CPU float32, {torch.get_num_threads()} threads, median of {a.repeat}"
    print()
    print_table(rows, title)
    for line in checks + verdicts + [load_line, f"uptime at start: {uptime_start}", f"uptime at end:   {uptime_end}"]:
        print(line)

    if a.no_record:
        return
    model, cpus = machine()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT) if argv is None else "benchmarks/bench_cpu.py",
                          *(sys.argv[1:] if argv is None else argv)])
    section = [
        f"## {when}: bench_cpu.py{' (quick)' if a.quick else ''}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {model}, {cpus} CPUs; torch threads: {torch.get_num_threads()}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; minillama git {git_state()}",
        f"- Workloads: single = one chat prompt of {len(single[0])} tokens, {a.single_tokens} new tokens; "
        f"batch = {len(batch)} chat prompts of {lens[0]}..{lens[-1]} tokens (sum {sum(lens)}), "
        f"{a.batch_tokens} new tokens each. Greedy, EOS ignored, float32, minillama torch backend with prefix "
        f"caching off, transformers `generate` defaults (DynamicCache, sdpa), batch left-padded",
        f"- Load: {load_line}",
        f"- `uptime`: start `{uptime_start}`; end `{uptime_end}`",
        "",
        *markdown_table(rows),
        "",
        "seconds = median over the repeats; decode = time after the first token for the remaining tokens; ratio = "
        "minillama tok/s over transformers tok/s (first-token row: transformers seconds over minillama seconds).",
        "",
        *(f"- {line}" for line in checks + verdicts),
    ]
    append_results(a.results, section)
    print(f"appended to {a.results}")


if __name__ == "__main__":
    main()
