"""NoLA, "No Labels Attached" (Imam et al., arXiv 2411.19346), methods.md §3.

1. **CDE classifier**: ``w_c = normalize(mean_t normalize(text(t)))`` over the class's
   descriptions and filled templates (:func:`nolabels.methods.zeroshot.cde_embeddings`).
2. **Confident subset**: zero-shot pseudo-labels of the frozen encoder's store
   embeddings (``ops.pseudo_label``, scale = the model's, top-3), then
   ``ops.select_per_class`` with ``k = max(16, floor(0.2 · N / C))`` (NoLA's
   ``find_k``; optional cap ``k_max``, the paper's 512, off by default as in the code).
3. **DINO labeller**: ``h = Linear(D_dino, 256) -> ReLU -> Linear(256, C)`` (default
   init) trained with plain CE, Adam lr 1e-3, 50 epochs, batch 32, on the cached
   DINO features of the subset. Its targets ``argmax h(DINO(x_weak))`` are
   **computed once** for every image: DINO, ``h`` and the weak view are all fixed,
   so they are constant per image (the authors recompute them every step).
4. **DINO-assisted prompt tuning**: student ``W_cde · g(x_strong)`` (16 shallow
   prompts + visual LayerNorms; ``W_cde`` a bias-free linear layer initialised with
   the CDE matrix, trainable), label-smoothed CE (ε = 0.1) against the labeller's
   targets, AdamW lr 0.004 (wd 0.01, 0 on biases), batch 512, 50 epochs, constant LR.

Deliberate differences from the authors' code (all of them, with the flags that
reproduce the original: ``docs/differences.md``): ``k`` and the confident subset are
computed on the training split (the images left after the unlabeled held-out split,
90 % by default), so no held-out image trains the labeller whose targets the held-out
criterion compares with; the authors use all images (``subset_from="all"``,
``--nola-subset all``); the epoch is selected by an unlabeled
criterion (student vs labeller agreement on an unlabeled held-out split; epoch 0, the
CDE student, is a candidate; the labeller's own held-out agreement is logged beside
it) instead of
labeled-validation accuracy (= test accuracy on CIFAR/ImageNet) with early stopping;
classes are enumerated as ``range(C)``, not ``set(ground_truth_labels)``; the DINO
features come from an embedding store, so they are L2-normalised (the code uses the
raw CLS token). On the offline surrogate (no ViT) the BatchNorm affine parameters
are tuned instead of prompts + LayerNorms; the logs say so.

On the surrogate, the default "DINO" stand-in is the encoder's own image tower
(``surrogate:effnet-lite0``, supervised, NOT DINO): its pooled features come from the
pass that embeds the weak view anyway (:func:`own_tower_features`), not from a second
model and a second pass.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nolabels import ops
from nolabels.errors import InputError
from nolabels.methods.common import (
    IndexDataset,
    RunSettings,
    TuneData,
    encoder_info,
    map_rows,
    save_run,
)
from nolabels.methods.lafter import ViewTuningTask, image_datasets, tuned_model, tuning_student
from nolabels.methods.selection import CRITERIA, agreement, coverage_warning
from nolabels.methods.students import Student
from nolabels.methods.trainer import (
    TrainConfig,
    TrainTask,
    fit,
    sample_seed,
    seeded,
    tensor_digest,
)


@dataclass
class NoLAConfig(RunSettings):
    """NoLA's hyper-parameters (defaults: the paper's code, ``config.yml`` / ``misc.py``);
    run settings in :class:`RunSettings`. ``subset_from``: the rows ``k`` and the
    confident subset come from: "train" (default: the training split, without the
    unlabeled held-out images) or "all" (every image, as the authors' code)."""

    templates: str | list = "simple"
    k_min: int = 16
    k_fraction: float = 0.2
    k_max: int | None = None
    subset_from: str = "train"
    labeller_hidden: int = 256
    labeller_epochs: int = 50
    labeller_batch_size: int = 32
    labeller_lr: float = 1e-3
    num_prompts: int = 16
    prompt_mode: str = "shallow"
    surrogate_norms: str = "all"
    lr: float = 0.004
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    strong_aug: str = "nola"
    seed: int = 7777


def find_k(n: int, num_classes: int, k_min: int = 16, fraction: float = 0.2,
           k_max: int | None = None) -> int:
    """NoLA's per-class subset size: ``max(k_min, floor(fraction * n / C))``, capped."""
    k = max(k_min, math.floor(fraction * n / num_classes))
    return min(k, k_max) if k_max is not None else k


def confident_subset(emb: torch.Tensor, class_emb: torch.Tensor, k: int, *,
                     logit_scale: float = 100.0) -> ops.Selection:
    """Zero-shot pseudo-labels (top-3) and NoLA's per-class selection of the rows."""
    pl = ops.pseudo_label(emb, class_emb.to(emb.device), logit_scale=logit_scale,
                          topk=min(3, class_emb.shape[0]))
    return ops.select_per_class(pl, k, num_classes=class_emb.shape[0])


# --------------------------------------------------------------------------- DINO stand-in
def own_tower_stand_in(encoder, dino_model: str | None,
                       dino_checkpoint: str | os.PathLike | None = None) -> bool:
    """Whether NoLA's DINO features are the surrogate encoder's own tower's pooled features
    (``dino_model`` ``surrogate:effnet-lite0`` or None, with the same weights), so they
    can come from the encoder's pass over the weak view."""
    from nolabels.models.base import file_sha256
    from nolabels.models.surrogate import IMAGE_ONLY_SPEC

    mine = getattr(encoder, "image_only_model_id", None)
    if mine is None or not hasattr(encoder, "image_features"):
        return False
    if dino_model not in (None, IMAGE_ONLY_SPEC):
        return False
    if dino_checkpoint is None:
        return mine == IMAGE_ONLY_SPEC
    if not Path(dino_checkpoint).expanduser().is_file():
        return False  # the separate model's loader says what is wrong
    return mine == f"{IMAGE_ONLY_SPEC}@sha256:{file_sha256(Path(dino_checkpoint).expanduser())[:16]}"


def stand_in_file(out: str | os.PathLike, encoder, data: TuneData) -> Path:
    """``RUN/dino_features/pooled-KEY.npy``: the stand-in features of ``data``'s rows, keyed
    by the weights, the preprocessing, the images and the rows (a resumed run reuses it)."""
    key = hashlib.sha256(json.dumps({
        "model": encoder.image_only_model_id, "preprocessing": encoder.preprocessing,
        "source": data.source.fingerprint(),
        "items": hashlib.sha256(np.asarray(data.items, np.int64).tobytes()).hexdigest(),
        "v": 1}, sort_keys=True).encode()).hexdigest()[:20]
    return Path(out) / "dino_features" / f"pooled-{key}.npy"


def own_tower_features(encoder, data: TuneData, files: Mapping[str, str | os.PathLike], *,
                       tap=None, batch_size: int = 64, workers: int | str = 0,
                       log: Callable[[str], None] = lambda _m: None, quiet: bool = True
                       ) -> tuple[torch.Tensor, dict]:
    """The DINO stand-in features of ``data``'s rows from the encoder's own pass.

    Args:
        files: :func:`nolabels.methods.students.weak_view_outputs` files; ``"pooled"``
            (:func:`stand_in_file`) is required.
        tap: the store's embedding pass (see ``weak_view_outputs``).
    Returns:
        ((N, 1280) float32 L2-normalised rows, rounded to float16 exactly as a
        ``surrogate:effnet-lite0`` embedding store holds them; the ``dino_info`` record).
    """
    from nolabels.methods.students import weak_view_outputs
    from nolabels.models.surrogate import IMAGE_ONLY_SPEC

    got = weak_view_outputs(encoder, data.source, data.items, files, tap=tap,
                            store_emb=data.emb, batch_size=batch_size, workers=workers,
                            log=log, quiet=quiet)
    feats = torch.from_numpy(np.asarray(got["pooled"], np.float32))
    return feats, {"model_id": encoder.image_only_model_id, "spec": IMAGE_ONLY_SPEC,
                   "features": "the encoder's own tower, pooled, from its weak-view pass"}


# --------------------------------------------------------------------------- labeller
class LabellerModule(nn.Module):
    """NoLA's DINO labeller ``h`` (``AdapterMLP``) with its training data as buffers."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 hidden: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("feats", feats.float())
        self.register_buffer("labels", labels.long())
        with seeded(sample_seed(seed, 3)):
            self.mlp = nn.Sequential(nn.Linear(feats.shape[1], hidden), nn.ReLU(),
                                     nn.Linear(hidden, num_classes))
        self.mlp.to(feats.device)

    def forward(self, idx: torch.Tensor):
        logits = self.mlp(self.feats[idx])
        loss = nn.functional.cross_entropy(logits, self.labels[idx])
        return loss, {}


class LabellerTask(TrainTask):
    name = "nola_labeller"

    def __init__(self, module: LabellerModule, lr: float) -> None:
        self.module, self.lr = module, lr
        self.device = module.feats.device
        self.train_ds = IndexDataset(int(module.labels.numel()))  # row positions

    def make_optimizer(self):
        return torch.optim.Adam(self.module.parameters(), lr=self.lr)


def train_labeller(dino: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                   num_classes: int, *, hidden: int = 256, epochs: int = 50,
                   batch_size: int = 32, lr: float = 1e-3, seed: int = 0, out=None,
                   log=None, quiet: bool = True) -> tuple[nn.Module, dict]:
    """Train ``h`` on ``dino[rows]`` -> ``labels``; returns (h, summary)."""
    module = LabellerModule(dino[rows], labels, num_classes, hidden, seed)
    task = LabellerTask(module, lr)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, ddp=False,
                      select="last", quiet=quiet, amp="off")
    res = fit(task, cfg, out, log=log,
              settings={"lr": lr, "hidden": hidden, "data": tensor_digest(dino[rows], labels)})
    return module.mlp, {"epochs": epochs, "rows": int(rows.numel()),
                        "final_loss": res.history[-1]["loss"] if res.history else None,
                        "seconds": res.seconds}


@torch.no_grad()
def labeller_targets(h: nn.Module, dino: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``argmax h(dino)`` for every row, once (constant for the whole stage)."""
    return torch.cat([h(dino[i:i + batch_size]).argmax(1) for i in range(0, len(dino), batch_size)])


def labeller_heldout_agreement(targets: torch.Tensor, emb: torch.Tensor, heldout: torch.Tensor,
                               cde: torch.Tensor, logit_scale: float) -> float | None:
    """The labeller's own held-out agreement: the fraction of held-out rows whose labeller
    target equals their CDE zero-shot label (what the labeller was trained to reproduce,
    on images it never saw). None without held-out rows. Reported, never selected on.

    Args:
        targets: (N,) int64 labeller targets of every row; emb: (N, D) store embeddings;
        heldout: (M,) row indices; cde: (C, D) class embeddings.
    """
    if heldout.numel() == 0:
        return None
    pl = ops.pseudo_label(emb[heldout].to(cde.device), cde, logit_scale=logit_scale, topk=1)
    return agreement(targets[heldout].cpu(), pl.labels.cpu().long())


# --------------------------------------------------------------------------- student
class NoLAModule(nn.Module):
    """Student ``W_cde · g(x_strong)`` against the constant labeller targets."""

    def __init__(self, student: Student, cde: torch.Tensor, targets: torch.Tensor,
                 eps: float = 0.1, cached: bool = False) -> None:
        super().__init__()
        self.student = student
        self.classifier = nn.Linear(cde.shape[1], cde.shape[0], bias=False, device=cde.device)
        with torch.no_grad():
            self.classifier.weight.copy_(cde)
        self.register_buffer("targets", targets.long())
        self.eps, self.cached = eps, cached

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.student.features(x, cached=self.cached).float())

    def forward(self, batch):
        y = self.targets[batch["index"]]
        logits = self.logits(batch["strong"])
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=self.eps)
        return loss, {"train_agreement": float((logits.argmax(1) == y).float().mean())}


