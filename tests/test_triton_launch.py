"""``FastLaunch``'s bookkeeping against a stand-in for a Triton kernel (the real launches run in the
GPU tests: every statistic of test_debug_gpu goes through it)."""

from __future__ import annotations

import torch

from minillama.layers.triton_launch import FastLaunch


class FakeCompiled:
    def __init__(self, log: list, refuse: bool = False) -> None:
        self.log, self.refuse = log, refuse

    def __getitem__(self, grid):
        def run(*args):
            if self.refuse:
                raise TypeError("another call convention")
            assert len(grid) == 3, "the compiled form takes all three grid sizes"
            self.log.append(("direct", grid, args))
        return run


class FakeKernel:
    """``kernel[grid](*args, **meta)`` as Triton's JIT: launches and returns the compiled kernel."""

    def __init__(self, refuse: bool = False) -> None:
        self.log: list = []
        self.refuse = refuse

    def __getitem__(self, grid):
        def run(*args, num_warps=4):
            self.log.append(("jit", grid, args, num_warps))
            return FakeCompiled(self.log, self.refuse)
        return run


def test_the_compiled_kernel_is_reused_per_specialization():
    k = FakeKernel()
    launch = FastLaunch(k)
    x = torch.zeros(64)
    launch((5,), (x, 32, 7), (True, 128))
    launch((9, 2), (x, 48, 7), (True, 128))  # same classes: 48 and 32 divisible by 16, 7 neither 1 nor
    assert [e[0] for e in k.log] == ["jit", "direct"]
    assert k.log[1] == ("direct", (9, 2, 1), (x, 48, 7, True, 128))
    launch((5,), (x, 32, 1), (True, 128))  # an integer of 1 is a specialization of its own
    launch((5,), (x[1:], 32, 7), (True, 128))  # so is a pointer off 16-byte alignment
    launch((5,), (x, 32, 7), (False, 128))  # and other constants
    launch((5,), (x, 32, 7), (True, 128), num_warps=8)
    assert [e[0] for e in k.log] == ["jit", "direct", "jit", "jit", "jit", "jit"]
    launch((3,), (x[1:], 64, 9), (True, 128))  # the misaligned class again
    assert k.log[-1][0] == "direct"


def test_a_compiled_kernel_that_refuses_the_call_falls_back_for_good():
    k = FakeKernel(refuse=True)
    launch = FastLaunch(k)
    x = torch.zeros(8)
    for _ in range(3):
        launch((2,), (x, 16), ())
    assert [e[0] for e in k.log] == ["jit", "jit", "jit"], "every call launched once, the usual way"
