"""Shared benchmark plumbing: timing, peak memory, machine facts, JSON output.

Timing (:func:`time_call`): ``torch.utils.benchmark.Timer`` on the CPU and
``triton.testing.do_bench`` on a GPU (L2 cache flushed before each timed call), both
after warm-up.

Timings of all candidates of one benchmark are taken in one process on the
same inputs. CPU peak memory is measured in a fresh child process per
candidate (RSS growth: VmHWM after the call minus VmRSS before it, with the
high-water mark reset through /proc/self/clear_refs); CUDA peak memory is
``max_memory_allocated`` above what was allocated before the call.
"""
from __future__ import annotations

import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds per call of one timed callable.

    Attributes:
        median, min: over ``samples``.
        samples: seconds per call of each measurement (CPU: a block of ``number`` calls of
            ``torch.utils.benchmark.Timer.blocked_autorange``; GPU: one call of
            ``triton.testing.do_bench``).
        calls: timed calls in all (warm-up not included).
    """

    median: float
    min: float
    samples: list[float]
    calls: int


def time_call(fn: Callable[[], Any], device: str, repeat: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()`` with the maintained timers, after warm-up.

    CPU: ``warmup`` untimed calls (lazy initialisation: thread pools, oneDNN kernels,
    Triton compiles), then ``torch.utils.benchmark.Timer.blocked_autorange`` on this
    process's thread count, for at least ``repeat`` times the last warm-up call's
    duration (so about ``repeat`` calls of a slow ``fn``, blocks of many of a fast one).
    CUDA: ``triton.testing.do_bench`` (which warms up itself, flushes the L2 cache before
    every timed call and times with CUDA events) for at least ``repeat`` calls; without
    Triton, the same with torch's CUDA events and a 256 MiB flush buffer.
    """
    warmup = max(1, warmup)
    if device.startswith("cuda"):
        return _time_cuda(fn, repeat, warmup)
    from torch.utils.benchmark import Timer

    for _ in range(warmup - 1):
        fn()
    t0 = time.perf_counter()  # sizes the measurement only; the numbers come from the Timer
    fn()
    est = time.perf_counter() - t0
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=max(1e-3, est * max(1, repeat)))
    samples = [float(t) for t in m.times]
    return Timing(statistics.median(samples), min(samples), samples,
                  m.number_per_run * len(m.raw_times))


def _time_cuda(fn: Callable[[], Any], repeat: int, warmup: int) -> Timing:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end), 1e-3)
    rep_ms = max(100.0, est_ms * max(1, repeat))  # do_bench runs rep_ms / estimate calls
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        ms = do_bench(fn, warmup=max(25.0, est_ms * warmup), rep=rep_ms, return_mode="all")
    else:  # the same protocol by hand
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        for _ in range(warmup):
            fn()
        n = max(1, int(rep_ms / est_ms))
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
        for a, b in ev:
            flush.zero_()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in ev]
    samples = [float(x) / 1e3 for x in ms]
    return Timing(statistics.median(samples), min(samples), samples, len(samples))


def median_time(fn: Callable[[], Any], device: str, repeat: int, warmup: int = 1) -> float:
    """Median seconds per call of ``fn()`` (:func:`time_call`)."""
    return time_call(fn, device, repeat, warmup).median


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """Extra CUDA memory at the peak of ``fn()``, above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(setup: Callable[[], Callable[[], Any]], q) -> None:
    try:
        fn = setup()  # builds inputs; not counted
        del_out = fn()  # warm-up: lazy initialisation (thread pools, kernels) is not counted
        del del_out
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark
        before = _proc_status_kb("VmRSS")
        out = fn()
        q.put((_proc_status_kb("VmHWM") - before) * 1024)
        del out
    except Exception as e:  # noqa: BLE001 - report to the parent
        q.put(f"error: {type(e).__name__}: {e}")


def cpu_peak_bytes(setup: Callable[[], Callable[[], Any]]) -> int | str:
    """RSS growth of one call, measured in a fresh child process.

    ``setup`` (picklable: a module-level function or a functools.partial of
    one) returns the zero-argument callable to measure. The child is spawned,
    not forked: a fork after torch's OpenMP pool has run can deadlock.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(setup, q))
    p.start()
    res = q.get()
    p.join()
    return res


def machine() -> dict:
    """Facts needed to read a result later."""
    d = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "loadavg": os.getloadavg(),
    }
    try:
        import triton

        d["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    return d


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(name: str, device: str, payload: dict, out: str | None = None) -> Path:
    """Write ``payload`` to benchmarks/results/<name>-<device>-<date>.json (or ``out``)."""
    if out:
        path = Path(out)
    else:
        tag = "cpu" if device == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
        path = RESULTS / f"{name}-{tag}-{_dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
