"""``nolabels embed IMAGES --model MODEL --out STORE``: images -> embedding store.

The work is :func:`nolabels.pipeline.embed.embed`; this module is its command line.
Resumable: re-running the same command after a crash or kill computes only the
shards that were not committed. Under ``torchrun --nproc-per-node N -m nolabels
embed ...`` rank r embeds shards r, r + N, ... of the same store.
"""
from __future__ import annotations

import argparse

from nolabels.commands._common import add_common, device_arg, positive_int, workers_arg
from nolabels.pipeline.embed import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SHARD_SIZE,
    EmbedReport,
    default_workers,
    embed,
)

__all__ = ["EmbedReport", "default_workers", "embed", "register"]


# --------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    rep = embed(args.images, args.model, args.out, checkpoint=args.checkpoint,
                batch_size=args.batch_size, workers=args.workers, device=args.device,
                shard_size=args.shard_size, overwrite=args.overwrite, quiet=args.quiet,
                limit=args.limit, fingerprint=args.fingerprint, amp=args.amp)
    if rep.rank == 0:
        print(f"store: {rep.store}  rows: {rep.rows}  failed: {len(rep.failed)}  "
              f"model: {rep.model_id}  complete: {rep.complete}")
    return 0


def register(subparsers) -> None:
    """Add ``embed`` to the ``nolabels`` CLI."""
    p = subparsers.add_parser(
        "embed", help="embed images into a resumable embedding store",
        description="Embed a folder (class/*.jpg labels kept for evaluation only), a .txt list "
                    "of paths, or webdataset .tar shards into STORE (float16 L2-normalised "
                    "emb_*.npy + meta_*.parquet + manifest.json). Re-running resumes. Scale out "
                    "with: torchrun --nproc-per-node N -m nolabels embed ...")
    p.add_argument("images", help="image folder, .txt/.lst list of paths, or .tar shard(s) "
                                  "(brace pattern shards-{000..009}.tar)")
    p.add_argument("--model", required=True,
                   help="openclip:ARCH/TAG (e.g. openclip:ViT-B-32/laion2b_s34b_b79k), "
                        "openclip:ARCH with --checkpoint, timm:NAME (e.g. "
                        "timm:vit_base_patch16_224.dino), or surrogate:effnet-lite0+minilm "
                        "(offline ConSE stand-in, NOT CLIP)")
    p.add_argument("--checkpoint", help="local weights file (when the weights cannot be downloaded)")
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="DataLoader worker processes (default auto: cores/2 clamped to 1..4 "
                        "on CPU, up to 8 with a GPU; 0 decodes in the main process)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                   help="images per store shard, the unit of resumption "
                        f"(default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="embed only the first N images (N >= 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing store at --out (only the files its manifest "
                        "lists; a folder that is not a store is refused)")
    p.add_argument("--fingerprint", choices=("stat", "paths"), default="stat",
                   help="how a resume notices changed images: stat (default) records each "
                        "file's size and mtime and re-embeds the shards whose files changed; "
                        "paths notices only added, removed or renamed files")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast for the image tower: auto (bf16, or fp16 without bf16 "
                        "support, on CUDA; off on the CPU), bf16, fp16 or off")
    add_common(p)
    p.set_defaults(func=_run)
