"""``nolabels tune --method M IMAGES_OR_STORE --classes classes.txt --model MODEL --out RUN``.

The work is :func:`nolabels.pipeline.tune.tune` (methods, stages, resume); this module is
its command line.
"""
from __future__ import annotations

import argparse
import os

from nolabels.commands._common import (
    add_common,
    device_arg,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
    workers_arg,
)
from nolabels.pipeline.tune import METHODS, tune

__all__ = ["METHODS", "register", "tune"]


# --------------------------------------------------------------------------- CLI
HYPER_ARGS = {
    "epochs": int, "batch_size": int, "lr": float, "seed": int, "num_prompts": int,
    "text_steps": int, "grad_accum": int, "workers": int, "checkpoint_every": int,
    "heldout_fraction": float, "warmup_steps": int, "k_max": int,
}


def _run(args: argparse.Namespace) -> int:
    hyper = {k: getattr(args, k) for k in HYPER_ARGS if getattr(args, k, None) is not None}
    for k in ("amp", "select", "surrogate_norms"):
        if getattr(args, k, None) is not None:
            hyper[k] = getattr(args, k)
    if args.reproduce_wcls_bug:
        hyper["reproduce_wcls_bug"] = True
    if getattr(args, "reproduce_wcls_broadcast", False):
        hyper["reproduce_wcls_broadcast"] = True
    if getattr(args, "nola_subset", None) is not None:
        hyper["subset_from"] = args.nola_subset
    if args.method in ("zeroshot", "cde"):
        hyper = {k: v for k, v in hyper.items() if k in ("seed", "heldout_fraction")}
    if args.cache_views and "surrogate_norms" not in hyper:
        hyper["surrogate_norms"] = "block"
    s = tune(args.method, args.images, args.classes, args.out, model=args.model,
             checkpoint=args.checkpoint, dino_model=args.dino_model,
             dino_checkpoint=args.dino_checkpoint, descriptions=args.descriptions,
             templates=args.templates, captions=args.captions or (),
             caption_endpoint=args.caption_endpoint, caption_model=args.caption_model,
             caption_noun=args.caption_noun, hyper=hyper, cache_views=args.cache_views,
             device=args.device,
             embed_workers=args.embed_workers, dataset=args.dataset, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        sel = s.get("selected_epoch")
        crit = s.get("criterion_value")
        extra = "" if sel is None else f"  selected epoch: {sel} ({s['selection'].split(':')[0]}"
        extra += "" if crit is None else f" {crit:.4f})"
        extra += ")" if sel is not None and crit is None else ""
        print(f"run: {args.out}  method: {args.method}{extra}  seconds: {s['total_seconds']:.1f}")
    return 0


def register(subparsers) -> None:
    """Add ``tune`` to the ``nolabels`` CLI."""
    p = subparsers.add_parser(
        "tune", help="label-free tuning: zeroshot | cde | lafter | nola | latteclip",
        description="Tune a label-free classifier on unlabeled images (labels in class folders "
                    "are read only to report accuracy; epochs are selected by an unlabeled "
                    "criterion). Re-running resumes. Scale out with torchrun.")
    p.add_argument("images", help="embedding store (from nolabels embed) or images (folder, "
                                  "list file, tar shards; embedded into RUN/store)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--classes", required=True, help="text file, one class name per line")
    p.add_argument("--model", help="encoder spec (default: the store's model)")
    p.add_argument("--checkpoint", help="the encoder's local weights file")
    p.add_argument("--dino-model", help="NoLA's DINO model, e.g. timm:vit_base_patch16_224.dino "
                                        "(surrogate default: surrogate:effnet-lite0, NOT DINO)")
    p.add_argument("--dino-checkpoint", help="the DINO model's local weights file")
    p.add_argument("--descriptions", help="JSON {class: [sentences]} or a built-in set (cifar10)")
    p.add_argument("--dataset", help="apply the authors' settings for this data set "
                                     "(imagenet, caltech101, dtd, eurosat, fgvc_aircraft, "
                                     "food101, flowers102, oxford_pets, stanford_cars, sun397, "
                                     "ucf101, cifar10, cifar100, ...; nolabels.methods.presets): "
                                     "templates, LaFTer text steps, LatteCLIP epochs/warm-up, "
                                     "fp32 for lafter/nola; flags given explicitly win. "
                                     "Default: generic settings")
    p.add_argument("--templates", help="template set (simple, imagenet7, cifar, none) or file; "
                                       "latteclip: the single template, e.g. 'a photo of a {}.'")
    p.add_argument("--captions", nargs="+", help="latteclip caption JSONL file(s)")
    p.add_argument("--caption-endpoint", help="latteclip: OpenAI-compatible base URL "
                                              "(e.g. http://127.0.0.1:8000/v1) to write captions")
    p.add_argument("--caption-model", help="model name sent to the caption endpoint")
    p.add_argument("--caption-noun", default="object",
                   help="what the caption prompts ask about (object, texture, food, ...)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--epochs", type=positive_int, help="training epochs (>= 1)")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int,
                   help="images per optimizer step (>= 1)")
    p.add_argument("--lr", type=positive_float, help="learning rate (> 0)")
    p.add_argument("--seed", type=nonneg_int,
                   help="seed of the held-out split and of training (>= 0)")
    p.add_argument("--num-prompts", dest="num_prompts", type=positive_int,
                   help="lafter/nola: learned prompt tokens (>= 1)")
    p.add_argument("--text-steps", dest="text_steps", type=positive_int,
                   help="lafter: text classifier steps (>= 1)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=nonneg_int,
                   help="latteclip: learning-rate warm-up steps (0: none)")
    p.add_argument("--k-max", dest="k_max", type=positive_int,
                   help="nola: cap on images per class (>= 1)")
    p.add_argument("--heldout-fraction", dest="heldout_fraction", type=fraction,
                   help="unlabeled held-out share used for selection, in [0, 1) (default 0.1; "
                        "0: nothing held out, the last epoch is kept)")
    p.add_argument("--grad-accum", dest="grad_accum", type=positive_int,
                   help="optimizer steps accumulate this many batches (>= 1)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"))
    p.add_argument("--select", choices=("best", "last"),
                   help="keep the epoch with the best unlabeled criterion (default) or the last")
    p.add_argument("--surrogate-norms", dest="surrogate_norms", choices=("all", "block", "last"),
                   help="surrogate (no ViT): tune all BatchNorm affines (default), the last "
                        "block's and the head's, or only the last one")
    path = p.add_mutually_exclusive_group()
    path.add_argument("--cache-views", dest="cache_views", type=nonneg_int, default=None,
                      metavar="A",
                      help="lafter/nola on the surrogate: train on cached frozen-prefix "
                           "features (weak view + A seeded strong views per image; implies "
                           "--surrogate-norms block unless given; 0: the whole tower). "
                           "Default: A = 2 on a CPU, the whole tower on a GPU")
    path.add_argument("--full-tower", dest="cache_views", action="store_const", const=0,
                      help="lafter/nola: back-propagate through the whole image tower with a "
                           "fresh augmentation each epoch (the same as --cache-views 0)")
    p.add_argument("--reproduce-wcls-bug", action="store_true",
                   help="latteclip: the authors' w_cls mixing formula (fixed by default)")
    p.add_argument("--reproduce-wcls-broadcast", action="store_true",
                   help="latteclip: the authors' (B,) x (B, D) class-weight broadcast (feature "
                        "j scaled by sample j's weight; needs --batch-size = the embedding dim; "
                        "with --reproduce-wcls-bug: their formula exactly)")
    p.add_argument("--nola-subset", dest="nola_subset", choices=("train", "all"),
                   help="nola: images k and the confident subset come from: the training "
                        "split (default) or all images, as the authors' code")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=nonneg_int,
                   help="also checkpoint every N optimizer steps (0: at epoch ends only)")
    p.add_argument("--workers", type=nonneg_int,
                   help="training DataLoader workers (0: load in the main process)")
    p.add_argument("--embed-workers", type=workers_arg, default="auto",
                   help="DataLoader workers for embedding: auto (default) or N >= 0")
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N")
    add_common(p)
    p.set_defaults(func=_run)
