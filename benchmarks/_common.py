"""Shared benchmark plumbing: timing, peak memory, machine facts, JSON output.

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
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], device: str, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA: synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
