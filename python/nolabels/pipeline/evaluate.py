"""How good are the pseudo-labels? Streaming evaluation of a labels file or dataset.

Ground truth is the class folder of each input image (``true_class``), read here and
only here. :func:`evaluate` reads ``label``'s output — a labels directory (Parquet
parts + ``_nolabels.json`` + ``_selected.parquet``) or a single ``.parquet`` — one part
(or row group) at a time, reading only the columns it needs, and accumulates counts:
memory is O(C) (O(C²) for the confusion matrix, kept only up to
:data:`CONFUSION_MAX_CLASSES` classes), whatever the number of rows.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nolabels.errors import CorruptFileError, InputError, MissingDependencyError

#: Largest class count for which the C x C confusion matrix is kept (8 bytes per cell).
CONFUSION_MAX_CLASSES = 2048
HIST_BINS = np.linspace(0.0, 1.0, 26)
_COLUMNS = ["label", "confidence", "true_class"]


def _pq():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a core dependency
        raise MissingDependencyError("reading labels needs pyarrow: pip install pyarrow") from e
    return pa, pc, pq


def read_label_info(path: str | os.PathLike) -> dict[str, Any]:
    """The run settings of a labels file or directory (classes, model id, ...)."""
    _, _, pq = _pq()
    p = Path(path)
    if p.is_dir():
        from nolabels.pipeline.label import MANIFEST

        mf = p / MANIFEST
        if not mf.is_file():
            raise InputError(f"{p}: not a labels directory written by `nolabels label` "
                             f"({MANIFEST} missing)")
        try:
            meta = json.loads(mf.read_text())
        except ValueError as e:
            raise CorruptFileError(mf, f"not valid JSON ({e})") from e
        if not meta.get("complete"):
            from nolabels.errors import IncompleteError

            raise IncompleteError(f"{p}: labelling did not finish; re-run the same "
                                  "`nolabels label` command (it resumes)")
        return meta
    try:
        md = pq.ParquetFile(p).schema_arrow.metadata or {}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CorruptFileError(p, f"not a readable Parquet file ({e})") from e
    meta = json.loads(md.get(b"nolabels", b"{}"))
    if "classes" not in meta:
        raise InputError(f"{p}: not a labels file written by `nolabels label`")
    return meta


def iter_label_batches(path: str | os.PathLike, columns: list[str]) -> Iterator[Any]:
    """Record batches of ``columns`` of a labels file or directory, in row order."""
    _, _, pq = _pq()
    p = Path(path)
    files = sorted(p.glob("part-*.parquet")) if p.is_dir() else [p]
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=1 << 16, columns=cols)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise CorruptFileError(f, f"not a readable labels part ({e})") from e


def _selected_ids(path: Path):
    """Selected row ids of a labels directory (None without a selection)."""
    _, _, pq = _pq()
    from nolabels.pipeline.label import SELECTED

    f = path / SELECTED
    if not f.is_file():
        return None
    return pq.read_table(f, columns=["item"]).column("item").combine_chunks()


def evaluate(labels: str | os.PathLike, *, plot: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score pseudo-labels against the class folders of their inputs.

    Args:
        labels: ``nolabels label`` output (directory or ``.parquet``).
        plot: write a PNG (confusion matrix + confidence histograms) here.
    Returns:
        a JSON-serialisable dict: ``rows``, ``classes``, ``evaluated`` (rows with a true
        class), ``accuracy`` (None without ground truth), ``correct``, ``selected``
        {rows, accuracy}, ``per_class`` list of {class, support, correct, recall,
        predicted, precision}, ``confusion`` (C x C counts, rows = true class; None above
        :data:`CONFUSION_MAX_CLASSES`), ``unmatched_true_classes``, ``mean_confidence``
        {right, wrong} (or {all}), ``confidence_hist`` {bins, right, wrong, all},
        ``predicted_counts``, ``model_id``, ``note`` (the surrogate's caveat), ``plot``.
    """
    _, pc, _ = _pq()
    from nolabels.methods.zeroshot import norm_name

    p = Path(labels)
    meta = read_label_info(p)
    names: list[str] = meta["classes"]
    C = len(names)
    index = {norm_name(c): i for i, c in enumerate(names)}
    sel_ids = _selected_ids(p) if p.is_dir() else None
    cols = [*_COLUMNS, "selected"] + (["item"] if sel_ids is not None else [])

    rows = evaluated = correct = 0
    predicted = np.zeros(C, np.int64)
    support = np.zeros(C, np.int64)
    correct_c = np.zeros(C, np.int64)
    predicted_eval = np.zeros(C, np.int64)
    keep_cm = C <= CONFUSION_MAX_CLASSES
    cm = np.zeros((C, C), np.int64) if keep_cm else None
    hist = {k: np.zeros(len(HIST_BINS) - 1, np.int64) for k in ("right", "wrong", "all")}
    conf_sum = {"right": 0.0, "wrong": 0.0, "all": 0.0}
    sel_rows = sel_eval = sel_correct = 0
    has_sel = sel_ids is not None
    unmatched: set[str] = set()
    for b in iter_label_batches(p, cols):
        pred = b.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        conf = b.column("confidence").to_numpy(zero_copy_only=False).astype(np.float64)
        n = pred.shape[0]
        if n and (pred.min() < 0 or pred.max() >= C):
            raise CorruptFileError(p, f"labels outside 0..{C - 1}")
        rows += n
        predicted += np.bincount(pred, minlength=C)
        hist["all"] += np.histogram(conf, HIST_BINS)[0]
        conf_sum["all"] += float(conf.sum())
        if "true_class" in b.schema.names:
            enc = pc.dictionary_encode(b.column("true_class"))  # a batch column: one chunk
            dct = enc.dictionary.to_pylist()
            lut = np.array([index.get(norm_name(t), -1) for t in dct] + [-2], np.int64)
            if -1 in lut[:-1]:
                unmatched.update(t for t, y in zip(dct, lut) if y == -1)
            idx = enc.indices.fill_null(len(dct)).to_numpy(zero_copy_only=False)
            true = lut[idx]
        else:
            true = np.full(n, -2, np.int64)
        has = true != -2
        ok = (pred == true) & has
        evaluated += int(has.sum())
        correct += int(ok.sum())
        m = has & (true >= 0)
        support += np.bincount(true[m], minlength=C)
        correct_c += np.bincount(pred[ok], minlength=C)
        predicted_eval += np.bincount(pred[has], minlength=C)
        if cm is not None and m.any():
            cm += np.bincount(true[m] * C + pred[m], minlength=C * C).reshape(C, C)
        for key, mask in (("right", ok), ("wrong", has & ~ok)):
            hist[key] += np.histogram(conf[mask], HIST_BINS)[0]
            conf_sum[key] += float(conf[mask].sum())
        if sel_ids is not None:
            sel = pc.is_in(b.column("item"), value_set=sel_ids).to_numpy(zero_copy_only=False)
        elif "selected" in b.schema.names:
            has_sel = True
            sel = b.column("selected").to_numpy(zero_copy_only=False).astype(bool)
        else:
            sel = None
        if sel is not None:
            sel_rows += int(sel.sum())
            sel_eval += int((sel & has).sum())
            sel_correct += int((sel & ok).sum())

    res: dict[str, Any] = {
        "labels": os.fspath(labels), "rows": rows, "classes": names,
        "model_id": meta.get("model_id"), "note": meta.get("note"),
        "evaluated": evaluated, "unmatched_true_classes": sorted(unmatched),
        "predicted_counts": predicted.tolist(),
        "confidence_hist": {"bins": HIST_BINS.tolist(),
                            **{k: v.tolist() for k, v in hist.items()}},
    }
    if evaluated:
        res["accuracy"] = correct / evaluated
        res["correct"] = correct
        n_wrong = evaluated - correct
        res["mean_confidence"] = {
            "right": conf_sum["right"] / correct if correct else None,
            "wrong": conf_sum["wrong"] / n_wrong if n_wrong else None,
        }
        res["confusion"] = cm.tolist() if cm is not None else None
        res["per_class"] = [
            {"class": names[c], "support": int(support[c]), "correct": int(correct_c[c]),
             "recall": int(correct_c[c]) / int(support[c]) if support[c] else None,
             "predicted": int(predicted_eval[c]),
             "precision": int(correct_c[c]) / int(predicted_eval[c]) if predicted_eval[c] else None}
            for c in range(C)]
        if has_sel:
            res["selected"] = {"rows": sel_rows,
                               "accuracy": sel_correct / sel_eval if sel_eval else None}
    else:
        res["accuracy"] = None
        res["mean_confidence"] = {"all": conf_sum["all"] / rows if rows else None}
        if has_sel:
            res["selected"] = {"rows": sel_rows, "accuracy": None}
    if plot is not None:
        res["plot"] = _plot(res, os.fspath(plot))
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


def _plot(res: dict[str, Any], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError("--plot needs matplotlib: pip install matplotlib") from e

    names = res["classes"]
    C = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    ax = axes[0]
    if res["accuracy"] is not None and res.get("confusion") is not None:
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
        ax.set_title("pseudo-label counts" + (" (no ground truth)" if res["accuracy"] is None
                                             else f", accuracy {100 * res['accuracy']:.1f}%"))
        if C <= 30:
            ax.set_xticks(range(C), names, rotation=60, ha="right", fontsize=8)
    ax = axes[1]
    h = res["confidence_hist"]
    bins = np.asarray(h["bins"])
    centers, width = (bins[:-1] + bins[1:]) / 2, np.diff(bins)
    if res["accuracy"] is not None:
        ax.bar(centers, h["right"], width=width, alpha=0.6, color="tab:green",
               label=f"right ({sum(h['right'])})")
        ax.bar(centers, h["wrong"], width=width, alpha=0.6, color="tab:red",
               label=f"wrong ({sum(h['wrong'])})")
        ax.legend()
    else:
        ax.bar(centers, h["all"], width=width, color="tab:blue")
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


__all__ = ["CONFUSION_MAX_CLASSES", "evaluate", "format_report", "iter_label_batches",
           "read_label_info"]
