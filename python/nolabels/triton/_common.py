"""Helpers shared by the Triton kernel files: jit functions and host utilities.

* :func:`dot` — the one ``tl.dot`` wrapper: float32 tiles as exact "ieee" products
  (no TF32: these kernels make exact selections), float16/bfloat16 tiles natively
  into a float32 accumulator, and ``UPCAST`` for bfloat16 under the interpreter,
  whose bfloat16 ``tl.dot`` is wrong in triton 3.8 (the operands are stored as
  uint16 and multiplied as integers): both tiles are upcast to float32 there.
* :func:`cast_rne` — float32 -> low precision with round-to-nearest-even by hand
  under the interpreter (whose own bfloat16 conversion truncates).
* :func:`interpreted` — whether a kernel runs in the interpreter, asked of the kernel.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Same eps as torch.nn.functional.normalize and the references: x / max(|x|, eps).
NORM_EPS: tl.constexpr = tl.constexpr(1e-12)


@triton.jit
def dot(a, b, acc, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in float32 (``acc`` may be None: then just ``a @ b``).

    IS_FP32: float32 operands, exact "ieee" products. UPCAST: operands upcast to
    float32 first, then "ieee" (bfloat16 under the interpreter; see module doc).
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IS_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def cast_rne(x, dtype: tl.constexpr, RNE: tl.constexpr):
    """float32 ``x`` -> ``dtype``; RNE: round to bfloat16 to nearest even by hand first
    (the interpreter's conversion truncates, the GPU's rounds to nearest even)."""
    if RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs in Triton's interpreter.

    Triton decides this once, when the kernel is defined (``TRITON_INTERPRET`` at
    import of its module), so host code asks the kernel, never the environment:
    its launch choices (block sizes, UPCAST, RNE) then always match the kernel.
    """
    return not isinstance(kernel, JITFunction)


def upcast_bf16(kernel, dtype: torch.dtype) -> bool:
    """The UPCAST flag of :func:`dot` for ``kernel`` on ``dtype`` tiles."""
    return dtype == torch.bfloat16 and interpreted(kernel)


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device for a launch (nothing for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
