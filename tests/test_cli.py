"""What a user meets first on the command line: help, --version, one-line errors before any heavy
import, ``info`` in full and as JSON, progress bars only on a terminal, and scripts/dev.sh's usage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from minillama import progress
from minillama.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def one_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("minillama: error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_version_help_and_command_errors(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == "minillama 0.1.0"
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "``" not in top and "examples:" in top and "generate" in top and "trace" in top
    err = one_line(capsys, main([]), "choose a command: generate, info, record, check-invariance, diff, trace")
    assert "cmd" not in err.replace("command", "")
    err = one_line(capsys, main(["trace"]), "choose a command: info, export-perfetto")
    assert "trace_cmd" not in err
    one_line(capsys, main(["gen", "hi"]), "unknown command 'gen'")
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--max-tokens N tokens to generate at most (default: 256)", "(default: 1.0)", "--top-k K",
                  "--seed S", "--ignore-eos", "--max-model-len N", "prompt the question", "(default: 4096)"):
        assert shown in text, shown


@pytest.mark.parametrize("argv,needle", [
    (["generate", "hi", "--max-model-len", "-5"], "--max-model-len: must be a positive integer, got -5"),
    (["generate", "hi", "--seed", str(2**64)], "--seed: must be below 2**63"),
    (["generate", "hi", "--temperature", "nan"], "--temperature: must be a finite number"),
    (["generate", "hi", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["generate", "hi", "--dtype", "float8"], "--dtype: choose one of auto"),
    (["info", "--device", "gpu"], "--device: choose auto, cpu, cuda or cuda:N"),
    (["record", "--out", "x", "--prompt", "p", "--backend", "magic"], "--backend: choose one of torch, triton, flash-attn"),
])
def test_bad_options_are_one_line(capsys, argv, needle):
    one_line(capsys, main(argv), needle)


def test_a_bad_option_of_a_command_points_at_that_command_s_help(capsys):
    assert main(["record", "--out", "x", "--prompt", "p", "--backend", "magic"]) == 2
    assert "(see 'minillama record --help')" in capsys.readouterr().err


def test_backend_triton_is_accepted_by_the_command_line(capsys):
    """--help and the README offer `--backend triton`; the option check refused it ('choose one of torch,
    flash-attn'). Where triton cannot run, the engine says why in one line."""
    from minillama.options import check_backend

    assert check_backend("triton") == "triton"
    rc = main(["generate", "hi", "--backend", "triton", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert "choose one of" not in err
    if rc != 0:
        assert rc == 2 and err.count("\n") == 1 and "triton" in err


@pytest.mark.parametrize("argv", [["generate", "hi", "--backend", "magic"], ["info", "--device", "gpu"],
                                  ["record", "--out", "x", "--prompt", "p", "--dtype", "f8"],
                                  ["generate", "hi", "--max-model-len", "-5"]])
def test_bad_options_fail_before_torch_is_imported(argv):
    code = ("import sys; from minillama.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)


def test_tui_options_fail_before_the_app_is_imported():
    code = ("import sys; from tests.tui_alias import ensure_minillama_tui; ensure_minillama_tui(); "
            "from minillama_tui.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'textual' in sys.modules)")
    for argv in (["--backend", "magic"], ["--device", "gpu"], ["--max-tokens", "0"], ["/no/such/trace"]):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV,
                              timeout=60)
        assert done.stdout.split() == ["2", "False", "False"], (argv, done.stdout, done.stderr)
        assert done.stderr.startswith("minillama-tui: error: ") and done.stderr.count("\n") == 1, done.stderr
    done = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, env=ENV)
    assert done.stdout.startswith("minillama-tui 0.1.0")


def test_non_utf8_prompt_is_one_line(capsys):
    one_line(capsys, main(["generate", "caf\udce9"]), "not valid UTF-8")


def test_info_prints_full_values_when_piped_and_json(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    path = next(line for line in lines if line.startswith("path: ")).removeprefix("path: ")
    assert os.path.isfile(path) and path.endswith(".gguf")  # the whole path, not cut to a width
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == path and info["config"]["num_hidden_layers"] == 30
    assert info["backends"]["torch"] is None and isinstance(info["backends"]["flash-attn"], str | type(None))


def test_info_table_on_a_narrow_terminal_wraps_the_path(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["info"]) == 0
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # colours
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    from minillama.models.loader import builtin_model_path

    assert builtin_model_path() in "".join(out.replace("│", "").split())  # folded, every character kept


def test_progress_draws_only_on_a_terminal_and_feeds_listeners():
    seen: list[progress.ProgressUpdate] = []
    progress.add_listener(seen.append)
    try:
        assert not progress.drawing()  # pytest captures stderr: not a terminal
        assert list(progress.track(range(3), "counting", unit="items")) == [0, 1, 2]
        with progress.task("loading", total=None) as t:
            assert t.watched  # a listener sees it
            t.update(completed=5, total=10, description="loading (5)")
    finally:
        progress.remove_listener(seen.append)
    with progress.task("unseen") as t:
        assert not t.watched
    assert [u.completed for u in seen if u.description == "counting"] == [0, 1, 2, 3, 3]
    assert seen[-1] == progress.ProgressUpdate("loading (5)", 5, 10, "", True)
    progress.set_quiet(True)
    try:
        assert not progress.drawing()
    finally:
        progress.set_quiet(False)


@pytest.mark.parametrize("args,rc", [(["--help"], 0), (["help"], 0), ([], 2), (["frob"], 2)])
def test_dev_sh_prints_usage_without_installing(tmp_path, args, rc):
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "dev.sh"), *args], capture_output=True,
                          text=True, env={**os.environ, "MINILLAMA_VENV": str(venv)}, timeout=30)
    assert done.returncode == rc and "usage: scripts/dev.sh" in done.stdout + done.stderr
    assert "test -m \"not slow\"" in done.stdout + done.stderr
    assert not venv.exists(), "usage must not set anything up"


def test_record_into_a_folder_that_cannot_be_made_is_one_line(tiny_llama_dir, capsys):
    rc = main(["record", "--out", "/proc/minillama-nope/x", "--prompt", "w4", "--raw", "--model", tiny_llama_dir,
               "--device", "cpu", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot write the trace folder" in err and "--out" in err
