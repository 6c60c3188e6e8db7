"""Make ``import minillama_tui`` work in a checkout that is on ``sys.path`` but not (re)installed.

The debugger's folder is ``tui/`` and installs as ``minillama_tui`` (pyproject's package-dir). An
editable or regular install provides that name; a bare ``PYTHONPATH=.`` run (or an install made
before the rename) does not, so this loads ``tui/`` under its installed name instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_minillama_tui() -> None:
    """Import ``minillama_tui``; if it is not installed, from this checkout's ``tui/`` folder."""
    try:
        import minillama_tui  # noqa: F401
        return
    except ImportError:
        pass
    folder = os.path.join(ROOT, "tui")
    spec = importlib.util.spec_from_file_location("minillama_tui", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["minillama_tui"] = module
    spec.loader.exec_module(module)
