"""Shared CLI plumbing: the argparse types that check every numeric option before any work
is done, and ``--quiet``."""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

# Log lines and progress bars live below the methods (nolabels.progress); re-exported here
# for the commands.
from nolabels.progress import Log, mark_said, progress  # noqa: E402,F401


def add_common(p) -> None:
    """--quiet on every subcommand."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or log lines (results and errors still printed)")


# --------------------------------------------------------------------------- argparse types
# Each takes the option's text and returns the parsed value, or raises
# argparse.ArgumentTypeError: argparse then prints the usage and
# "argument --OPT: must be ..., got 'TEXT'" and exits with status 2, before a
# subcommand has loaded a model or read a file.

def _number(text: str, kind: type, what: str) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, K, top-k, epochs)."""
    v = _number(text, int, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    """An integer >= 0 (where 0 means something: no workers, no warm-up, a seed)."""
    v = _number(text, int, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, softmax scales)."""
    v = _number(text, float, "a number > 0")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (thresholds where 0 turns something off)."""
    v = _number(text, float, "a number >= 0")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A share in [0, 1): 0 means none, 1 (everything) is never meaningful."""
    v = _number(text, float, "a fraction in [0, 1)")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
    return v


def int_between(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type for an integer in ``[lo, hi]``."""
    def parse(text: str) -> int:
        v = _number(text, int, f"an integer in [{lo}, {hi}]")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}")
        return v

    parse.__name__ = f"int_between_{lo}_{hi}"
    return parse


def workers_arg(text: str) -> int | str:
    """DataLoader workers: ``auto`` or an integer >= 0 (0: decode in the main process)."""
    if text == "auto":
        return text
    try:
        return nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 0, got {text!r}") from None


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_arg(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


#: ``--backend`` choices of the ops (see ``nolabels info``).
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
