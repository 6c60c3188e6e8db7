"""Bad input ends in one clear line naming the problem and the fix, never a traceback."""

from __future__ import annotations

import os
import shutil

import pytest

from minillama.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert err.startswith("minillama: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in err.lower(), err


def test_missing_model_folder(capsys, tmp_path):
    rc, err = run_cli(capsys, "generate", "hi", "--model", str(tmp_path / "nope"))
    assert_one_line(rc, err, "does not exist", "--model")


def test_half_copied_folder(capsys, tiny_llama_dir, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(tiny_llama_dir, half)
    os.remove(half / "config.json")
    rc, err = run_cli(capsys, "generate", "w1 w2", "--model", str(half), "--raw")
    assert_one_line(rc, err, "config.json", "copy")


def test_missing_shard_listed_in_index(capsys, tiny_llama_dir, tmp_path):
    import json

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, folder)
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors",
                                            "lm_head.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = run_cli(capsys, "generate", "w1", "--model", str(folder), "--raw")
    assert_one_line(rc, err, "missing", "00002")


@pytest.mark.parametrize("keep", [4, 100, 0.5, 0.999])
def test_truncated_safetensors(capsys, tiny_llama_dir, tmp_path, keep):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_llama_dir, folder)
    f = folder / "model.safetensors"
    size = f.stat().st_size
    n = int(size * keep) if isinstance(keep, float) else keep
    with open(f, "r+b") as fh:
        fh.truncate(n)
    rc, err = run_cli(capsys, "generate", "w1", "--model", str(folder), "--raw")
    assert_one_line(rc, err, "truncated", str(f))


def test_truncated_gguf(capsys, builtin_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(builtin_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(builtin_path) // 2))
    rc, err = run_cli(capsys, "generate", "hi", "--model", str(cut))
    assert_one_line(rc, err, str(cut))


def test_unknown_backend(capsys):
    rc, err = run_cli(capsys, "generate", "hi", "--backend", "magic")
    assert_one_line(rc, err, "magic", "torch")


def test_flash_attn_without_package(capsys):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash_attn is installed here")
    except ImportError:
        pass
    rc, err = run_cli(capsys, "generate", "hi", "--backend", "flash-attn")
    assert_one_line(rc, err, "flash_attn", "--backend torch")


def test_prompt_longer_than_context(capsys):
    rc, err = run_cli(capsys, "generate", "word " * 300, "--max-model-len", "64", "--raw")
    assert_one_line(rc, err, "max_model_len", "64")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_bad_max_tokens(capsys, n):
    rc, err = run_cli(capsys, "generate", "hi", "--max-tokens", n)
    assert_one_line(rc, err, "--max-tokens", "positive integer")


def test_generate_streams_an_answer(capsys):
    rc = main(["generate", "What is the capital of France?", "--max-tokens", "24"])
    out = capsys.readouterr().out
    assert rc == 0 and "Paris" in out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = "".join(capsys.readouterr().out.replace("│", "").split())
    assert "backendtorch" in out and "backendflash-attn" in out and "SmolLM2-135M-Instruct" in out
