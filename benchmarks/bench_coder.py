"""Benchmark the CODER ops against their dense / outside peers, same process, same inputs.

Three problems (issue 4's sizes; ``--device cuda`` multiplies N by 10):

  topk       N=5,000 queries, M=100,000 keys, D=512, k=10, cosine
             cpu / cpu_exact (NOLABELS_TOPK_FILTER=off) / triton / cuda  vs
             faiss      faiss-cpu IndexFlatIP.search on pre-normalised float32 (index build and
                        normalisation not timed: favourable to faiss)
             chunked    torch: normalise a chunk of 8192 keys, matmul, topk, merge
  scores     N=10,000, C=1,000, 15 kind-0 + 4 kind-1 texts per class (shuffled), D=512
             cpu / triton / cuda  vs  dense: normalise, one (N, M) matmul, index_add (kind 0),
             scatter_reduce amax (kind 1), divide (the reference with no chunking)
  affinity   N=2,000, K=1,600, M=15,000, D=512
             cpu / triton / cuda  vs  dense: normalize(x̂T̂ᵀ) (N, M) and (K, M), then their product

Timing: the candidates of a problem are run round-robin (``--repeat`` rounds, after one
warm-up each) so that load drift on a shared machine hits all of them alike; the median is
reported, with ``speedup`` = peer time / candidate time for each peer. The machine's load
average before and after is recorded. ``--memory`` adds the RSS growth of one call of each
fused candidate (CPU, fresh child process).

Usage:
  python benchmarks/bench_coder.py                         # CPU, issue sizes
  python benchmarks/bench_coder.py --device cuda           # GPU sizes (10x N), for gpu_check.sh
  python benchmarks/bench_coder.py --quick                 # small smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common
import nolabels
from nolabels.ops.coder import AFFINITY_IMPLS, SCORES_IMPLS, TOPK_IMPLS
from nolabels.reference.coder import (
    coder_affinity_reference,
    coder_class_scores_reference,
    topk_similarity_reference,
)

CPU_SIZES = {
    "topk": {"N": 5_000, "M": 100_000, "D": 512, "k": 10},
    "scores": {"N": 10_000, "C": 1_000, "n0": 15, "n1": 4, "D": 512},
    "affinity": {"N": 2_000, "K": 1_600, "M": 15_000, "D": 512},
}
QUICK = {
    "topk": {"N": 500, "M": 20_000, "D": 128, "k": 10},
    "scores": {"N": 1_000, "C": 100, "n0": 15, "n1": 4, "D": 128},
    "affinity": {"N": 300, "K": 200, "M": 2_000, "D": 128},
}


def gpu_sizes() -> dict:
    """The CPU sizes with 10x the N (issue 4: "GPU sizes (10x the N)")."""
    out = {k: dict(v) for k, v in CPU_SIZES.items()}
    for v in out.values():
        v["N"] *= 10
    return out


# --------------------------------------------------------------------------- inputs
def topk_inputs(s, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s["N"], s["D"], generator=g).to(dtype).to(device)
    keys = torch.randn(s["M"], s["D"], generator=g).to(dtype).to(device)
    return q, keys


def scores_inputs(s, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = s["C"]
    cls = torch.cat([torch.arange(c).repeat_interleave(s["n0"]), torch.arange(c).repeat_interleave(s["n1"])])
    kind = torch.cat([torch.zeros(c * s["n0"], dtype=torch.int64), torch.ones(c * s["n1"], dtype=torch.int64)])
    perm = torch.randperm(cls.numel(), generator=g)
    x = torch.randn(s["N"], s["D"], generator=g).to(dtype).to(device)
    t = torch.randn(cls.numel(), s["D"], generator=g).to(dtype).to(device)
    return x, t, cls[perm].to(device), kind[perm].to(device)


def affinity_inputs(s, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, s["D"], generator=g).to(dtype).to(device) for n in (s["N"], s["K"], s["M"]))


def _fused(impls, call):
    return [b.name for b in impls if b.name != "torch" and not b.not_supported_reasons(call)]


# --------------------------------------------------------------------------- candidates
def topk_candidates(s, dtype, device):
    q, keys = topk_inputs(s, dtype, device)
    k = s["k"]
    out = {}
    call = {"device": q.device, "dtype": q.dtype, "k": k}
    for name in _fused(TOPK_IMPLS, call):
        out[name] = partial(nolabels.ops.topk_similarity, q, keys, k, backend=name)
        if name == "cpu":
            def exact(q=q, keys=keys):
                old = os.environ.get("NOLABELS_TOPK_FILTER")
                os.environ["NOLABELS_TOPK_FILTER"] = "off"
                try:
                    return nolabels.ops.topk_similarity(q, keys, k, backend="cpu")
                finally:
                    if old is None:
                        os.environ.pop("NOLABELS_TOPK_FILTER")
                    else:
                        os.environ["NOLABELS_TOPK_FILTER"] = old
            out["cpu_exact"] = exact
    peers = {"chunked": partial(topk_similarity_reference, q, keys, k,
                                max_elems=s["N"] * 8192)}
    if device == "cpu":
        try:
            import faiss

            qn = F.normalize(q.float(), dim=1).numpy()
            index = faiss.IndexFlatIP(s["D"])
            index.add(F.normalize(keys.float(), dim=1).numpy())
            peers["faiss"] = partial(index.search, qn, k)
        except ImportError:
            print("faiss not installed: pip install faiss-cpu (the bench extra)", file=sys.stderr)
    return out, peers, 2.0 * s["N"] * s["M"] * s["D"]


def scores_candidates(s, dtype, device):
    x, t, cls, kind = scores_inputs(s, dtype, device)
    c = s["C"]
    call = {"device": x.device, "dtype": x.dtype}
    out = {name: partial(nolabels.ops.coder_class_scores, x, t, cls, kind, c, backend=name)
           for name in _fused(SCORES_IMPLS, call)}
    peers = {"dense": partial(coder_class_scores_reference, x, t, cls, kind, c, max_elems=1 << 62)}
    return out, peers, 2.0 * s["N"] * t.shape[0] * s["D"]


def affinity_candidates(s, dtype, device):
    x, y, t = affinity_inputs(s, dtype, device)
    call = {"device": x.device, "dtype": x.dtype}
    out = {name: partial(nolabels.ops.coder_affinity, x, y, t, backend=name)
           for name in _fused(AFFINITY_IMPLS, call)}
    peers = {"dense": partial(coder_affinity_reference, x, y, t, max_elems=1 << 62)}
    n, k, m, d = s["N"], s["K"], s["M"], s["D"]
    return out, peers, 2.0 * (n + k) * m * d + 2.0 * n * k * m  # the dense FLOPs


PROBLEMS = {"topk": topk_candidates, "scores": scores_candidates, "affinity": affinity_candidates}


def _mem_setup(problem, name, s, dtype):
    ours, _, _ = PROBLEMS[problem](s, dtype, "cpu")
    return ours[name]


def run_problem(problem, s, dtype, device, repeat, memory):
    ours, peers, flops = PROBLEMS[problem](s, dtype, device)
    cands = {**ours, **peers}
    # warm-up inside (oneDNN kernel JIT, Triton compile, faiss threads); same inputs
    times = {name: common.time_call(fn, device, repeat, warmup=1) for name, fn in cands.items()}
    rows = []
    for name, t in times.items():
        row = {"problem": problem, "candidate": name, "kind": "ours" if name in ours else "peer",
               "median_s": t.median, "min_s": t.min, "timed_calls": t.calls,
               "dense_gflops": flops / t.median / 1e9}
        rows.append(row)
    for row in rows:
        if row["kind"] == "ours":
            for p in peers:
                row[f"speedup_vs_{p}"] = times[p].median / row["median_s"]
    if memory and device == "cpu":
        for row in rows:
            if row["kind"] == "ours":
                peak = common.cpu_peak_bytes(partial(_mem_setup, problem, row["candidate"], s, dtype))
                row["peak_extra_MB"] = peak / 2**20 if isinstance(peak, int) else peak
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds (median); default 5 CPU, 20 GPU")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS growth (CPU)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/coder-<device>-<date>.json)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    sizes = QUICK if args.quick else (gpu_sizes() if args.device == "cuda" else CPU_SIZES)
    repeat = args.repeat or (5 if args.device == "cpu" else 20)
    load_before = os.getloadavg()
    rows = []
    for problem in args.problems:
        print(f"== {problem} {sizes[problem]} {args.dtype} {args.device}", flush=True)
        r = run_problem(problem, sizes[problem], dtype, args.device, repeat, args.memory)
        for row in r:
            print(f"   {row['candidate']:10s} {row['median_s'] * 1e3:10.1f} ms", flush=True)
        rows += r
    payload = {
        "benchmark": "coder",
        "device": args.device,
        "dtype": args.dtype,
        "sizes": {p: sizes[p] for p in args.problems},
        "repeat": repeat,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine": common.machine(),
        "library": nolabels.info_dict()["library"] if hasattr(nolabels, "info_dict") else None,
        "results": rows,
    }
    path = common.write_json("coder", args.device, payload, args.out)
    cols = ["problem", "candidate", "median_s", "dense_gflops", "speedup_vs_faiss", "speedup_vs_chunked",
            "speedup_vs_dense", "peak_extra_MB"]
    print(common.markdown_table(rows, cols))
    print(f"load average before {load_before}, after {payload['loadavg_after']}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
