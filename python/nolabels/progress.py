"""Log lines and progress bars for long work, below every layer that runs long loops.

Log lines go through the stdlib logger ``nolabels`` (one stderr handler with the elapsed
time, installed on first use unless the application configured its own); progress bars
are tqdm bars on stderr, disabled (``disable=True``) when quiet or not the main rank.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

_T0 = time.perf_counter()
logger = logging.getLogger("nolabels")


class _Elapsed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"[nolabels {record.created - _WALL0:6.1f}s] {record.getMessage()}"


_WALL0 = time.time() - (time.perf_counter() - _T0)


def _ensure_handler() -> None:
    if not logger.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(_Elapsed())
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class Log:
    """A ``print``-like callable that logs at INFO unless ``quiet`` or not the main rank."""

    def __init__(self, quiet: bool = False, main: bool = True) -> None:
        self.enabled = (not quiet) and main
        if self.enabled:
            _ensure_handler()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            logger.info(msg)
            for h in logger.handlers:
                h.flush()


def progress(total: int | None, desc: str, *, quiet: bool = False, main: bool = True,
             unit: str = "img", leave: bool = True) -> Any:
    """A tqdm bar on stderr showing items/s; ``disable=`` when quiet or not the main rank.
    ``leave=False`` clears it when done (per-epoch bars)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, smoothing=0.1, leave=leave,
                disable=quiet or not main)


__all__ = ["Log", "logger", "progress"]
