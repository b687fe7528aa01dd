"""``nolabels eval LABELS [--plot out.png]``: how good are the pseudo-labels?

The work is :func:`nolabels.pipeline.evaluate.evaluate` (streaming: one part or row group
at a time); this module is its command line. Ground truth is the class folder of each
input image (``true_class``), read there and only there.
"""
from __future__ import annotations

import argparse
import json

from nolabels.commands._common import add_common
from nolabels.pipeline.evaluate import evaluate, format_report, read_label_info

__all__ = ["evaluate", "format_report", "read_label_info", "register"]


# --------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    res = evaluate(args.labels, plot=args.plot)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_report(res))
        if args.plot:
            print(f"plot: {res['plot']}")
    return 0


def register(subparsers) -> None:
    """Add ``eval`` to the ``nolabels`` CLI."""
    p = subparsers.add_parser(
        "eval", help="accuracy / per-class table of a labels file (inputs with class folders)",
        description="Score pseudo-labels against the class folders of the inputs (used only "
                    "here, never for labelling).")
    p.add_argument("labels", help="labels from nolabels label or predict: a directory "
                                  "(Parquet dataset) or a .parquet file")
    p.add_argument("--plot", help="write a PNG: confusion matrix + confidence histograms")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_common(p)
    p.set_defaults(func=_run)
