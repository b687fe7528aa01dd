"""Classify images with a tuned run (the work behind ``nolabels predict``).

RUN is a directory written by ``nolabels tune``. IMAGES is a folder, list file, tar
shard(s), or an embedding store (zero-shot / CDE runs then use its embeddings
directly when they were made by the run's model; other runs read its images).
The output has the schema of ``nolabels label`` (path, item, label, class_name,
confidence, topk_classes, topk_probs, entropy, true_class), so ``nolabels eval``
scores it; its metadata records the run and method.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nolabels.errors import InputError
from nolabels.progress import Log, progress

DEFAULT_TOPK = 5


@dataclass
class Predictor:
    """A loaded run: ``features(x)`` then ``ops.pseudo_label(features, weight, scale, normalize)``.

    Attributes:
        method: the run's method.
        classes: class names.
        encoder: the run's encoder (its image tower tuned for LatteCLIP).
        features: (B, 3, H, W) preprocessed images -> (B, D) features; with
            ``cached=True`` it takes frozen-prefix outputs (cacheable students only).
        weight: (C, D) class matrix; ``scale``, ``normalize``: as in ``ops.pseudo_label``.
        transform: the preprocessing of ``features``' input.
        uses_store: whether store embeddings of the same model are the features.
        config: the run's config.json.
    """

    method: str
    classes: list[str]
    encoder: Any
    features: Any
    weight: Any
    scale: float
    normalize: bool
    transform: Any
    uses_store: bool
    config: dict
    student: Any = None


def load_predictor(run: str | os.PathLike, *, device: str | None = "cpu",
                   checkpoint: str | None = None, encoder: Any = None) -> Predictor:
    """Load a run directory for prediction (``encoder``: an already loaded encoder of the
    run's model, to skip loading it again)."""
    import copy

    import torch
    import torch.nn.functional as F

    from nolabels.methods.common import load_run
    from nolabels.methods.students import make_student
    from nolabels.models import load_encoder
    from nolabels.models.base import parse_device

    config, model = load_run(run)
    method = config["method"]
    enc_info = config["encoder"]
    dev = parse_device(device)
    if encoder is None:
        encoder = load_encoder(enc_info["spec"],
                               checkpoint=checkpoint or enc_info.get("checkpoint"), device=dev)
    else:
        encoder.to(dev)
    if encoder.model_id != enc_info["model_id"]:
        raise InputError(f"{run} was tuned with {enc_info['model_id']} but the model loaded is "
                         f"{encoder.model_id}; pass the same --checkpoint")
    head = model["head"]
    weight = head["weight"].float().to(dev)
    student = None
    uses_store = method in ("zeroshot", "cde")

    if method in ("zeroshot", "cde"):
        def features(x, cached=False):
            return encoder.encode_image(x)
    elif method in ("lafter", "nola"):
        student = _tuned_student(make_student, encoder, model["student_config"],
                                 model["student"])

        @torch.no_grad()
        def features(x, cached=False):
            return student.features(x.to(dev), cached=cached).float()
    elif method == "latteclip":
        if model.get("towers") == "surrogate":
            student = _tuned_student(make_student, encoder, model["student_config"],
                                     model["visual"])

            @torch.no_grad()
            def features(x, cached=False):
                return F.normalize(student.features(x.to(dev), cached=cached).float(), dim=-1)
        else:
            visual = copy.deepcopy(encoder.model.visual)
            visual.load_state_dict(model["visual"])
            visual.to(dev).eval()

            @torch.no_grad()
            def features(x, cached=False):
                out = visual(x.to(dev))
                out = out[0] if isinstance(out, tuple) else out
                return F.normalize(out.float(), dim=-1)
    else:
        raise InputError(f"{run}: unknown method {method!r}")
    return Predictor(method, list(config["classes"]), encoder, features, weight,
                     float(head["scale"]), bool(head["normalize"]), encoder.transform,
                     uses_store, config, student)


def _tuned_student(make_student: Any, encoder: Any, config: dict, state: dict) -> Any:
    """The run's student (``make_student(encoder, config)``) holding the tuned ``state``,
    in eval mode."""
    import torch

    student = make_student(encoder, config)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    return student.eval()


def predict(run: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
            topk: int | None = None, batch_size: int = 64, workers: int | str = "auto",
            device: str | None = "auto", checkpoint: str | None = None,
            backend: str = "auto", quiet: bool = False) -> dict:
    """Classify ``images`` with run ``run`` and write ``label``'s output (its schema).

    ``images``: a folder, list file, tar shard(s) or an embedding store. Zero-shot / CDE
    runs on a store of the run's model stream its embeddings shard by shard and write
    ``out`` as a labels directory (or one ``.parquet`` file when ``out`` ends in
    ``.parquet``); other runs read the images and write one ``.parquet`` file.

    ``topk``: classes kept per image, 1 to C (default ``min(5, C)``).
    Returns ``{"out", "rows", "failed", "seconds", "method"}``.
    """
    import torch

    from nolabels import ops
    from nolabels.data import EmbeddingStore, ImageDataset, collate, open_source
    from nolabels.data.outputs import claim_output_file
    from nolabels.data.store import atomic_write_parquet
    from nolabels.methods.common import reopen_source
    from nolabels.models.base import parse_device
    from nolabels.pipeline.embed import default_workers
    from nolabels.pipeline.label import labels_table

    out_p = Path(out)
    to_dir = out_p.suffix not in (".parquet", ".pq") and not out_p.is_file()
    if to_dir:  # a labels directory (streamed from a store): claimed by label_source
        from nolabels.data.outputs import check_output_dir

        check_output_dir(out_p, "dataset")  # a folder of the user's is refused now
    else:
        claim_output_file(out)  # an existing --out that nolabels did not write is refused
    t0 = time.perf_counter()
    log = Log(quiet)
    dev = parse_device(device)
    if topk is not None:  # checked against the run's classes before its model loads
        _check_topk(run, topk)
    pred = load_predictor(run, device=dev, checkpoint=checkpoint)
    C = len(pred.classes)
    k = min(DEFAULT_TOPK if topk is None else topk, C)
    if getattr(pred.encoder, "not_clip", None):
        log.note(pred.encoder.not_clip)
    parts: list = []
    failed: list = []
    is_store = os.path.isfile(os.path.join(os.fspath(images), "manifest.json"))
    if is_store:
        st = EmbeddingStore(images)
        if pred.uses_store and st.model["model_id"] == pred.encoder.model_id:
            # The store's embeddings are the features: stream them shard by shard, like
            # `label` (bounded memory, resumable directory output or one file).
            return _predict_store(pred, run, images, out, k=k, backend=backend,
                                  quiet=quiet, t0=t0)
        source = reopen_source(st)
        items = [int(i) for i in st.load_meta()["item"]]
    else:
        source = open_source(images)
        items = list(range(len(source)))
    if to_dir:
        raise InputError(f"--out {out}: runs that read images write one .parquet file; "
                         "pass a name ending in .parquet")
    if source is not None:
        n_workers = default_workers(dev.type) if workers == "auto" else int(workers)
        loader = torch.utils.data.DataLoader(
            ImageDataset(source, pred.transform), batch_size=batch_size, sampler=items,
            num_workers=n_workers, collate_fn=collate)
        bar = progress(len(items), f"predict ({pred.method})", quiet=quiet)
        done_items = []
        for b in loader:
            failed.extend(b.failed)
            if b.images is not None:
                f = pred.features(b.images.to(dev))
                parts.append(ops.pseudo_label(f, pred.weight, logit_scale=pred.scale, topk=k,
                                              normalize=pred.normalize, backend=backend))
                done_items.extend(b.index.tolist())
            bar.update(len(b.index) + len(b.failed))
        bar.close()
        items = done_items
        paths = [source.paths[i] for i in items]
        labels = [source.labels[i] for i in items]
    pl = ops.PseudoLabels(*(torch.cat(f).cpu() for f in zip(*parts))) if parts else \
        ops.PseudoLabels(torch.empty(0, dtype=torch.int64), torch.empty(0, k),
                         torch.empty(0, k, dtype=torch.int64), torch.empty(0), torch.empty(0))
    info = {"classes": pred.classes, "model_id": pred.encoder.model_id,
            "model_spec": pred.encoder.spec, "method": pred.method, "run": os.fspath(run),
            "topk": k, "logit_scale": pred.scale,
            "note": getattr(pred.encoder, "not_clip", None)}
    table = labels_table(paths, labels, pred.classes, torch.tensor(items, dtype=torch.int64),
                         pl.classes, pl.probs, pl.entropy, info)
    out_p = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out_p)), exist_ok=True)
    atomic_write_parquet(out_p, table)
    if failed:
        print(f"nolabels predict: {len(failed)} image(s) could not be read and were skipped:",
              file=sys.stderr)
        for i, reason in failed[:10]:
            print(f"  {source.paths[i]}: {reason}", file=sys.stderr)
    log(f"wrote {len(items)} predictions to {out_p}")
    return {"out": out_p, "rows": len(items), "failed": len(failed), "method": pred.method,
            "seconds": time.perf_counter() - t0}


