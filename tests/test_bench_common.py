"""benchmarks/_common.py's timing: torch.utils.benchmark.Timer on the CPU, after warm-up,
on the process's thread count (the Timer's own default is one thread)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as common  # noqa: E402


def test_time_call_excludes_warmup_and_keeps_the_thread_count():
    seen: list[int] = []

    def fn():
        if not seen:
            time.sleep(0.3)  # lazy initialisation: must not be timed
        seen.append(torch.get_num_threads())

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = common.time_call(fn, "cpu", repeat=3, warmup=1)
    finally:
        torch.set_num_threads(threads)
    assert t.calls >= 3 and len(t.samples) >= 1
    assert 0 < t.min <= t.median < 0.05  # the slow first call is warm-up
    assert set(seen) == {2}  # every call ran on the process's threads
    assert len(seen) >= t.calls + 1
    assert common.median_time(fn, "cpu", 2) < 0.05
