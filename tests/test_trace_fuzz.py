"""Traces from strangers: a seeded fuzz of a few hundred mutated traces.

Each mutant goes through every reader accessor and the trace CLI commands. Allowed outcomes: it
works, or one ``TraceError`` line (``minillama: error: ...``, exit 2). Never another exception, a
traceback, a hang, Rich markup taken from the trace, or a file read outside the trace folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import pytest

from minillama.cli import main as cli_main
from minillama.trace import TraceError, TraceReader
from tests.traces import record_trace

BAD_VALUES = ["[/x]", "[bold red]spoof[/]", [], {}, [[1]], -1, 2**62, 1e308, float("nan"), None, True, "x" * 300, 3.5]
MANIFEST_FIELDS = ["model", "model_config", "requests", "backend", "shadow", "dtype", "sites", "num_kvcache_blocks",
                   "recording", "versions", "sampling", "created", "device"]
STEP_FIELDS = ["step", "phase", "sampled", "pieces", "prompts", "finished", "missing_sites", "kv", "data",
               "preempted", "waiting", "elapsed_ms", "graphed"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llama_dir) -> str:
    return record_trace(tmp_path_factory.mktemp("fuzz") / "base", tiny_llama_dir, ["w5 w6 w7", "w8 w9"], max_tokens=3,
                        shadow="torch", full=["layers.0.mlp.out"])


def exercise(path: str) -> None:
    """Every accessor a view or command uses, over the whole trace."""
    r = TraceReader(path)
    _ = (r.status, r.num_layers, r.catalog, r.size_bytes)
    r.requests()
    for i in range(r.num_steps):
        ev = r.step(i)
        for name in r.site_names(i):
            r.stats(i, name)
            for s in ev["batch"]["seqs"][:2]:
                r.stats(i, name, s["seq_id"])
        r.shadow(i)
        for key in r.tensor_keys(i)[:4]:
            r.tensor(i, key)


def _rewrite_json(path: str, fn) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    fn(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _rewrite_step(path: str, rng: random.Random, fn) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    k = rng.randrange(len(lines) - 1)
    ev = json.loads(lines[k])
    fn(ev)
    lines[k] = json.dumps(ev)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _flip(path: str, rng: random.Random, n: int) -> None:
    data = bytearray(open(path, "rb").read())
    for _ in range(n):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    open(path, "wb").write(bytes(data))


def mutate(path: str, rng: random.Random, decoy: str) -> str:
    """One random damage; returns what was done (for the failure message)."""
    kind = rng.choice(["manifest", "step", "step", "flip_events", "flip_data", "cut", "link", "long_line"])
    man, ev, data = (os.path.join(path, n) for n in ("manifest.json", "events.jsonl", "data.bin"))
    if kind == "manifest":
        field, value = rng.choice(MANIFEST_FIELDS), rng.choice(BAD_VALUES)
        _rewrite_json(man, lambda m: m.__setitem__(field, value))
        return f"manifest {field}={value!r:.30}"
    if kind == "step":
        field, value = rng.choice(STEP_FIELDS), rng.choice(BAD_VALUES)
        _rewrite_step(ev, rng, lambda e: e.__setitem__(field, value))
        return f"step {field}={value!r:.30}"
    if kind == "flip_events":
        _flip(ev, rng, rng.randint(1, 4))
    elif kind == "flip_data":
        _flip(data, rng, rng.randint(1, 6))
    elif kind == "cut":
        victim = rng.choice([ev, data, man])
        size = os.path.getsize(victim)
        with open(victim, "r+b") as f:
            f.truncate(rng.randrange(size) if size else 0)
        return f"cut {os.path.basename(victim)}"
    elif kind == "link":
        victim = rng.choice([ev, data, man])
        os.remove(victim)
        os.symlink(decoy, victim)
        return f"link {os.path.basename(victim)}"
    else:
        with open(ev, "a", encoding="utf-8") as f:
            f.write('{"type": "step", "junk": "' + "x" * 2_000_000 + '"}\n')
    return kind


def test_mutated_traces_fail_in_one_line(base, tmp_path, capsys):
    decoy = str(tmp_path / "outside.json")
    with open(decoy, "w") as f:
        f.write('{"format": "minillama-trace", "version": 2}\n')
    opened: list[str] = []

    def audit(event, args):
        if event == "open" and args and isinstance(args[0], str) and os.path.realpath(args[0]) == decoy:
            opened.append(args[0])

    sys.addaudithook(audit)
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for k in range(400):
        path = str(tmp_path / f"m{k}")
        shutil.copytree(base, path)
        what = mutate(path, rng, decoy)
        try:
            exercise(path)
            outcomes["ok"] += 1
        except TraceError as e:
            assert "\n" not in str(e), (what, str(e))
            outcomes["error"] += 1
        except Exception as e:  # pragma: no cover - what the test is for
            pytest.fail(f"mutation {k} ({what}) raised {type(e).__name__}: {e}")
        if k % 6 == 0:  # the commands too: one line and exit 2, never a traceback or markup
            for argv in (["trace", "info", path], ["trace", "info", path, "--json"], ["diff", "--shadow", path],
                         ["diff", base, path],
                         ["trace", "export-perfetto", path, str(tmp_path / f"p{k}.json")]):
                rc = cli_main(argv)
                out = capsys.readouterr()
                assert rc in (0, 1, 2), (what, argv, rc)
                assert "Traceback" not in out.err and len(out.err.strip().splitlines()) <= 1, (what, argv, out.err)
                assert "spoof" not in out.out or "[bold red]spoof[/]" in out.out, (what, "markup was rendered")
        shutil.rmtree(path, ignore_errors=True)
    assert not opened, f"read outside the trace folder: {opened[:3]}"
    assert outcomes["ok"] > 10 and outcomes["error"] > 50, outcomes
