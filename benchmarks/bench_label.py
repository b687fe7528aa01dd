"""Benchmark ``nolabels label`` end to end against the bare op, and its peak memory.

For each store size N (synthetic stores: D = 512, float16 rows, 4,096 rows per shard as
``embed`` writes them; C = 1,000 class names; ``--select-per-class 16``):

  label_s        ``nolabels.pipeline.label.label`` into a fresh output directory: read
                 shards, ``ops.pseudo_label``, the bounded selection, write Parquet parts
  label_40_s     the same on a 40-row store (fixed costs: text tower, class matrix, startup)
  bare_s         ``ops.pseudo_label`` over the same N rows already in memory (float16, cast
                 to float32 per 65,536-row chunk, as the pipeline does), results discarded
  ratio          (label_s - label_40_s) / bare_s           target <= 1.3
  rss_growth     peak RSS of the N-row run minus that of the 40-row run    target <= 0.5 GiB
  rows_per_s     N / label_s, and N / bare_s

Each measurement runs in a fresh spawned process (peak RSS = VmHWM of that process, over
what it held before the call); both sides use the same threads and backend. Each is
repeated ``--repeat`` times, alternating label and bare runs, and the minimum is kept
(shared machines are noisy; the minimum is the least disturbed run). Times are wall
clock (``time.perf_counter``): each measurement is one multi-second job in its own process,
where ``torch.utils.benchmark.Timer``'s repeated blocks would add nothing. Text
embeddings come from a weight-free hash text tower (the text tower is not what is measured).

Usage:
  python benchmarks/bench_label.py                         # N = 1M and 5M (needs ~6.5 GB disk)
  python benchmarks/bench_label.py --rows 20000 --quick    # CI smoke size
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

D, C, K, SHARD = 512, 1000, 16, 4096
MODEL_ID = "bench:hash-text-512"


class HashTextEncoder:
    """Each text -> a fixed random unit vector (no weights; not what is measured)."""

    has_text, logit_scale, not_clip = True, 100.0, None

    def __init__(self, dim: int = D) -> None:
        self.dim, self.model_id, self.spec = dim, MODEL_ID, MODEL_ID

    def to(self, device):
        return self

    def encode_text(self, texts):
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little"))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def class_names() -> list[str]:
    return [f"class {i:04d}" for i in range(C)]


def make_store(root: Path, n: int, seed: int = 0) -> Path:
    """A complete store of ``n`` random unit rows, written with the store's own writer."""
    from nolabels.data.store import EmbeddingStore

    st = EmbeddingStore.create_or_resume(
        root, model={"model_id": MODEL_ID, "spec": MODEL_ID, "dim": D},
        source={"kind": "list", "root": "synthetic", "num_items": n, "fingerprint": f"bench{n}"},
        shard_size=SHARD)
    rng = np.random.default_rng(seed)
    for i in st.pending_shards():
        items = list(st.shard_items(i))
        x = rng.standard_normal((len(items), D), dtype=np.float32)
        st.write_shard(i, x, items, [f"img/{j:09d}.jpg" for j in items], [None] * len(items), [])
    st.refresh_manifest()
    return root


