"""Benchmark ``nolabels embed``: images/s on real CIFAR-10 JPEGs, split into
decode + preprocess time and model time, over batch sizes and DataLoader workers.

For each model (the offline surrogate ``surrogate:effnet-lite0+minilm`` — NOT CLIP —
and a random-init open_clip ViT-B/32, which has CLIP's exact cost) and each
(batch size, workers):

  decode_img_s    DataLoader alone (read + JPEG decode + model preprocessing + collate)
  model_img_s     ``encode_image`` alone on already preprocessed batches
  embed_img_s     the real ``embed()`` loop into a fresh store (overlapped when workers > 0)
  model_share     fraction of the embed loop spent in the model
  wait_share      fraction spent waiting for the DataLoader

``model_img_s`` is timed with ``common.time_call`` (warm-up, ``torch.utils.benchmark.Timer``);
the DataLoader and ``embed()`` rates are wall clock over one pass (``time.perf_counter``):
they are throughputs of a whole loop with worker processes, which a repeat-a-statement
timer cannot express.

Images: the 1,000 CIFAR-10 test images shipped for ``nolabels demo`` (32 px JPEGs,
upsampled by each model's preprocessing), or ``--images DIR``.

Usage:
  python benchmarks/bench_pipeline.py                      # CPU, default grid
  python benchmarks/bench_pipeline.py --n 64 --quick       # smoke run
  python benchmarks/bench_pipeline.py --device cuda --batch-sizes 64 256 --workers 4 8
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

MODELS = {
    "surrogate": "surrogate:effnet-lite0+minilm",
    "vit-b-32-random": "openclip:ViT-B-32/random",
}


def decode_rate(source, transform, batch_size: int, workers: int) -> float:
    """Images/s of the DataLoader alone."""
    from nolabels.data import ImageDataset, collate
    from nolabels.pipeline.embed import ShardBatches

    loader = torch.utils.data.DataLoader(
        ImageDataset(source, transform), batch_sampler=ShardBatches([range(len(source))], batch_size),
        num_workers=workers, collate_fn=collate, prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b.index)
    return n / (time.perf_counter() - t0)


def model_rate(enc, batch: torch.Tensor, repeat: int) -> float:
    """Images/s of ``encode_image`` on one preprocessed batch (median of ``repeat``)."""
    t = common.median_time(lambda: enc.encode_image(batch), enc.device.type, repeat, warmup=1)
    return batch.shape[0] / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--images", help="image folder (default: the shipped CIFAR-10 demo images)")
    ap.add_argument("--n", type=int, default=256, help="images per run")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one batch size, workers 0 and 1")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/pipeline-<device>-<date>.json)")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.workers = args.batch_sizes[-1:], [0, 1]

    from nolabels.commands.demo import unpack
    from nolabels.data import open_source
    from nolabels.data.transforms import decode_image
    from nolabels.models import load_encoder
    from nolabels.pipeline.embed import embed

    tmp = Path(tempfile.mkdtemp(prefix="nolabels-bench-"))
    try:
        images = Path(args.images) if args.images else unpack(tmp / "demo")
        source = open_source(images)
        # An even spread over classes: every k-th image.
        step = max(1, len(source) // args.n)
        keep = list(range(0, len(source), step))[: args.n]
        source.paths = [source.paths[i] for i in keep]
        source.labels = [source.labels[i] for i in keep]
        rows = []
        load_before = os.getloadavg()
        for name in args.models:
            spec = MODELS[name]
            t0 = time.perf_counter()
            enc = load_encoder(spec, device=args.device)
            load_s = time.perf_counter() - t0
            pil = [decode_image(source.read_bytes(i % len(source))) for i in range(max(args.batch_sizes))]
            for bs in args.batch_sizes:
                batch = torch.stack([enc.transform(im) for im in pil[:bs]])
                m_rate = model_rate(enc, batch, args.repeat)
                for w in args.workers:
                    d_rate = decode_rate(source, enc.transform, bs, w)
                    store = tmp / f"store-{name}-{bs}-{w}"
                    rep = embed(source, enc, store, batch_size=bs, workers=w, device=args.device,
                                quiet=True, shard_size=10**6)
                    loop = rep.images_done / rep.images_per_s
                    row = {
                        "model": name, "spec": spec, "batch_size": bs, "workers": w,
                        "images": rep.images_done,
                        "decode_img_s": d_rate, "model_img_s": m_rate,
                        "embed_img_s": rep.images_per_s,
                        "model_share": rep.model_seconds / loop,
                        "wait_share": rep.wait_seconds / loop,
                        "model_load_s": load_s,
                    }
                    rows.append(row)
                    print(f"{name:16s} bs={bs:<4d} workers={w}: embed {rep.images_per_s:6.1f} img/s "
                          f"(decode alone {d_rate:7.1f}, model alone {m_rate:6.1f}; "
                          f"model {100 * row['model_share']:.0f}% / wait "
                          f"{100 * row['wait_share']:.0f}% of the loop)", flush=True)
                    shutil.rmtree(store)
            del enc
        payload = {
            "benchmark": "pipeline",
            "machine": common.machine(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "device": args.device,
            "images": str(images),
            "note": "surrogate:effnet-lite0+minilm is NOT CLIP (ConSE stand-in); "
                    "vit-b-32-random has ViT-B/32's cost but random weights",
            "rows": rows,
        }
        path = common.write_json("pipeline", args.device, payload, args.out)
        print(common.markdown_table(rows, ["model", "batch_size", "workers", "embed_img_s",
                                           "decode_img_s", "model_img_s", "model_share",
                                           "wait_share"]))
        print(f"wrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
