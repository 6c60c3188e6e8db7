"""Names the engine accepts for ``backend``, ``device`` and ``dtype``, checked without importing torch.

The command lines call these before any heavy import or model load, so a typo costs a fraction of
a second instead of the ~10 s it takes to import torch and load a model first. ``Config`` calls
them too, for users of the Python API.
"""

from __future__ import annotations

import argparse
import math
import re

#: The attention backends minillama ships (``minillama.attention`` may register more at run time).
BUILTIN_BACKENDS = ("torch", "triton", "flash-attn")
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


# ---- argparse types: a bad value is one line naming the option, before anything heavy is imported ----
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type: a sampling seed, 0 <= seed < 2**63."""
    value = non_negative_int(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def temperature(text: str) -> float:
    """argparse type: a finite number >= 0 (0 = greedy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = off), got {text}")
    return value


def _arg(check):
    def parse(text: str) -> str:
        try:
            return check(text)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1] + f" (got {text!r})") from None
    parse.__name__ = check.__name__.removeprefix("check_")
    return parse


backend_arg, device_arg, dtype_arg = _arg(check_backend), _arg(check_device), _arg(check_dtype)
