"""LaFTer (Mirza et al., NeurIPS 2023), methods.md §2.

1. **Text-only classifier.** Texts = every description sentence and every filled
   template, each encoded separately and L2-normalised, labelled with its class.
   ``W = Linear(D, C, bias=False)`` (PyTorch default init, *not* from text) trains
   full-batch for ``text_steps`` steps (400 for CIFAR/DTD/EuroSAT/Food/UCF, 500
   ImageNet/SUN/Caltech/Aircraft, 600 Flowers: :data:`TEXT_STEPS`) on
   ``W (e + ξ)``, ``ξ ~ N(0, 0.1² I)`` resampled every step, label-smoothed CE
   (ε = 0.1), AdamW lr 5e-4, wd 0.01. Then ``W_pl = copy(W)`` is frozen.
2. **Self-training.** For each batch of unlabeled images (batch 50, 50 epochs):
   teacher ``ŷ = argmax W_pl · normalize(tower(x_weak))`` where ``tower`` is the
   *un-prompted* vision tower **with the current, trainable LayerNorms** (the
   teacher drifts as they train, so pseudo-labels are not precomputed);
   student ``W · g(x_strong)`` with ``g`` the prompted tower (50 shallow prompts,
   un-normalised feature); label-smoothed CE; prompts + visual LayerNorms + ``W``
   train with AdamW lr 5e-4, wd 0.01 (0 on biases), constant LR.

Deliberate differences from the authors' code: the epoch is selected by an unlabeled
criterion (the student's agreement with the *frozen epoch-0* teacher on an unlabeled
held-out split, minus a class-balance penalty; epoch 0 is a candidate; see
:mod:`nolabels.methods.selection`), not by the best *test* accuracy the script prints; texts are encoded in batches (same result).
On the offline surrogate (no ViT) the BatchNorm affine parameters of its image
tower are tuned instead of prompts + LayerNorms (:class:`ConSEStudent`); the logs say so.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nolabels.errors import InputError
from nolabels.methods.common import (
    IndexDataset,
    RunSettings,
    TuneData,
    encoder_info,
    map_rows,
    save_run,
)
from nolabels.methods.selection import CRITERIA, agreement, balanced_agreement
from nolabels.methods.students import (
    CachedViews,
    ImageViews,
    Student,
    make_student,
    strong_transform,
)
from nolabels.methods.trainer import (
    TrainConfig,
    TrainTask,
    adamw_no_bias_decay,
    fit,
    sample_seed,
    seeded,
    tensor_digest,
)

#: LaFTer's text-classifier steps per dataset (jmiemirza/LaFTer ``utils/utils.py:
#: text_cls_epochs``; no entry for Oxford Pets or Stanford Cars there). ``--dataset NAME``
#: applies them (``LaFTerConfig.text_steps`` through :mod:`nolabels.methods.presets`);
#: without it the generic default, 400, is used.
TEXT_STEPS = {"dtd": 400, "eurosat": 400, "food101": 400, "cifar10": 400, "cifar100": 400,
              "ucf101": 400, "imagenet": 500, "imagenet-a": 500, "imagenet-r": 500,
              "imagenet-sketch": 500, "sun397": 500, "caltech101": 500, "fgvc_aircraft": 500,
              "flowers102": 600}


@dataclass
class LaFTerConfig(RunSettings):
    """LaFTer's hyper-parameters (defaults: the paper's code); run settings in
    :class:`RunSettings`."""

    templates: str | list = "simple"
    text_steps: int = 400
    text_lr: float = 5e-4
    text_weight_decay: float = 0.01
    text_noise_std: float = 0.1
    label_smoothing: float = 0.1
    num_prompts: int = 50
    prompt_mode: str = "shallow"
    surrogate_norms: str = "all"
    batch_size: int = 50
    lr: float = 5e-4
    weight_decay: float = 0.01
    strong_aug: str = "lafter"


# --------------------------------------------------------------------------- stage 1

class TextClassifierModule(nn.Module):
    """``W (e + ξ)`` on every text embedding, label-smoothed CE (full batch)."""

    def __init__(self, text_emb: torch.Tensor, text_labels: torch.Tensor, num_classes: int,
                 noise_std: float, eps: float, seed: int) -> None:
        super().__init__()
        self.register_buffer("emb", text_emb.float())
        self.register_buffer("labels", text_labels.long())
        with seeded(sample_seed(seed, 1)):
            self.classifier = nn.Linear(text_emb.shape[1], num_classes, bias=False,
                                        device=text_emb.device)
        self.noise_std, self.eps = noise_std, eps

    def forward(self, _batch):
        x = self.emb + self.noise_std * torch.randn_like(self.emb)
        logits = self.classifier(x)
        loss = F.cross_entropy(logits.float(), self.labels, label_smoothing=self.eps)
        return loss, {"text_accuracy": float((logits.argmax(1) == self.labels).float().mean())}


class TextClassifierTask(TrainTask):
    name = "lafter_text"

    def __init__(self, module: TextClassifierModule, steps: int, lr: float, wd: float) -> None:
        self.module, self.steps, self.lr, self.wd = module, steps, lr, wd
        self.device = module.emb.device
        self.train_ds = IndexDataset(steps)  # one item per full-batch step

    def make_optimizer(self):
        return adamw_no_bias_decay(list(self.module.named_parameters()), self.lr, self.wd)


def text_dataset(encoder, classes: Sequence[str], templates, descriptions
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """LaFTer's text set: (T, D) normalised embeddings, (T,) labels, the texts."""
    from nolabels.methods.zeroshot import class_texts, resolve_templates

    per_class = class_texts(classes, resolve_templates(templates), descriptions)
    texts = [t for ts in per_class for t in ts]
    labels = torch.tensor([c for c, ts in enumerate(per_class) for _ in ts], dtype=torch.int64)
    uniq = sorted(set(texts))
    emb = encoder.encode_text(uniq)
    pos = {t: i for i, t in enumerate(uniq)}
    return F.normalize(emb[[pos[t] for t in texts]].float(), dim=-1), labels, texts


