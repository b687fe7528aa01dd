"""``nolabels eval labels.parquet [--plot out.png]``: how good are the pseudo-labels?

Ground truth is the class folder of each input image (``true_class``), read here
and only here. Reports overall accuracy, the accuracy of NoLA's selected subset
(when ``label`` was run with ``--select-per-class``) and a per-class table
(support, recall, precision). ``--plot`` draws the confusion matrix and the
confidence histograms of right and wrong labels. Without class folders it
reports the label distribution and confidence statistics only.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from nolabels.commands._common import add_common
from nolabels.errors import InputError, MissingDependencyError


def read_labels(path: str | os.PathLike) -> tuple[dict[str, list], dict[str, Any]]:
    """The columns of a labels Parquet file as lists, and its ``nolabels`` metadata."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError("reading labels needs pyarrow: pip install 'nolabels[data]'") from e
    t = pq.read_table(path)
    meta = json.loads((t.schema.metadata or {}).get(b"nolabels", b"{}"))
    if "classes" not in meta:
        raise InputError(f"{path}: not a labels file written by `nolabels label`")
    return t.to_pydict(), meta


def evaluate(labels: str | os.PathLike, *, plot: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score a labels file against the class folders of its inputs.

    Returns:
        a JSON-serialisable dict: ``rows``, ``classes``, ``evaluated`` (rows with a
        true class), ``accuracy`` (None without ground truth), ``selected``
        {rows, accuracy}, ``per_class`` list of {class, support, correct, recall,
        predicted, precision}, ``confusion`` (C x C counts, rows = true class),
        ``unmatched_true_classes``, ``mean_confidence`` {right, wrong}, ``model_id``,
        ``note`` (the surrogate's "not CLIP" caveat), ``plot``.
    """
    import numpy as np

    from nolabels.methods.zeroshot import norm_name

    cols, meta = read_labels(labels)
    names: list[str] = meta["classes"]
    C = len(names)
    pred = np.asarray(cols["label"], dtype=np.int64)
    conf = np.asarray(cols["confidence"], dtype=np.float64)
    truth_raw = cols.get("true_class") or [None] * len(pred)
    index = {norm_name(c): i for i, c in enumerate(names)}
    true = np.array([-2 if t is None else index.get(norm_name(t), -1) for t in truth_raw],
                    dtype=np.int64)
    has = true != -2
    unmatched = sorted({t for t, y in zip(truth_raw, true) if y == -1})
    res: dict[str, Any] = {
        "labels": os.fspath(labels), "rows": len(pred), "classes": names,
        "model_id": meta.get("model_id"), "note": meta.get("note"),
        "evaluated": int(has.sum()), "unmatched_true_classes": unmatched,
        "predicted_counts": np.bincount(pred, minlength=C).tolist() if len(pred) else [0] * C,
    }
    sel = np.asarray(cols["selected"], dtype=bool) if "selected" in cols else None
    if has.any():
        ok = (pred == true) & has
        res["accuracy"] = float(ok[has].mean())
        res["correct"] = int(ok.sum())
        right, wrong = ok[has], ~ok[has]
        res["mean_confidence"] = {
            "right": float(conf[has][right].mean()) if right.any() else None,
            "wrong": float(conf[has][wrong].mean()) if wrong.any() else None,
        }
        m = has & (true >= 0)
        cm = np.zeros((C, C), dtype=np.int64)
        np.add.at(cm, (true[m], pred[m]), 1)
        res["confusion"] = cm.tolist()
        per = []
        for c in range(C):
            support = int((true == c).sum())
            correct = int(cm[c, c])
            predicted = int(((pred == c) & has).sum())
            per.append({"class": names[c], "support": support, "correct": correct,
                        "recall": correct / support if support else None,
                        "predicted": predicted,
                        "precision": correct / predicted if predicted else None})
        res["per_class"] = per
        if sel is not None:
            s = sel & has
            res["selected"] = {"rows": int(sel.sum()),
                               "accuracy": float(ok[s].mean()) if s.any() else None}
    else:
        res["accuracy"] = None
        res["mean_confidence"] = {"all": float(conf.mean()) if len(conf) else None}
        if sel is not None:
            res["selected"] = {"rows": int(sel.sum()), "accuracy": None}
    if plot is not None:
        res["plot"] = _plot(res, pred, conf, true, has, os.fspath(plot))
    return res


def format_report(res: dict[str, Any]) -> str:
    """The human-readable table printed by ``nolabels eval``."""
    lines = []
    if res.get("note"):
        lines.append(f"note: {res['note']}")
    lines.append(f"labels: {res['labels']}  rows: {res['rows']}  classes: {len(res['classes'])}"
                 f"  model: {res['model_id']}")
    if res["accuracy"] is None:
        lines.append("no ground truth (the inputs had no class folders): label distribution only")
        width = max(len(c) for c in res["classes"])
        for c, n in zip(res["classes"], res["predicted_counts"]):
            lines.append(f"  {c:<{width}}  {n:7d}")
        if res["mean_confidence"].get("all") is not None:
            lines.append(f"mean confidence: {res['mean_confidence']['all']:.3f}")
        return "\n".join(lines)
    lines.append(f"accuracy: {100 * res['accuracy']:.2f}%  ({res['correct']} / {res['evaluated']})"
                 f"   chance: {100 / len(res['classes']):.1f}%")
    if res.get("selected") and res["selected"]["accuracy"] is not None:
        lines.append(f"selected subset: {res['selected']['rows']} rows, "
                     f"accuracy {100 * res['selected']['accuracy']:.2f}%")
    mc = res["mean_confidence"]
    if mc.get("right") is not None and mc.get("wrong") is not None:
        lines.append(f"mean confidence: right {mc['right']:.3f}, wrong {mc['wrong']:.3f}")
    if res["unmatched_true_classes"]:
        lines.append(f"warning: class folders not in the class list (counted wrong): "
                     f"{res['unmatched_true_classes'][:10]}")
    width = max(8, *(len(p["class"]) for p in res["per_class"]))
    lines.append(f"  {'class':<{width}}  support  recall  predicted  precision")
    for p in res["per_class"]:
        rec = "   -  " if p["recall"] is None else f"{100 * p['recall']:5.1f}%"
        pre = "    -   " if p["precision"] is None else f"{100 * p['precision']:7.1f}%"
        lines.append(f"  {p['class']:<{width}}  {p['support']:7d}  {rec}  {p['predicted']:9d}  {pre}")
    return "\n".join(lines)


def _plot(res, pred, conf, true, has, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError("--plot needs matplotlib: pip install matplotlib") from e
    import numpy as np

    names = res["classes"]
    C = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    ax = axes[0]
    if res["accuracy"] is not None:
        cm = np.asarray(res["confusion"], dtype=np.float64)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"confusion matrix (row-normalised), accuracy {100 * res['accuracy']:.1f}%")
        ax.set_xlabel("pseudo-label")
        ax.set_ylabel("true class")
        if C <= 30:
            ax.set_xticks(range(C), names, rotation=60, ha="right", fontsize=8)
            ax.set_yticks(range(C), names, fontsize=8)
            if C <= 15:
                for i in range(C):
                    for j in range(C):
                        if cm[i, j]:
                            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                    color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    else:
        ax.bar(range(C), res["predicted_counts"])
        ax.set_title("pseudo-label counts (no ground truth)")
        if C <= 30:
            ax.set_xticks(range(C), names, rotation=60, ha="right", fontsize=8)
    ax = axes[1]
    bins = np.linspace(0, 1, 26)
    if res["accuracy"] is not None:
        ok = pred == true
        ax.hist(conf[has & ok], bins=bins, alpha=0.6, label=f"right ({int((has & ok).sum())})",
                color="tab:green")
        ax.hist(conf[has & ~ok], bins=bins, alpha=0.6, label=f"wrong ({int((has & ~ok).sum())})",
                color="tab:red")
        ax.legend()
    else:
        ax.hist(conf, bins=bins, color="tab:blue")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("images")
    ax.set_title("confidence of right vs wrong pseudo-labels")
    title = f"{res['model_id']}"
    if res.get("note"):
        title += "  (NOT CLIP: ConSE surrogate)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    p.add_argument("labels", help="labels Parquet file from nolabels label")
    p.add_argument("--plot", help="write a PNG: confusion matrix + confidence histograms")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_common(p)
    p.set_defaults(func=_run)
