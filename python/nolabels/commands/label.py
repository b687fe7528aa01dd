"""``nolabels label EMBEDDINGS --classes classes.txt --out LABELS``: zero-shot / CDE
pseudo-labels for every embedding, streamed shard by shard through
``nolabels.ops.pseudo_label`` (the work is :func:`nolabels.pipeline.label.label`; this
module is its command line).

EMBEDDINGS is a nolabels store, a clip-retrieval output folder (``img_emb/`` +
``metadata/``), a ``.npy`` (N, D) or a Parquet file with an embedding column; LABELS is a
directory (a Parquet dataset: one part per shard, resumable) or a ``.parquet`` file.
"""
from __future__ import annotations

import argparse
import os

from nolabels.commands._common import (
    BACKENDS,
    add_common,
    device_arg,
    positive_float,
    positive_int,
)
from nolabels.pipeline.label import DEFAULT_TOPK, LabelReport, label

__all__ = ["LabelReport", "label", "register"]


# --------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    rep = label(args.embeddings, args.classes, args.out, model=args.model,
                descriptions=args.descriptions, templates=args.templates,
                select_per_class=args.select_per_class, topk=args.topk,
                logit_scale=args.logit_scale, checkpoint=args.checkpoint, device=args.device,
                backend=args.backend, overwrite=args.overwrite, quiet=args.quiet,
                meta=args.meta, column=args.column)
    from nolabels.dist import env_world_size

    if int(os.environ.get("RANK", "0")) == 0 or env_world_size() == 1:
        sel = "" if rep.selected is None else f"  selected: {rep.selected}"
        print(f"labels: {rep.out}  rows: {rep.rows}  classes: {rep.num_classes}{sel}"
              f"  parts: {rep.parts} ({rep.computed} computed now)")
    return 0


def register(subparsers) -> None:
    """Add ``label`` to the ``nolabels`` CLI."""
    p = subparsers.add_parser(
        "label", help="zero-shot / CDE pseudo-labels for embeddings (streaming, resumable)",
        description="Pseudo-label every embedding with the class names (prompt-template "
                    "ensemble, or CDE with --descriptions) through nolabels.ops.pseudo_label, "
                    "shard by shard in bounded memory; optionally select NoLA's K most "
                    "confident images per class. Re-running resumes.")
    p.add_argument("embeddings", metavar="EMBEDDINGS",
                   help="a nolabels store, a clip-retrieval folder (img_emb/ + metadata/), a "
                        ".npy (N, D), or a Parquet file/folder with an embedding column")
    p.add_argument("--model", help="the model whose text tower labels them (default: the "
                                   "store's; required for embeddings nolabels did not make)")
    p.add_argument("--classes", required=True, help="text file, one class name per line")
    p.add_argument("--descriptions", help="JSON {class: [descriptions]} for CDE class embeddings")
    p.add_argument("--templates", default="simple",
                   help="template set: simple (default), imagenet7, cifar, none, or a file with "
                        "one template per line containing {}")
    p.add_argument("--out", required=True,
                   help="a directory (Parquet dataset: part-NNNNN.parquet per shard, "
                        "_selected.parquet, _nolabels.json) or a .parquet file (small runs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace labels made with other settings in --out (only our files)")
    p.add_argument("--meta", help="for a .npy: a Parquet file of its rows (path, label columns)")
    p.add_argument("--column", help="for Parquet input: the embedding column (default: "
                                    "embedding, emb, img_emb or image_embedding)")
    p.add_argument("--select-per-class", type=positive_int, metavar="K",
                   help="select at most K (>= 1) most confident images per class (NoLA's "
                        "subset): _selected.parquet in a directory, 'selected' in a file")
    p.add_argument("--topk", type=positive_int, metavar="K",
                   help=f"classes kept per image, 1 to C (default {DEFAULT_TOPK}, or C if "
                        "there are fewer classes)")
    p.add_argument("--logit-scale", type=positive_float,
                   help="softmax scale, > 0 (default: the model's, 100 for CLIP)")
    p.add_argument("--checkpoint", help="the model's local weights file, if not the recorded one")
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="pseudo_label backend: auto | torch | cpu | triton | cuda")
    add_common(p)
    p.set_defaults(func=_run)