def _predict_store(pred: Predictor, run: Any, store: Any, out: Any, *, k: int, backend: str,
                   quiet: bool, t0: float) -> dict:
    """Zero-shot / CDE runs on a store of the run's model: ``label_source`` with the run's
    classifier (streaming; ``out`` a directory or a ``.parquet`` file)."""
    import hashlib

    from nolabels import dist
    from nolabels.data.sources import StoreSource
    from nolabels.pipeline.label import label_source

    w = pred.weight.float().contiguous()
    info = {"classes": list(pred.classes),
            "classes_sha256": hashlib.sha256("\n".join(pred.classes).encode(
                "utf-8", "surrogatepass")).hexdigest(),
            "model_id": pred.encoder.model_id, "model_spec": pred.encoder.spec,
            "method": pred.method, "run": os.fspath(run), "input": os.fspath(store),
            "classifier_sha256": hashlib.sha256(w.cpu().numpy().tobytes()).hexdigest(),
            "normalize": pred.normalize, "logit_scale": pred.scale, "topk": k,
            "select_per_class": None, "how": f"the {pred.method} run {os.fspath(run)}",
            "note": getattr(pred.encoder, "not_clip", None)}
    with dist.dist_session(w.device):
        src = StoreSource(store)
        info["source"] = {key: v for key, v in src.describe().items() if key != "root"}
        rep = label_source(src, w, out, info, scale=pred.scale, topk=k,
                           normalize=pred.normalize, backend=backend, quiet=quiet, t0=t0)
    return {"out": rep.out, "rows": rep.rows, "failed": 0, "method": pred.method,
            "seconds": time.perf_counter() - t0}


def _check_topk(run: str | os.PathLike, topk: int) -> None:
    """``topk`` must be in ``[1, C]``, C the classes of the run's config.json."""
    from nolabels.methods.zeroshot import read_json

    cfg = os.path.join(os.fspath(run), "config.json")
    data = read_json(cfg) if os.path.isfile(cfg) else None
    classes = data.get("classes") if isinstance(data, dict) else None
    if isinstance(classes, list) and not 1 <= topk <= len(classes):
        raise InputError(f"--topk {topk}: must be between 1 and the {len(classes)} classes "
                         f"of {run}")


__all__ = ["DEFAULT_TOPK", "Predictor", "load_predictor", "predict"]
