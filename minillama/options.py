"""Names the engine accepts for ``backend``, ``device`` and ``dtype``, checked without importing torch.

The command lines call these before any heavy import or model load, so a typo costs a fraction of
a second instead of the ~10 s it takes to import torch and load a model first. ``Config`` calls
them too, for users of the Python API.
"""

from __future__ import annotations

import re

#: The attention backends minillama ships (``minillama.attention`` may register more at run time).
BUILTIN_BACKENDS = ("torch", "flash-attn")
#: dtype spellings -> the torch dtype's name (``auto`` is decided per device by the engine).
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64"}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class OptionError(ValueError):
    """An engine option names nothing minillama knows; the message lists what it accepts."""


def canonical_backend(name: str) -> str:
    """"flash_attn", "Flash-Attn" and "flash-attn" are the same backend."""
    return name.strip().lower().replace("_", "-")


def check_backend(name: object, builtin_only: bool = True) -> str:
    """``name`` if it is a built-in backend's name (any spelling), else ``OptionError``."""
    if not isinstance(name, str):
        raise OptionError(f"backend must be a name such as 'torch', got {name!r}")
    if builtin_only and canonical_backend(name) not in BUILTIN_BACKENDS:
        raise OptionError(f"unknown attention backend {name!r}: choose one of {', '.join(BUILTIN_BACKENDS)}")
    return name


def check_device(name: object) -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else ``OptionError``."""
    if not isinstance(name, str) or not _DEVICE.match(name.strip()):
        raise OptionError(f"unknown device {name!r}: choose auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    return name.strip()


def check_dtype(name: object) -> str:
    """``name`` if it is ``auto`` or a dtype minillama runs in, else ``OptionError``."""
    if not isinstance(name, str) or (name != "auto" and name not in DTYPES):
        raise OptionError(f"unknown dtype {name!r}: choose one of auto, float32, bfloat16, float16")
    return name