_rss_kb = common._proc_status_kb  # a field of /proc/self/status, in KiB


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _run_label(store: str, out: str, threads: int, backend: str, q) -> None:
    try:
        torch.set_num_threads(threads)
        from nolabels.pipeline.label import label

        enc = HashTextEncoder()
        _reset_hwm()
        before = _rss_kb("VmRSS")
        t0 = time.perf_counter()
        rep = label(store, class_names(), out, select_per_class=K, encoder=enc, device="cpu",
                    backend=backend, quiet=True)
        dt = time.perf_counter() - t0
        q.put({"seconds": dt, "rss_growth": (_rss_kb("VmHWM") - before) * 1024,
               "peak_rss": _rss_kb("VmHWM") * 1024, "rows": rep.rows, "selected": rep.selected})
    except Exception as e:  # noqa: BLE001 - reported to the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def _run_bare(store: str, threads: int, backend: str, q) -> None:
    try:
        torch.set_num_threads(threads)
        from nolabels import ops
        from nolabels.data.store import EmbeddingStore
        from nolabels.methods.zeroshot import class_embeddings
        from nolabels.pipeline.label import CHUNK_ROWS

        st = EmbeddingStore(store)
        emb = np.concatenate([np.load(st.emb_path(i), allow_pickle=False)
                              for i in range(st.num_shards)])
        w = class_embeddings(HashTextEncoder(), class_names())
        x16 = torch.from_numpy(emb)
        ops.pseudo_label(x16[:CHUNK_ROWS].float(), w, logit_scale=100.0, topk=3,
                         backend=backend)  # warm-up
        t0 = time.perf_counter()
        for a in range(0, x16.shape[0], CHUNK_ROWS):
            ops.pseudo_label(x16[a:a + CHUNK_ROWS].float(), w, logit_scale=100.0, topk=3,
                             backend=backend)
        q.put({"seconds": time.perf_counter() - t0})
    except Exception as e:  # noqa: BLE001
        q.put({"error": f"{type(e).__name__}: {e}"})


def _spawn(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def _fresh(out: Path) -> str:
    shutil.rmtree(out, ignore_errors=True)
    return str(out)


def _best(runs: list[dict]) -> dict:
    """The minimum of every numeric field over repeated runs, plus the raw runs."""
    best = {k: min(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    return {**runs[0], **best, "runs": [r["seconds"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (min kept)")
    ap.add_argument("--workdir", help="where the synthetic stores go (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke run: no JSON written")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/label-cpu-DATE.json)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="nolabels-bench-label-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        small = make_store(work / "store-40", 40)
        os.sync()
        base = _best([_spawn(_run_label, str(small), _fresh(work / "out-40"), args.threads,
                             args.backend) for _ in range(args.repeat)])
        for n in args.rows:
            t0 = time.perf_counter()
            store = make_store(work / f"store-{n}", n)
            os.sync()  # the store's write-back does not run during the measurements
            made = time.perf_counter() - t0
            out = work / f"out-{n}"
            labs, bares = [], []
            for _ in range(args.repeat):  # alternate, so a slow spell hits both sides
                labs.append(_spawn(_run_label, str(store), _fresh(out), args.threads,
                                   args.backend))
                bares.append(_spawn(_run_bare, str(store), args.threads, args.backend))
            lab, bare = _best(labs), _best(bares)
            r = {
                "rows": n, "dim": D, "classes": C, "select_per_class": K, "shard_rows": SHARD,
                "store_bytes": sum(p.stat().st_size for p in store.iterdir()),
                "store_make_s": made,
                "label_s": lab["seconds"], "label_40_s": base["seconds"], "bare_s": bare["seconds"],
                "ratio": (lab["seconds"] - base["seconds"]) / bare["seconds"],
                "rss_growth_gib": (lab["peak_rss"] - base["peak_rss"]) / 2**30,
                "peak_rss_gib": lab["peak_rss"] / 2**30,
                "label_rows_per_s": n / lab["seconds"], "bare_rows_per_s": n / bare["seconds"],
                "selected": lab["selected"],
                "repeats": args.repeat, "label_runs_s": lab["runs"], "bare_runs_s": bare["runs"],
            }
            rows.append(r)
            print(common.markdown_table([r], ["rows", "label_s", "label_40_s", "bare_s", "ratio",
                                              "rss_growth_gib", "peak_rss_gib"]), flush=True)
            shutil.rmtree(store)
            shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if not args.quick:
        path = common.write_json("label", "cpu", {
            "machine": common.machine(), "backend": args.backend, "threads": args.threads,
            "results": rows}, args.out)
        print("wrote", path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    main()