def train_text_classifier(encoder, classes: Sequence[str], *, templates="simple",
                          descriptions: Mapping[str, Sequence[str]] | None = None,
                          steps: int = 400, lr: float = 5e-4, weight_decay: float = 0.01,
                          noise_std: float = 0.1, eps: float = 0.1, seed: int = 0,
                          out=None, log: Callable[[str], None] | None = None,
                          quiet: bool = True) -> tuple[torch.Tensor, dict]:
    """Stage 1: returns the trained (C, D) weight and a summary."""
    emb, labels, texts = text_dataset(encoder, classes, templates, descriptions)
    module = TextClassifierModule(emb, labels, len(classes), noise_std, eps, seed)
    task = TextClassifierTask(module, steps, lr, weight_decay)
    cfg = TrainConfig(epochs=1, batch_size=1, seed=seed, ddp=False, select="last",
                      checkpoint_every=100, quiet=quiet, amp="off")
    settings = {"lr": lr, "wd": weight_decay, "noise": noise_std, "eps": eps,
                "texts": tensor_digest(emb, labels)}
    res = fit(task, cfg, out, log=log, settings=settings)
    with torch.no_grad():
        acc = float((module.classifier(emb).argmax(1) == labels).float().mean())
    return module.classifier.weight.detach().clone(), {
        "texts": len(texts), "steps": steps, "text_accuracy_clean": acc,
        "seconds": res.seconds}


