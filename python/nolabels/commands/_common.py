"""Shared CLI plumbing: logging to stderr, progress bars, errors as exit codes."""
from __future__ import annotations

import sys
import time
from typing import Any

_T0 = time.perf_counter()


class Log:
    """Prints to stderr unless ``quiet`` (or not the main rank)."""

    def __init__(self, quiet: bool = False, main: bool = True) -> None:
        self.enabled = (not quiet) and main
        self.t0 = _T0

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[nolabels {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr,
                  flush=True)


def progress(total: int, desc: str, *, quiet: bool, main: bool = True, unit: str = "img",
             leave: bool = True) -> Any:
    """A tqdm bar on stderr showing items/s (a no-op object when quiet, not the main rank,
    or tqdm is missing); ``leave=False`` clears it when done (per-epoch bars)."""
    if quiet or not main:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, smoothing=0.1, leave=leave)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def add_common(p) -> None:
    """--quiet on every subcommand."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or log lines (results and errors still printed)")
