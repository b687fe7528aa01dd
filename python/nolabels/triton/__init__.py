"""Triton kernels, one file per op family; shared jit helpers in ``_common``.

This package file does not import Triton, so ``nolabels.backends`` and
``nolabels info`` can ask :func:`interpret` without it.
"""
from __future__ import annotations

import os


def interpret() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now: Triton kernels then run on the CPU.

    The one place the variable is read. Triton itself reads it when a kernel is
    *defined* (``@triton.jit`` at import of the kernel module); host code asks the
    kernel object instead (``nolabels.triton._common.interpreted``), dispatch asks
    this function per call.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
