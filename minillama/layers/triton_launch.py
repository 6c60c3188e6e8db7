"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

``JITFunction.run`` works out every argument's specialization and looks the compiled kernel up on
each call: about 30 us of Python, more than the work of a small kernel, and the debugger launches
one at each of a prefill step's ~200 sites. ``FastLaunch`` keeps the compiled kernel of each
specialization and calls it directly. Its key follows Triton's default rule (triton/runtime/jit.py,
``specialize_impl``): a tensor by dtype and 16-byte alignment; an integer by being 1, divisible by
16, and fitting in 32 bits. A kernel declaring ``do_not_specialize`` would make that rule wrong; the
kernels launched here declare none. Should the compiled kernel's call convention differ (another
Triton version), it falls back to the ordinary launch for good.
"""

from __future__ import annotations

from typing import Any

import torch

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_Tensor = torch.Tensor


def _key(args: tuple) -> list:
    """Triton's specialization classes of ``args`` (the rule above), flat, and the device of the first
    tensor (a compiled kernel belongs to one GPU); called at every launch."""
    key: list = []
    device = None
    for a in args:
        if type(a) is int:  # noqa: E721  (bools are not specialized)
            key.append((a == 1) | (a % 16 == 0) << 1 | (_I32_MIN <= a <= _I32_MAX) << 2)
        elif isinstance(a, _Tensor):
            if device is None:
                device = a.get_device()
                key.append(device)
            key.append(a.dtype)
            key.append(a.data_ptr() % 16 == 0)
        else:
            key.append(type(a))
    return key


class FastLaunch:
    """``FastLaunch(kernel)(grid, args, consts, num_warps)`` runs ``kernel[grid](*args, *consts,
    num_warps=num_warps)``: ``args`` are the leading runtime parameters, ``consts`` the trailing
    ``tl.constexpr`` ones, both in the kernel's order."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, Any] = {}
        self._direct = True

    def __call__(self, grid: tuple[int, ...], args: tuple, consts: tuple = (), num_warps: int = 4) -> None:
        if not self._direct:
            self.kernel[grid](*args, *consts, num_warps=num_warps)
            return
        key = (consts, num_warps, *_key(args))
        compiled = self._compiled.get(key)
        if compiled is None:  # the first call of this specialization compiles (or finds) it the usual way
            compiled = self.kernel[grid](*args, *consts, num_warps=num_warps)
            if not callable(getattr(compiled, "__getitem__", None)):
                self._direct = False
                return
            self._compiled[key] = compiled
            return
        try:
            compiled[grid + (1,) * (3 - len(grid))](*args, *consts)  # the compiled form takes all three sizes
        except (TypeError, IndexError):  # another call convention: refused before launching
            self._direct = False
            self.kernel[grid](*args, *consts, num_warps=num_warps)
