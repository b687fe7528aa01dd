"""Log lines and progress bars for long work, below every layer that runs long loops.

Log lines go through the stdlib logger ``nolabels`` (one stderr handler with the elapsed
time, installed on first use unless the application gave that logger handlers of its own;
records also propagate to the root logger, and our handler stays silent when the root
logger already prints to the console); progress bars
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


def _root_prints() -> bool:
    """Whether the application configured console logging on the root logger (then our
    records, which propagate, are printed there and not twice)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (
                sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
            return True
    return False


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (test capture, redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _root_prints():
            return
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _ensure_handler() -> None:
    # Our own stderr handler unless the application configured the "nolabels" logger; INFO
    # unless a level was set for it.
    if not logger.handlers:
        h = _StderrHandler()
        h.setFormatter(_Elapsed())
        logger.addHandler(h)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class Log:
    """A ``print``-like callable that logs at INFO unless ``quiet`` or not the main rank."""

    def __init__(self, quiet: bool = False, main: bool = True) -> None:
        self.enabled = (not quiet) and main
        self.main = main
        if self.enabled:
            _ensure_handler()

    def warn(self, msg: str) -> None:
        """Log ``msg`` at WARNING on the main rank, also when quiet (what may make the
        result worthless, e.g. pseudo-labels that leave classes without an image)."""
        if self.main:
            _ensure_handler()
            logger.warning(msg)

    def __call__(self, msg: str) -> None:
        if self.enabled:
            logger.info(msg)

    def note(self, msg: str) -> None:
        """Log ``note: msg`` once per process (e.g. the surrogate's "not CLIP" caveat)."""
        if self.enabled and msg and msg not in _SAID:
            _SAID.add(msg)
            self(f"note: {msg}")


_SAID: set[str] = set()


def mark_said(msg: str) -> None:
    """Treat ``msg`` as already noted (a caller that prints it itself)."""
    _SAID.add(msg)


def progress(total: int | None, desc: str, *, quiet: bool = False, main: bool = True,
             unit: str = "img", leave: bool = True) -> Any:
    """A tqdm bar on stderr showing items/s; ``disable=`` when quiet or not the main rank.
    ``leave=False`` clears it when done (per-epoch bars). Without tqdm: a silent stand-in."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, smoothing=0.1, leave=leave,
                disable=quiet or not main)


class _Silent:
    """What :func:`progress` returns when tqdm is not installed."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


__all__ = ["Log", "logger", "mark_said", "progress"]