class NoLATask(ViewTuningTask):
    name = "nola"

    def __init__(self, module: NoLAModule, data: TuneData, heldout_targets: torch.Tensor,
                 train_ds, heldout_ds, lr: float, wd: float, eval_batch_size: int,
                 workers: int, labeller_heldout_agreement: float | None = None) -> None:
        super().__init__(module, data, train_ds, heldout_ds, lr, wd, eval_batch_size, workers,
                         module.targets.device)
        self.heldout_targets = heldout_targets
        #: the labeller vs the CDE zero-shot labels on the held-out images (a constant,
        #: logged beside the criterion, never selected on)
        self.labeller_heldout_agreement = labeller_heldout_agreement

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        held = self.data.heldout
        if held.numel() == 0:
            return {}
        m = self.module
        pred = map_rows(lambda b: m.logits(b["weak"]).argmax(1), self.heldout_ds,
                        range(len(held)), batch_size=self.eval_batch_size, workers=self.workers,
                        device=self.device)
        out = {"heldout_agreement": agreement(pred, self.heldout_targets.cpu())}
        if self.labeller_heldout_agreement is not None:
            out["labeller_heldout_agreement"] = self.labeller_heldout_agreement
        acc = self.data.oracle.report(held, pred)
        if acc is not None:
            out["oracle_heldout_accuracy"] = acc
        return out