# --------------------------------------------------------------------------- stage 2
class LaFTerModule(nn.Module):
    """Teacher ``argmax W_pl · normalize(tower(x_weak))`` (shared trainable norms, no
    prompts) -> student ``W · g(x_strong)`` with label-smoothed CE."""

    def __init__(self, student: Student, weight: torch.Tensor, teacher_weight: torch.Tensor,
                 eps: float = 0.1, cached: bool = False) -> None:
        super().__init__()
        self.student = student
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                    device=weight.device)
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
        self.register_buffer("teacher_weight", teacher_weight.detach().clone().float())
        self.eps, self.cached = eps, cached

    @torch.no_grad()
    def teacher(self, weak: torch.Tensor) -> torch.Tensor:
        t = self.student.teacher_features(weak, cached=self.cached)
        return (t @ self.teacher_weight.T).argmax(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.student.features(x, cached=self.cached).float())

    @torch.no_grad()
    def predict_both(self, weak: torch.Tensor) -> torch.Tensor:
        """(B, 2) int64: ``[argmax logits(weak), teacher(weak)]``; one pass of the tower when
        the teacher is the student's own normalised feature (the surrogate)."""
        f, t = self.student.features_and_teacher(weak, cached=self.cached)
        return torch.stack([self.classifier(f.float()).argmax(1),
                            (t @ self.teacher_weight.T).argmax(1)], 1)

    def forward(self, batch):
        yhat = self.teacher(batch["weak"])
        logits = self.logits(batch["strong"])
        loss = F.cross_entropy(logits.float(), yhat, label_smoothing=self.eps)
        return loss, {"train_agreement": float((logits.argmax(1) == yhat).float().mean())}


class ViewTuningTask(TrainTask):
    """Shared plumbing of the prompt/norm tuning stages (LaFTer stage 2, NoLA step 3):
    a train dataset of views, a held-out dataset for the label-free criterion, and
    AdamW without decay on biases and norms. Subclasses implement ``evaluate``."""

    criterion = "heldout_agreement"

    def __init__(self, module: nn.Module, data: TuneData, train_ds, heldout_ds, lr: float,
                 wd: float, eval_batch_size: int, workers: int, device: torch.device) -> None:
        self.module, self.data = module, data
        self.train_ds, self.heldout_ds = train_ds, heldout_ds
        self.lr, self.wd = lr, wd
        self.eval_batch_size, self.workers = eval_batch_size, workers
        self.device = device

    def make_optimizer(self):
        return adamw_no_bias_decay(list(self.module.named_parameters()), self.lr, self.wd)


class LaFTerTask(ViewTuningTask):
    """LaFTer stage 2. Selection (:mod:`nolabels.methods.selection`): the student's
    prediction on a seeded strong view of each held-out image against the label of the
    **frozen epoch-0 teacher** (weak view), minus the class-balance penalty.

    ``heldout_ds`` must give ``"weak"`` and ``"strong"`` views (:func:`image_datasets`
    with ``heldout_strong=True``).

    Attributes:
        reference: (M,) int64 frozen epoch-0 teacher labels of the held-out images,
            set by :meth:`prepare` (the teacher shares the trainable norms, so it is
            evaluated once, before training, and never again).
    """

    name = "lafter"
    criterion = "heldout_balanced_agreement"

    def __init__(self, module: LaFTerModule, data: TuneData, train_ds, heldout_ds,
                 lr: float, wd: float, eval_batch_size: int, workers: int) -> None:
        super().__init__(module, data, train_ds, heldout_ds, lr, wd, eval_batch_size, workers,
                         module.teacher_weight.device)
        self.reference: torch.Tensor | None = None

    def _map(self, fn) -> torch.Tensor:
        return map_rows(fn, self.heldout_ds, range(len(self.data.heldout)),
                        batch_size=self.eval_batch_size, workers=self.workers, device=self.device)

    @torch.no_grad()
    def prepare(self) -> None:
        """Freeze the epoch-0 teacher: its labels of the held-out weak views, computed now
        (the module is in its initial state), equal those of a frozen copy of it."""
        if self.data.heldout.numel() == 0:
            self.reference = torch.empty(0, dtype=torch.int64)
            return
        was = self.module.training
        self.module.eval()
        self.reference = self._map(lambda b: self.module.teacher(b["weak"])).long()
        self.module.train(was)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        held = self.data.heldout
        if held.numel() == 0:
            return {}
        if self.reference is None:
            raise RuntimeError("LaFTerTask.evaluate before prepare(): no frozen teacher")
        m = self.module

        def preds(b):  # [student weak, co-adapting teacher weak, student strong]
            return torch.cat([m.predict_both(b["weak"]),
                              m.logits(b["strong"]).argmax(1, keepdim=True)], 1)

        got = self._map(preds)
        student, teacher, strong = got[:, 0], got[:, 1], got[:, 2]
        ref = self.reference.cpu()
        out = balanced_agreement(strong, ref, int(m.teacher_weight.shape[0]))
        out["heldout_agreement_weak"] = agreement(student, ref)
        out["heldout_agreement_coadapting"] = agreement(student, teacher)  # reported only
        acc = self.data.oracle.report(held, student)
        if acc is not None:
            out["oracle_heldout_accuracy"] = acc
            out["oracle_heldout_teacher_accuracy"] = self.data.oracle.report(held, teacher)
            out["oracle_heldout_frozen_teacher_accuracy"] = self.data.oracle.report(held, ref)
        return out


