"""Benchmark ops.pseudo_label: every available backend vs torch references, same inputs.

Candidates:
  reference       the torch backend: normalize -> matmul -> softmax/logsumexp -> topk,
                  materialising the (N, C) logits
  chunked_torch   the same, 8192 rows at a time (what a careful user writes)
  matmul          a bare torch.matmul of the same shapes (N x D @ D x C), the speed of light
                  for the GEMM (CPU: chunked 4096 rows, so it is not paging in N x C)
  <backend>       nolabels.ops.pseudo_label(backend=...) for cpu / triton / cuda

Usage:
  python benchmarks/bench_pseudo_label.py                     # CPU target sizes
  python benchmarks/bench_pseudo_label.py --device cuda --dtype bfloat16 --n 1000000
  python benchmarks/bench_pseudo_label.py --n 20000 --quick   # smoke run
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import nolabels  # noqa: E402
from nolabels.ops.pseudo_label import BACKEND_IMPLS  # noqa: E402
from nolabels.reference.pseudo_label import pseudo_label_reference  # noqa: E402


def make_inputs(n, c, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(c, d, generator=g).to(dtype)
    return x.to(device), w.to(device)


def candidates(x, w, topk, device):
    """name -> zero-argument callable, for every candidate that can run here."""
    out = {
        "reference": lambda: pseudo_label_reference(x, w, 100.0, topk, True),
        "chunked_torch": lambda: [
            pseudo_label_reference(xc, w, 100.0, topk, True) for xc in x.split(8192)
        ],
    }
    wn = F.normalize(w.float(), dim=1).to(w.dtype)
    if device == "cpu":
        def chunked_matmul():
            for xc in x.split(4096):
                out = xc @ wn.T  # each tile is dropped: like the fused kernel, O(tile) memory
            return out

        out["matmul"] = chunked_matmul
    else:
        out["matmul"] = lambda: x @ wn.T
    call = {"device": x.device, "dtype": x.dtype, "topk": topk}
    for impl in BACKEND_IMPLS:
        if impl.name == "torch":
            continue  # that is "reference"
        if not impl.not_supported_reasons(call):
            name = impl.name
            out[name] = lambda name=name: nolabels.ops.pseudo_label(x, w, topk=topk, backend=name)
    return out


def _cpu_setup(name, n, c, d, dtype, k):
    xs, ws = make_inputs(n, c, d, dtype, "cpu")
    return candidates(xs, ws, k, "cpu")[name]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (median); default 5 CPU, 20 GPU")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--only", nargs="*", help="run only these candidates")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    repeat = args.repeat or (5 if args.device == "cpu" else 20)
    n, c, d, k = args.n, args.c, args.d, args.topk

    x, w = make_inputs(n, c, d, dtype, args.device)
    cands = candidates(x, w, k, args.device)
    if args.only:
        cands = {name: f for name, f in cands.items() if name in args.only}
    flops = 2.0 * n * c * d
    logits_bytes = n * c * 4
    rows = []
    for name, fn in cands.items():
        t = common.median_time(fn, args.device, repeat)
        rows.append({"candidate": name, "median_s": t, "gflops": flops / t / 1e9})
        print(f"{name:14s} {t * 1e3:10.2f} ms", flush=True)
    t_ref = next(r["median_s"] for r in rows if r["candidate"] == "reference") if "reference" in cands else None
    t_mm = next(r["median_s"] for r in rows if r["candidate"] == "matmul") if "matmul" in cands else None
    for r in rows:
        if t_ref:
            r["speedup_vs_reference"] = t_ref / r["median_s"]
        if t_mm:
            r["time_vs_matmul"] = r["median_s"] / t_mm
    if not args.no_memory:
        del x, w
        for r in rows:
            name = r["candidate"]
            if args.device == "cpu":
                peak = common.cpu_peak_bytes(partial(_cpu_setup, name, n, c, d, dtype, k))
            else:
                xs, ws = make_inputs(n, c, d, dtype, args.device)
                peak = common.cuda_peak_bytes(candidates(xs, ws, k, args.device)[name])
                del xs, ws
            r["peak_extra_MB"] = peak / 2**20 if isinstance(peak, int) else peak
            if isinstance(peak, int):
                r["peak_vs_NxC_f32"] = peak / logits_bytes
    payload = {
        "benchmark": "pseudo_label",
        "shape": {"N": n, "C": c, "D": d, "topk": k, "dtype": args.dtype, "device": args.device},
        "repeat": repeat,
        "machine": common.machine(),
        "library": nolabels.info_dict()["library"] if hasattr(nolabels, "info_dict") else None,
        "results": rows,
    }
    path = common.write_json("pseudo_label", args.device, payload, args.out)
    cols = ["candidate", "median_s", "gflops", "speedup_vs_reference", "time_vs_matmul",
            "peak_extra_MB", "peak_vs_NxC_f32"]
    print(common.markdown_table(rows, cols))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