def tune(encoder, data: TuneData, classes: Sequence[str], out: str | os.PathLike, *,
         dino: torch.Tensor, descriptions: Mapping[str, Sequence[str]] | None = None,
         config: NoLAConfig | None = None, epochs: int | None = None,
         prefix: dict | None = None, dino_info: dict | None = None,
         log: Callable[[str], None] = print, quiet: bool = False) -> dict:
    """Run NoLA on ``data`` and write the run directory ``out``.

    Args:
        encoder: CLIP-like encoder (open_clip ViT, or the surrogate).
        data: the tuning data (its ``emb`` are the frozen encoder's weak-view embeddings).
        classes: C class names.
        dino: (N, D_dino) DINO features of the same rows (e.g. from a ``timm:...dino``
            store; :func:`nolabels.methods.common.aligned_store_features`).
        descriptions: ``{class: [sentences]}`` for CDE (templates only if None).
        config: :class:`NoLAConfig`.
        prefix: cached frozen-prefix views for a cacheable student (see LaFTer).
    Returns:
        the summary dict (also in ``out/summary.json``).
    """
    from nolabels.methods.zeroshot import cde_embeddings

    cfg = config or NoLAConfig()
    if epochs is not None:
        cfg.epochs = epochs
    t0 = time.perf_counter()
    C = len(classes)
    say = (lambda m: None) if quiet else log
    if getattr(encoder, "not_clip", None):
        say(f"note: {encoder.not_clip}")
    dev = encoder.device
    if dino.shape[0] != data.n:
        raise InputError(f"dino features have {dino.shape[0]} rows, the data {data.n}")

    # 1-2: CDE and the confident subset (training rows; "all": every row, as the authors)
    if cfg.subset_from not in ("train", "all"):
        raise InputError(f"nola: subset_from must be 'train' or 'all', got {cfg.subset_from!r}")
    cde = cde_embeddings(encoder, classes, descriptions, templates=cfg.templates).to(dev)
    subset_rows = data.train if cfg.subset_from == "train" else torch.arange(data.n)
    k = find_k(int(subset_rows.numel()), C, cfg.k_min, cfg.k_fraction, cfg.k_max)
    sel = confident_subset(data.emb[subset_rows].to(dev), cde, k, logit_scale=encoder.logit_scale)
    sel_rows = subset_rows[sel.indices.cpu()]
    per_class = torch.bincount(sel.labels.cpu(), minlength=C).tolist()
    src = "the training split" if cfg.subset_from == "train" else "all images, as the authors"
    say(f"nola: CDE pseudo-labels, k = {k} per class -> {len(sel_rows)} images "
        f"(per class {per_class}; from {src})")
    warn = coverage_warning(per_class, classes, "nola: the confident subset")
    if warn:
        getattr(log, "warn", log)(warn)  # shown even when quiet: it cannot learn them
    subset_acc = data.oracle.report(sel_rows, sel.labels.cpu())

    # 3: the labeller, then its constant targets for every row
    dino_dev = dino.to(dev).float()
    h, lab_summary = train_labeller(
        dino_dev, sel_rows.to(dev), sel.labels.to(dev), C, hidden=cfg.labeller_hidden,
        epochs=cfg.labeller_epochs, batch_size=cfg.labeller_batch_size, lr=cfg.labeller_lr,
        seed=cfg.seed, out=out, log=say)
    targets = labeller_targets(h, dino_dev).cpu()
    say(f"nola: DINO labeller trained on {len(sel_rows)} images ({cfg.labeller_epochs} epochs); "
        f"targets computed once for all {data.n} images")
    lab_acc_train = data.oracle.report(data.train, targets[data.train])
    lab_held = labeller_heldout_agreement(targets, data.emb, data.heldout, cde,
                                          encoder.logit_scale)
    if lab_held is not None:
        say(f"nola: the labeller agrees with the CDE zero-shot labels on {lab_held:.4f} of the "
            f"{int(data.heldout.numel())} held-out images (reported, not used for selection)")

    # 4: DINO-assisted tuning of the student
    student, cached = tuning_student(encoder, cfg, prefix, say, "nola")
    module = NoLAModule(student, cde, targets[data.train].to(dev), cfg.label_smoothing,
                        cached=cached)
    train_ds, held_ds = image_datasets(student, encoder, data, strong_aug=cfg.strong_aug,
                                       seed=cfg.seed, prefix=prefix, need_weak=False)
    task = NoLATask(module, data, targets[data.heldout], train_ds, held_ds, cfg.lr,
                    cfg.weight_decay, cfg.eval_batch_size, cfg.workers,
                    labeller_heldout_agreement=lab_held)
    tcfg = cfg.train_config(quiet)
    settings = {"nola": asdict(cfg), "student": student.config(), "cached": cached,
                "rows": tensor_digest(data.train, data.heldout), "targets": tensor_digest(targets),
                "cde": tensor_digest(cde)}
    res = fit(task, tcfg, out, log=say, settings=settings)

    model = tuned_model("nola", module.student, module.classifier)
    model["labeller"] = {k_: v.cpu() for k_, v in h.state_dict().items()}
    oracle = {}
    if subset_acc is not None:
        oracle = {"oracle_subset_accuracy": subset_acc,
                  "oracle_labeller_train_accuracy": lab_acc_train,
                  "oracle_labeller_heldout_accuracy": data.oracle.report(
                      data.heldout, targets[data.heldout])}
    summary = {
        "method": "nola", "classes": list(classes), "train_images": int(data.train.numel()),
        "heldout_images": int(data.heldout.numel()), "k": k, "subset_size": len(sel_rows),
        "subset_from": cfg.subset_from,
        "subset_per_class": per_class, "subset_warning": warn, "labeller": lab_summary,
        "labeller_heldout_agreement": lab_held,
        "selection": CRITERIA["nola"], "selected_epoch": res.selected_epoch,
        "criterion_value": res.best_score, "student": student.describe(),
        "cached_prefix": cached, "seconds": time.perf_counter() - t0,
        "history": res.history, "encoder": encoder_info(encoder), "dino": dino_info, **oracle,
    }
    config = {"method": "nola", "encoder": encoder_info(encoder), "classes": list(classes),
              "hyper_parameters": asdict(cfg), "student": student.config(), "dino": dino_info,
              "descriptions": None if descriptions is None else dict(descriptions),
              "store": data.store, "selection": CRITERIA["nola"]}
    save_run(out, config, model, summary)
    return summary