def tuning_student(encoder, cfg, prefix: Mapping | None, say: Callable[[str], None],
                   method: str) -> tuple[Student, bool]:
    """The student LaFTer/NoLA tune (from ``cfg``'s prompt/norm settings) and whether it
    trains on cached frozen-prefix features (``prefix`` given; needs a cacheable student)."""
    student = make_student(encoder, num_prompts=cfg.num_prompts, prompt_mode=cfg.prompt_mode,
                           surrogate_norms=cfg.surrogate_norms, seed=cfg.seed)
    say(f"{method}: {student.describe()}")
    cached = prefix is not None
    if cached:
        if not student.cacheable:
            raise InputError("cached prefix features need a student with a frozen prefix "
                             "(surrogate with surrogate_norms='last')")
        say(f"{method}: training on cached frozen-prefix features "
            f"({sum(k.startswith('strong') for k in prefix)} cached strong views per image "
            "instead of a fresh augmentation each epoch)")
    return student, cached


def tuned_model(method: str, student: Student, classifier: nn.Linear) -> dict:
    """``model.safetensors`` content of a tuned student with a linear head (see methods.common)."""
    return {
        "method": method,
        "student": {k: v.detach().cpu() for k, v in student.named_trainable_parameters()},
        "student_config": student.config(),
        "head": {"weight": classifier.weight.detach().cpu(), "scale": 1.0, "normalize": False},
    }


def image_datasets(student: Student, encoder, data: TuneData, *, strong_aug: str, seed: int,
                   prefix: dict | None, need_weak: bool = True,
                   heldout_strong: bool = False) -> tuple:
    """(train dataset with the strong view (and the weak one if ``need_weak``), held-out
    dataset with the weak view, and a seeded strong view if ``heldout_strong``; the
    evaluation reads key epoch 0, so each held-out image has one fixed strong view)."""
    if prefix is not None:
        strong = [prefix[k] for k in sorted(prefix) if k.startswith("strong")]
        tr = data.train.numpy()
        he = data.heldout.numpy()
        return (CachedViews(_Rows(prefix["weak"], tr), [_Rows(s, tr) for s in strong], seed,
                            need_weak=need_weak),
                CachedViews(_Rows(prefix["weak"], he),
                            [_Rows(s, he) for s in strong] if heldout_strong else [], seed))
    from nolabels.methods.students import image_stats

    size, mean, std = image_stats(encoder)
    views = {"strong": strong_transform(strong_aug, size, mean, std)}
    if need_weak:
        views = {"weak": encoder.transform, **views}
    items = [data.items[i] for i in data.train.tolist()]
    held = [data.items[i] for i in data.heldout.tolist()]
    held_views = {"weak": encoder.transform}
    if heldout_strong:
        held_views["strong"] = views["strong"]
    return (ImageViews(data.source, items, views, seed),
            ImageViews(data.source, held, held_views, seed))


