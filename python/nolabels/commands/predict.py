"""``nolabels predict RUN IMAGES --out preds.parquet``: classify images with a tuned run.

The work is :func:`nolabels.pipeline.predict.predict`; this module is its command line.
"""
from __future__ import annotations

import argparse

from nolabels.commands._common import (
    BACKENDS,
    add_common,
    device_arg,
    positive_int,
    workers_arg,
)
from nolabels.pipeline.predict import DEFAULT_TOPK, Predictor, load_predictor, predict

__all__ = ["Predictor", "load_predictor", "predict", "register"]


# --------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    rep = predict(args.run, args.images, args.out, topk=args.topk,
                  batch_size=args.batch_size, workers=args.workers, device=args.device,
                  checkpoint=args.checkpoint, backend=args.backend, quiet=args.quiet)
    print(f"predictions: {rep['out']}  rows: {rep['rows']}  failed: {rep['failed']}  "
          f"method: {rep['method']}")
    return 0


def register(subparsers) -> None:
    """Add ``predict`` to the ``nolabels`` CLI."""
    p = subparsers.add_parser(
        "predict", help="classify images with a tuned run (output readable by nolabels eval)",
        description="Classify IMAGES (folder, list file, tar shards, or an embedding store) with "
                    "the model tuned in RUN; writes label's Parquet schema.")
    p.add_argument("run", help="run directory from nolabels tune")
    p.add_argument("images", help="images or an embedding store")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--topk", type=positive_int, metavar="K",
                   help=f"classes kept per image, 1 to C (default {DEFAULT_TOPK}, or C if "
                        "there are fewer classes)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward pass (default 64)")
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="DataLoader workers: auto (default) or N >= 0 (0: decode in the main "
                        "process)")
    p.add_argument("--checkpoint", help="the encoder's local weights file, if not the recorded one")
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="pseudo_label backend: auto | torch | cpu | triton | cuda")
    add_common(p)
    p.set_defaults(func=_run)
