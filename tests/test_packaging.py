"""The source distribution carries what the tests need, and the metadata is what pyproject.toml says.

The sdist is built with setuptools' own PEP 517 hook (no isolated environment, no network) from a
copy of the project, so the checkout is left as it was (no egg-info written into it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".device", "traces"}


def _copy_project(dest: str) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _SKIP or n.endswith(".egg-info")}

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    os.makedirs(os.path.join(dest, "traces"))
    shutil.copy(os.path.join(ROOT, "traces", "README.md"), os.path.join(dest, "traces"))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[list[str], str]:
    pytest.importorskip("setuptools")
    base = tmp_path_factory.mktemp("sdist")
    src, out = str(base / "src"), str(base / "out")
    _copy_project(src)
    os.makedirs(out)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, out], cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Deprecat" not in done.stderr, done.stderr[-2000:]  # e.g. the table form of `license`
    name = done.stdout.strip().splitlines()[-1]
    with tarfile.open(os.path.join(out, name)) as tar:
        members = tar.getnames()
        top = members[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    return [m.split("/", 1)[1] for m in members if "/" in m], pkg_info


def test_sdist_carries_the_tests_and_what_they_read(sdist):
    files, _ = sdist
    listed = set(files)
    tests = {f"tests/{n}" for n in os.listdir(os.path.join(ROOT, "tests")) if n.endswith(".py")}
    assert tests <= listed, sorted(tests - listed)
    assert "tests/conftest.py" in listed
    snapshots = [f for f in files if f.startswith("tests/__snapshots__/") and f.endswith(".svg")]
    on_disk = sum(len(fs) for _, _, fs in os.walk(os.path.join(ROOT, "tests", "__snapshots__")))
    assert snapshots and len(snapshots) == on_disk
    for needed in ("LICENSE", "README.md", "pyproject.toml", "tui/app.tcss", "minillama/cli.py", "scripts/dev.sh",
                   "benchmarks/bench_load_rss.py", "traces/README.md"):
        assert needed in listed, needed
    assert not any(f.startswith("traces/h200") for f in files), "the 17 MB trace stays out of the sdist"
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_metadata_licence_and_pins(sdist):
    _, pkg_info = sdist
    assert "License-Expression: MIT" in pkg_info
    assert "License-File: LICENSE" in pkg_info
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the minillama authors" in text
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = project["dependencies"]
    assert "jinja2>=3.1.6" in deps and "torch>=2.4" in deps
    assert "Requires-Dist: jinja2>=3.1.6" in pkg_info
    assert project["scripts"]["minillama-tui"] == "minillama_tui.cli:main"  # tui/ installs as minillama_tui