class _Rows:
    """Row subset of an array without copying it. A memory-mapped ``.npy`` travels to
    DataLoader workers by file name (pickling a memmap would copy all of it)."""

    def __init__(self, arr, rows) -> None:
        self.arr, self.rows = arr, list(map(int, rows))

    def __getstate__(self):
        import numpy as np

        arr = self.arr
        if isinstance(arr, np.memmap) and arr.filename is not None:
            arr = ("npy", str(arr.filename))
        return {"arr": arr, "rows": self.rows}

    def __setstate__(self, d):
        import numpy as np

        arr = d["arr"]
        if isinstance(arr, tuple) and arr[0] == "npy":
            arr = np.load(arr[1], mmap_mode="r", allow_pickle=False)
        self.arr, self.rows = arr, d["rows"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.arr[self.rows[i]]


def tune(encoder, data: TuneData, classes: Sequence[str], out: str | os.PathLike, *,
         descriptions: Mapping[str, Sequence[str]] | None = None,
         config: LaFTerConfig | None = None, epochs: int | None = None,
         prefix: dict | None = None, log: Callable[[str], None] = print,
         quiet: bool = False) -> dict:
    """Run LaFTer on ``data`` and write the run directory ``out``.

    Args:
        encoder: a CLIP-like :class:`~nolabels.models.Encoder` (open_clip ViT, or the
            surrogate: then its BatchNorm affines are tuned instead of prompts).
        data: :func:`nolabels.methods.common.load_tune_data` output.
        classes: C class names.
        descriptions: ``{class: [sentences]}`` for the text classifier.
        config: :class:`LaFTerConfig`.
        prefix: cached frozen-prefix views (``{"weak", "strong0", ...}``, rows = data
            rows) for a cacheable student (surrogate with ``surrogate_norms="last"``).
    Returns:
        the summary dict (also in ``out/summary.json``).
    """
    cfg = config or LaFTerConfig()
    if epochs is not None:
        cfg.epochs = epochs
    t0 = time.perf_counter()
    say = (lambda m: None) if quiet else log
    if getattr(encoder, "not_clip", None):
        say(f"note: {encoder.not_clip}")
    W, text_summary = train_text_classifier(
        encoder, classes, templates=cfg.templates, descriptions=descriptions,
        steps=cfg.text_steps, lr=cfg.text_lr, weight_decay=cfg.text_weight_decay,
        noise_std=cfg.text_noise_std, eps=cfg.label_smoothing, seed=cfg.seed, out=out, log=say)
    say(f"lafter: text classifier on {text_summary['texts']} texts, {cfg.text_steps} steps "
        f"(clean-text accuracy {text_summary['text_accuracy_clean']:.3f})")
    student, cached = tuning_student(encoder, cfg, prefix, say, "lafter")
    W = W.to(encoder.device)
    module = LaFTerModule(student, W, copy.deepcopy(W), cfg.label_smoothing, cached=cached)
    train_ds, held_ds = image_datasets(student, encoder, data, strong_aug=cfg.strong_aug,
                                       seed=cfg.seed, prefix=prefix, heldout_strong=True)
    task = LaFTerTask(module, data, train_ds, held_ds, cfg.lr, cfg.weight_decay,
                      cfg.eval_batch_size, cfg.workers)
    tcfg = cfg.train_config(quiet)
    settings = {"lafter": asdict(cfg), "student": student.config(), "cached": cached,
                "rows": tensor_digest(data.train, data.heldout), "text_classifier": tensor_digest(W)}
    res = fit(task, tcfg, out, log=say, settings=settings)
    model = tuned_model("lafter", module.student, module.classifier)
    summary = {
        "method": "lafter", "classes": list(classes), "train_images": int(data.train.numel()),
        "heldout_images": int(data.heldout.numel()), "selection": CRITERIA["lafter"],
        "selected_epoch": res.selected_epoch, "criterion_value": res.best_score,
        "text_classifier": text_summary, "student": student.describe(),
        "cached_prefix": cached, "seconds": time.perf_counter() - t0,
        "history": res.history, "encoder": encoder_info(encoder),
    }
    config = {"method": "lafter", "encoder": encoder_info(encoder), "classes": list(classes),
              "hyper_parameters": asdict(cfg), "student": student.config(),
              "descriptions": None if descriptions is None else dict(descriptions),
              "store": data.store, "selection": CRITERIA["lafter"]}
    save_run(out, config, model, summary)
    return summary
