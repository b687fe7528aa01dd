"""Benchmark ops.pseudo_label: every available backend vs torch references, same inputs.

Candidates:
  reference       the torch backend: normalize -> matmul -> softmax/logsumexp -> topk,
                  materialising the (N, C) logits
  chunked_torch   the same, 8192 rows at a time (what a careful user writes)
  matmul@<rows>   a bare x @ wn.T of the same shapes (against the normalised class matrix,
                  results discarded), <rows> rows at a time, written with out= into one
                  reused buffer; "full" is one call over all N rows (only where the N x C
                  result fits in a quarter of the RAM)
  matmul          the fastest matmul@<rows> of this run (the strongest bare-GEMM
                  baseline: the speed of light for the fused kernels)
  <backend>       nolabels.ops.pseudo_label(backend=...) for cpu / triton / cuda

Every candidate runs in one process on the same inputs with the same thread count;
repeats are interleaved (one call of each candidate per round, the order rotated each
round) so that load from other processes hits all of them alike. Reported: the minimum
(ratios use it) and the median of the repeats. The references run only where
N x C <= 2^30 (--all runs them anyway).

Usage:
  python benchmarks/bench_pseudo_label.py --n 200000 --c 100 1000 21841   # CPU table
  python benchmarks/bench_pseudo_label.py --device cuda --dtype bfloat16 --n 1000000
  python benchmarks/bench_pseudo_label.py --n 20000 --repeat 2            # smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import nolabels  # noqa: E402
from nolabels.ops.pseudo_label import BACKEND_IMPLS  # noqa: E402
from nolabels.reference.pseudo_label import pseudo_label_reference  # noqa: E402

CPU_CHUNKS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
REFERENCE_MAX_NC = 2**30


def make_inputs(n, c, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(c, d, generator=g).to(dtype)
    return x.to(device), w.to(device)


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def matmul_chunks(n: int, c: int, device: str, tried=None) -> list[int | str]:
    """Row chunkings tried for the bare matmul (``"full"``: one call over all rows)."""
    tried = CPU_CHUNKS if tried is None else tried
    chunks: list[int | str] = [k for k in tried if k < n] if device == "cpu" else []
    itemsize = 4
    if device == "cpu":
        fits = n * c * itemsize <= _ram_bytes() // 4
    else:
        fits = n * c * itemsize <= torch.cuda.mem_get_info()[0] // 4
    if fits or not chunks:
        chunks.append("full")
    return chunks


def bare_matmul(x, wn, rows):
    """x @ wn.T, ``rows`` rows at a time into one reused buffer (results discarded)."""
    n = x.shape[0]
    step = n if rows == "full" else rows
    buf = torch.empty(min(step, n), wn.shape[0], dtype=x.dtype, device=x.device)
    parts = x.split(step)
    wt = wn.T

    def run():
        for xc in parts:
            torch.mm(xc, wt, out=buf[: xc.shape[0]])
        return buf

    return run


def candidates(x, w, topk, device, refs=True, chunks=None):
    """name -> zero-argument callable, for every candidate that can run here."""
    out = {}
    if refs:
        out["reference"] = lambda: pseudo_label_reference(x, w, 100.0, topk, True)
        out["chunked_torch"] = lambda: [
            pseudo_label_reference(xc, w, 100.0, topk, True) for xc in x.split(8192)
        ]
    wn = F.normalize(w.float(), dim=1).to(w.dtype)
    for rows in matmul_chunks(x.shape[0], w.shape[0], device, chunks):
        out[f"matmul@{rows}"] = bare_matmul(x, wn, rows)
    call = {"device": x.device, "dtype": x.dtype, "topk": topk}
    for impl in BACKEND_IMPLS:
        if impl.name == "torch":
            continue  # that is "reference"
        if not impl.not_supported_reasons(call):
            name = impl.name
            out[name] = lambda name=name: nolabels.ops.pseudo_label(x, w, topk=topk, backend=name)
    return out


def _cpu_setup(name, n, c, d, dtype, k, threads):
    torch.set_num_threads(threads)
    xs, ws = make_inputs(n, c, d, dtype, "cpu")
    refs = name in ("reference", "chunked_torch")
    chunks = [int(name.split("@")[1])] if name.startswith("matmul@") and name != "matmul@full" else []
    return candidates(xs, ws, k, "cpu", refs=refs, chunks=chunks)[name]


def time_interleaved(cands: dict, device: str, repeat: int) -> dict[str, list[float]]:
    """Seconds per call of every candidate.

    CPU: ``repeat`` wall-clock calls of each, one call of each per round in rotated order,
    so that load from other processes on a shared machine hits every candidate alike (a
    per-candidate ``Timer.blocked_autorange`` would time each in a different load window).
    CUDA (a device of our own): ``triton.testing.do_bench`` per candidate
    (``common.time_call``: warm-up, L2 flush before every call, CUDA events)."""
    if device.startswith("cuda"):
        return {name: common.time_call(fn, device, repeat=repeat).samples
                for name, fn in cands.items()}
    for fn in cands.values():  # warm-up: thread pools, packing buffers, page faults
        fn()
    common.sync(device)
    names = list(cands)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            cands[name]()
            common.sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def bench_shape(args, n, c, d, k, dtype, repeat) -> list[dict]:
    """Rows of the result table for one (N, C, D)."""
    refs = args.all or n * c <= REFERENCE_MAX_NC
    x, w = make_inputs(n, c, d, dtype, args.device)
    cands = candidates(x, w, k, args.device, refs=refs, chunks=args.chunks)
    if args.only:
        cands = {name: f for name, f in cands.items()
                 if name in args.only or name.startswith("matmul@")}
    times = time_interleaved(cands, args.device, repeat)
    flops = 2.0 * n * c * d
    rows = []
    for name, ts in times.items():
        t = min(ts)
        rows.append({"C": c, "candidate": name, "min_s": t, "median_s": statistics.median(ts),
                     "times_s": ts, "gflops": flops / t / 1e9})
    mm_rows = [r for r in rows if r["candidate"].startswith("matmul@")]
    best = min(mm_rows, key=lambda r: r["min_s"])
    rows.append({**best, "candidate": "matmul", "chunk_rows": best["candidate"].split("@")[1]})
    t_ref = next((r["min_s"] for r in rows if r["candidate"] == "reference"), None)
    for r in rows:
        r["time_vs_matmul"] = r["min_s"] / best["min_s"]
        r["median_vs_matmul_median"] = r["median_s"] / best["median_s"]
        if t_ref:
            r["speedup_vs_reference"] = t_ref / r["min_s"]
    if not args.no_memory:
        del x, w, cands
        logits_bytes = n * c * 4
        outputs_bytes = n * k * (4 + 8) + n * 2 * 4  # probs, classes, entropy, lse
        for r in rows:
            name = r["candidate"]
            if name.startswith("matmul@"):
                continue  # "matmul" (the winner) is measured
            if name == "matmul":
                name = best["candidate"]
            if args.device == "cpu":
                peak = common.cpu_peak_bytes(partial(_cpu_setup, name, n, c, d, dtype, k,
                                                     torch.get_num_threads()))
            else:
                xs, ws = make_inputs(n, c, d, dtype, args.device)
                peak = common.cuda_peak_bytes(candidates(xs, ws, k, args.device, refs)[name])
                del xs, ws
            r["peak_extra_MB"] = peak / 2**20 if isinstance(peak, int) else peak
            if isinstance(peak, int):
                r["peak_vs_NxC_f32"] = peak / logits_bytes
                if not name.startswith("matmul"):
                    # The op's own (N, topk) outputs are part of the RSS growth; at small C
                    # they alone exceed a few per cent of the logits.
                    r["scratch_vs_NxC_f32"] = max(0, peak - outputs_bytes) / logits_bytes
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--c", type=int, nargs="+", default=[1000], help="one or more class counts")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="interleaved timed rounds (default 5 CPU, 20 GPU)")
    ap.add_argument("--chunks", type=int, nargs="+", default=None,
                    help=f"row chunkings tried for the CPU bare matmul (default {CPU_CHUNKS}, plus full)")
    ap.add_argument("--all", action="store_true", help="run the torch references at any N x C")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--only", nargs="*", help="run only these candidates (the matmul@ ones always run)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    repeat = args.repeat or (5 if args.device == "cpu" else 20)
    n, d, k = args.n, args.d, args.topk

    load_before = os.getloadavg()
    rows = []
    for c in args.c:
        shape_rows = bench_shape(args, n, c, d, k, dtype, repeat)
        rows += shape_rows
        for r in shape_rows:
            print(f"C={c:<6d} {r['candidate']:14s} min {r['min_s'] * 1e3:10.1f} ms  "
                  f"median {r['median_s'] * 1e3:10.1f} ms  x{r['time_vs_matmul']:.3f}", flush=True)
    payload = {
        "benchmark": "pseudo_label",
        "shape": {"N": n, "C": args.c, "D": d, "topk": k, "dtype": args.dtype, "device": args.device},
        "repeat": repeat,
        "statistic": "min over interleaved repeats (median also given); "
                     "time_vs_matmul = min / min of the fastest matmul chunking",
        "matmul_chunks_tried": {c: [r["candidate"] for r in rows
                                    if r["C"] == c and r["candidate"].startswith("matmul@")]
                                for c in args.c},
        "loadavg_before": load_before,
        "machine": common.machine(),
        "library": nolabels.info_dict()["library"] if hasattr(nolabels, "info_dict") else None,
        "results": rows,
    }
    path = common.write_json("pseudo_label", args.device, payload, args.out)
    cols = ["C", "candidate", "chunk_rows", "min_s", "median_s", "gflops", "time_vs_matmul",
            "speedup_vs_reference", "peak_extra_MB", "peak_vs_NxC_f32", "scratch_vs_NxC_f32"]
    print(common.markdown_table(rows, cols))
    print(f"threads {torch.get_num_threads()}, load average before {load_before}, "
          f"after {os.getloadavg()}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
