"""Scale-safe row L2 normalisation, shared by the references and the ops' host code.

``F.normalize`` squares the entries in the input dtype: in float32 a row whose
entries reach ~1.8e19 has an infinite sum of squares and normalises to zeros,
and a row of norm ~2e38 or more has no finite norm at all. ``normalize_rows``
first scales each row by a power of two that brings its max-abs entry into
[0.5, 1) (exact: only the exponent changes), so the norm of every finite row is
computed without over- or underflow. The result is ``x / max(|x|, eps)``, the
same function as ``F.normalize(x, dim=1, eps=eps)`` evaluated exactly.
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12  # F.normalize's default eps: a zero row stays zero
_MAX_EXP = 126  # scale factors 2^-126 .. 2^126: normal float32 numbers


def pow2_row_scale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1) powers of two p with ``max_i |x[r, i]| * p[r]`` in [0.5, 1).

    Zero and non-finite rows get p = 1; the exponent is clamped to [-126, 126] (a row
    of denormals is then scaled up only to ~2^-23, which is all the precision it has).
    Same dtype as ``x`` (float32, or float64).
    """
    a = x.abs().amax(dim=1, keepdim=True)
    _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1); frexp(0) = (0, 0)
    e = torch.where(torch.isfinite(a), e, torch.zeros_like(e))
    return torch.exp2((-e).clamp(-_MAX_EXP, _MAX_EXP).to(x.dtype))


def normalize_rows(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Rows of ``x`` (N, D) divided by ``max(|row|, eps)``, without overflow.

    Args:
        x: (N, D) float32 or float64 (other dtypes: cast first).
        eps: lower bound of the divisor (a row of norm below it is divided by eps;
            a zero row stays zero).

    Returns:
        (N, D), ``x``'s dtype. NaN/Inf rows give NaN/zero entries, as F.normalize.
    """
    p = pow2_row_scale(x)
    y = x * p  # exact: max-abs entry in [0.5, 1)
    n = torch.linalg.vector_norm(y, dim=1, keepdim=True)  # in [0.5, sqrt(D)) for a nonzero row
    # |x| = n / p, so x / max(|x|, eps) = y / max(n, eps * p).
    return y / torch.maximum(n, eps * p)


def unit_big_rows(x: torch.Tensor, limit: float = 2.0**31) -> torch.Tensor:
    """float32 copy of ``x`` (N, D) whose rows of norm >= ``limit`` are unit vectors.

    For kernels that multiply raw rows and normalise afterwards: feeding them this
    instead of ``x`` changes nothing in their result (a row of norm >= limit >= eps
    normalises to the same unit vector again; the other rows are untouched, so a row
    below eps keeps its ``x / eps``), but no row's sums can overflow float32 any more.
    NaN/Inf rows are left as they are.
    """
    out = x.float().clone()
    big = (torch.linalg.vector_norm(out, dim=1) >= limit) & torch.isfinite(out).all(dim=1)
    if bool(big.any()):
        out[big] = normalize_rows(out[big])
    return out


__all__ = ["NORM_EPS", "normalize_rows", "pow2_row_scale", "unit_big_rows"]
