"""``nolabels label STORE --classes classes.txt --out labels.parquet``: zero-shot / CDE
pseudo-labels for every embedded image, through ``nolabels.ops.pseudo_label``.

Output Parquet, one row per embedded image, in input order:

============== ============= ==========================================================
path           string        the image
item           int64         its index in the input list
label          int64         pseudo-label (index into the class list)
class_name     string        its name
confidence     float32       softmax probability of ``label``
topk_classes   list<int64>   the top-k classes, most probable first
topk_probs     list<float32> their probabilities
entropy        float32       entropy (nats) of the softmax over all classes
selected       bool          in NoLA's confident subset (only with --select-per-class K)
true_class     string        class folder of the input, or null; read only by ``eval``
============== ============= ==========================================================

The file's schema metadata (key ``nolabels``) holds the class list, model id,
templates, logit scale and selection size. Under ``torchrun`` rank r labels
shards r, r + N, ...; the per-class selection is merged exactly with an
``all_gather`` of each rank's local candidates, then re-selected.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nolabels.commands._common import (
    BACKENDS,
    Log,
    add_common,
    device_arg,
    positive_float,
    positive_int,
)
from nolabels.errors import IncompleteError, InputError

DEFAULT_TOPK = 5
CHUNK_ROWS = 1 << 16


@dataclass
class LabelReport:
    """What ``label`` wrote (rank 0; other ranks get the same numbers)."""

    out: str
    rows: int
    num_classes: int
    selected: int | None
    model_id: str
    seconds: float


def label(store: str | os.PathLike, classes: str | os.PathLike | Sequence[str],
          out: str | os.PathLike, *,
          descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
          templates: str | Sequence[str] = "simple", select_per_class: int | None = None,
          topk: int | None = None, logit_scale: float | None = None,
          checkpoint: str | None = None, device: str | None = "auto",
          backend: str = "auto", quiet: bool = False, encoder: Any = None) -> LabelReport:
    """Pseudo-label every row of an embedding store.

    Args:
        store: an embedding store directory (from ``embed``).
        classes: a classes.txt (one name per line) or a list of C names.
        out: the Parquet file to write.
        descriptions: ``{class: [sentences]}`` or its JSON file: CDE class embeddings
            (templates and descriptions averaged).
        templates: template set name (``simple``, ``imagenet7``, ``cifar``, ``none``),
            a file with one template per line, or a list.
        select_per_class: K for NoLA's confident subset (``ops.select_per_class``).
        topk: classes kept per row, 1 to C (default ``min(5, C)``; at least 3 are kept
            when selecting, for the fallback ranks).
        logit_scale: softmax temperature, > 0; default the model's (CLIP: 100).
        checkpoint: the model's local weights file (default: the one the store records).
        device: "auto" | "cpu" | "cuda" | "cuda:N".
        backend: ``ops.pseudo_label`` backend.
        quiet: no logs.
        encoder: an already loaded :class:`~nolabels.models.Encoder` (must match the store).
    Returns:
        a :class:`LabelReport`.
    """
    import numpy as np
    import torch

    from nolabels import dist, ops
    from nolabels.data import EmbeddingStore
    from nolabels.data.outputs import claim_output_file
    from nolabels.methods.zeroshot import (
        class_embeddings,
        read_classes,
        read_descriptions,
        resolve_templates,
    )
    from nolabels.models import load_encoder

    claim_output_file(out)  # an existing --out that nolabels did not write is refused
    t0 = time.perf_counter()
    with dist.dist_session(device) as ctx:
        log = Log(quiet, ctx.is_main)
        st = EmbeddingStore(store)
        pending = st.pending_shards()
        if pending:
            raise IncompleteError(
                f"{st.root}: {len(pending)} of {st.num_shards} shards are not embedded yet; "
                "re-run the same `nolabels embed` command to finish (it resumes)")
        names = read_classes(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
        if not names:
            raise InputError("no class names")
        _check_label_args(names, classes, topk, select_per_class, logit_scale)
        desc = None
        if descriptions is not None:
            desc = (read_descriptions(descriptions, names)
                    if isinstance(descriptions, (str, os.PathLike)) else dict(descriptions))
        tmpl = resolve_templates(templates)

        model = st.model
        if encoder is None:
            encoder = load_encoder(model["spec"], checkpoint=checkpoint or model.get("checkpoint"),
                                   device=ctx.device)
        else:
            encoder.to(ctx.device)
        if encoder.model_id != model["model_id"]:
            raise InputError(f"the store was embedded with {model['model_id']} but the model "
                             f"loaded is {encoder.model_id}; pass the same --checkpoint")
        if not encoder.has_text:
            raise InputError(f"{model['spec']} has no text encoder: zero-shot labels need a "
                             "CLIP-like model (openclip:... or surrogate:effnet-lite0+minilm)")
        if getattr(encoder, "not_clip", None):
            log.note(encoder.not_clip)
        scale = float(encoder.logit_scale if logit_scale is None else logit_scale)
        cls_emb = class_embeddings(encoder, names, templates=tmpl, descriptions=desc)
        C = len(names)
        k = min(max(DEFAULT_TOPK if topk is None else topk, 3 if select_per_class else 1), C)

        mine = [s for s in range(st.num_shards) if s % ctx.world_size == ctx.rank]
        emb, meta = st.load_shards(mine, mmap=True)
        items = torch.tensor(meta["item"], dtype=torch.int64)
        where = f" on rank {ctx.rank} of {ctx.world_size}" if ctx.distributed else ""
        log(f"labelling {emb.shape[0]} rows{where} x {C} classes (D={st.dim}, templates="
            f"{len(tmpl)}{', CDE descriptions' if desc else ''}, logit_scale={scale:g})")
        parts = []
        for a in range(0, emb.shape[0], CHUNK_ROWS):
            x = torch.from_numpy(np.ascontiguousarray(emb[a:a + CHUNK_ROWS])).to(
                ctx.device).float()
            parts.append(ops.pseudo_label(x, cls_emb.to(ctx.device), logit_scale=scale, topk=k,
                                          backend=backend))
        if parts:
            pl = ops.PseudoLabels(*(torch.cat(f).cpu() for f in zip(*parts)))
        else:
            pl = ops.PseudoLabels(torch.empty(0, dtype=torch.int64), torch.empty(0, k),
                                  torch.empty(0, k, dtype=torch.int64), torch.empty(0),
                                  torch.empty(0))

        selected_ids = None
        if select_per_class:
            local = ops.select_per_class(pl, select_per_class, row_ids=items, num_classes=C)
            if ctx.distributed:
                # Merge: gather every rank's local candidates (their full top-k), re-select.
                pos = {int(i): j for j, i in enumerate(items.tolist())}
                take = torch.tensor([pos[int(i)] for i in local.indices.tolist()], dtype=torch.int64)
                cand = pl.take(take)
                g_ids = dist.all_gather_variable(items[take])
                g_cls = dist.all_gather_variable(cand.classes)
                g_prob = dist.all_gather_variable(cand.probs)
                z = torch.zeros(g_ids.shape[0])
                merged = ops.PseudoLabels(g_cls[:, 0], g_prob, g_cls, z, z)
                local = ops.select_per_class(merged, select_per_class, row_ids=g_ids,
                                             num_classes=C)
            selected_ids = local.indices

        # Everything to every rank (numbers only); rank 0 writes the file.
        all_items = dist.all_gather_variable(items)
        all_cls = dist.all_gather_variable(pl.classes)
        all_prob = dist.all_gather_variable(pl.probs)
        all_ent = dist.all_gather_variable(pl.entropy)
        n = int(all_items.shape[0])
        n_sel = None if selected_ids is None else int(selected_ids.numel())
        if ctx.is_main:
            order = torch.argsort(all_items)
            all_items, all_cls = all_items[order], all_cls[order]
            all_prob, all_ent = all_prob[order], all_ent[order]
            full_meta = st.load_meta() if ctx.distributed else meta
            if full_meta["item"] != all_items.tolist():
                raise RuntimeError("internal error: gathered rows do not match the store")
            info = {
                "classes": names, "model_id": model["model_id"], "model_spec": model["spec"],
                "templates": tmpl,
                "descriptions": (str(descriptions) if isinstance(descriptions, (str, os.PathLike))
                                 else ("inline" if descriptions is not None else None)),
                "logit_scale": scale, "topk": k, "select_per_class": select_per_class,
                "store": str(st.root), "backend": backend,
                "note": getattr(encoder, "not_clip", None),
            }
            table = _table(full_meta, names, all_items, all_cls, all_prob, all_ent,
                           selected_ids, info)
            from nolabels.data.store import atomic_write_parquet

            out_p = os.fspath(out)
            os.makedirs(os.path.dirname(os.path.abspath(out_p)), exist_ok=True)
            atomic_write_parquet(out_p, table)
            log(f"wrote {n} labels to {out_p}"
                + (f" ({n_sel} selected, at most {select_per_class} per class)"
                   if n_sel is not None else ""))
        dist.barrier()
        return LabelReport(os.fspath(out), n, C, n_sel, model["model_id"],
                           time.perf_counter() - t0)


def _check_label_args(names: Sequence[str], classes: Any, topk: int | None,
                      select_per_class: int | None, logit_scale: float | None) -> None:
    """The numeric arguments of :func:`label`, checked once the C class names are known
    (before a model is loaded). Raises :class:`InputError`."""
    where = f" in {classes}" if isinstance(classes, (str, os.PathLike)) else ""
    if topk is not None and not 1 <= topk <= len(names):
        raise InputError(f"--topk {topk}: must be between 1 and the {len(names)} classes{where}")
    if select_per_class is not None and select_per_class < 1:
        raise InputError(f"--select-per-class {select_per_class}: must be >= 1")
    if logit_scale is not None and not 0 < logit_scale < float("inf"):
        raise InputError(f"--logit-scale {logit_scale}: must be a finite number > 0")


def _table(meta, names, items, cls, prob, ent, selected_ids, info):
    import pyarrow as pa

    from nolabels.data.readers import path_columns

    pcols = path_columns(meta["path"])
    n, k = cls.shape
    cls_np, prob_np = cls.numpy(), prob.numpy().astype("float32")
    cols = {
        "path": pcols["path"],  # a name that is not UTF-8: \\xNN text, exact in path_bytes
        "item": pa.array(items.numpy(), pa.int64()),
        "label": pa.array(cls_np[:, 0] if n else [], pa.int64()),
        "class_name": pa.array([names[c] for c in cls_np[:, 0]] if n else [], pa.string()),
        "confidence": pa.array(prob_np[:, 0] if n else [], pa.float32()),
        "topk_classes": pa.FixedSizeListArray.from_arrays(pa.array(cls_np.reshape(-1), pa.int64()), k)
        .cast(pa.list_(pa.int64())),
        "topk_probs": pa.FixedSizeListArray.from_arrays(pa.array(prob_np.reshape(-1), pa.float32()), k)
        .cast(pa.list_(pa.float32())),
        "entropy": pa.array(ent.numpy().astype("float32"), pa.float32()),
    }
    if selected_ids is not None:
        import numpy as np

        cols["selected"] = pa.array(np.isin(items.numpy(), selected_ids.numpy()), pa.bool_())
    cols["true_class"] = pa.array(meta["label"], pa.string())
    if pcols["path_bytes"].null_count < n:
        cols["path_bytes"] = pcols["path_bytes"]
    table = pa.table(cols)
    return table.replace_schema_metadata({"nolabels": json.dumps(info)})


# --------------------------------------------------------------------------- CLI
def _run(args: argparse.Namespace) -> int:
    rep = label(args.store, args.classes, args.out, descriptions=args.descriptions,
                templates=args.templates, select_per_class=args.select_per_class,
                topk=args.topk, logit_scale=args.logit_scale, checkpoint=args.checkpoint,
                device=args.device, backend=args.backend, quiet=args.quiet)
    from nolabels.dist import env_world_size

    if int(os.environ.get("RANK", "0")) == 0 or env_world_size() == 1:
        sel = "" if rep.selected is None else f"  selected: {rep.selected}"
        print(f"labels: {rep.out}  rows: {rep.rows}  classes: {rep.num_classes}{sel}")
    return 0


def register(subparsers) -> None:
    """Add ``label`` to the ``nolabels`` CLI."""
    p = subparsers.add_parser(
        "label", help="zero-shot / CDE pseudo-labels for an embedding store",
        description="Pseudo-label every image of STORE with the class names (prompt-template "
                    "ensemble, or CDE with --descriptions) through nolabels.ops.pseudo_label; "
                    "optionally mark NoLA's K most confident images per class.")
    p.add_argument("store", help="embedding store directory (from nolabels embed)")
    p.add_argument("--classes", required=True, help="text file, one class name per line")
    p.add_argument("--descriptions", help="JSON {class: [descriptions]} for CDE class embeddings")
    p.add_argument("--templates", default="simple",
                   help="template set: simple (default), imagenet7, cifar, none, or a file with "
                        "one template per line containing {}")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--select-per-class", type=positive_int, metavar="K",
                   help="mark the K (>= 1) most confident images per class (NoLA's subset) "
                        "in 'selected'")
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
