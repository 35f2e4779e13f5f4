"""Errors raised by the KV block kernels.

    KernelError            base (never raised itself)
    └── KernelInputError   (also a ValueError) a tensor of the wrong shape, dtype, stride,
                            device, or an index out of range: the caller's bug, nothing changed

Inputs are checked before any byte moves, so an error leaves every tensor as it was.
"""

from __future__ import annotations


class KernelError(Exception):
    """Base of every error raised by ``kvrelay.kernels``."""


class KernelInputError(KernelError, ValueError):
    """A kernel was called with a bad tensor; the message says which argument and why."""

    def __init__(self, arg: str, problem: str) -> None:
        super().__init__(f"{arg}: {problem}")
        self.arg = arg
        self.problem = problem
