"""LatteCLIP (Cao et al., WACV 2025), methods.md §4.

Inputs: unlabeled images, class names, and LMM-written texts in JSONL files:

* image captions, one line per image: ``{"image": PATH, "caption": TEXT}``;
* group captions (common attributes of a few images of one zero-shot pseudo-class):
  ``{"class": NAME, "caption": TEXT}``, or tied to an image
  ``{"image": PATH, "group_caption": TEXT}`` (the authors' layout; then the pool of
  class c is the group captions of the images whose zero-shot label is c).

PATH matches the store's path, its absolute path, or its path relative to the
image root. :func:`generate_captions` writes both kinds with any OpenAI-compatible
vision chat endpoint (``POST {base_url}/chat/completions``; e.g. vLLM or
llama.cpp serving LLaVA), resumably.

Training (everything in the CLIP model trains, as the authors' code; prototypes
``P`` (C, D) start at ``normalize(text(template(c)))``):

1. ``f = normalize(image(x))``; fine-tuned pseudo-label ``ŷ_ft = argmax f·Pnᵀ``;
   zero-shot pseudo-label ``ŷ_zs`` (fixed, from the store).
2. With the *current* text tower: ``e_cls(ŷ_ft)``, ``e_cls(ŷ_zs)`` (the class
   template), ``e_img`` (the image's caption), ``e_grp`` (a group caption of the
   image's zero-shot class, re-drawn every time the image is loaded).
3. Confidence weight of a text (no gradient): ``w(e) = s_(1) − s_(2) + 1e−6`` with
   ``s = e·P_epochᵀ`` (``P_epoch``: the prototypes at the start of the epoch).
4. ``t_ft = (w_cls,ft e_cls,ft + w_img e_img + w_grp e_grp) / (w_cls,ft + w_img + w_grp)``
   and ``t_zs`` likewise with ``e_cls,zs``.
5. Targets ``z = Pn[ŷ] + α (t − Pn[ŷ])`` (α = 0.01), not re-normalised.
6. ``L = CLIP(f, z_ft) + CLIP(f, z_zs)``, ``CLIP(a, b) = ½[CE(s a bᵀ) + CE(s b aᵀ)]``
   over the batch, ``s = exp(logit_scale) ≤ 100``.
7. After backward, for every class c in the batch:
   ``P_c ← normalize(mean({z_ft,i : ŷ_ft,i = c} ∪ {z_zs,i : ŷ_zs,i = c}))``
   (one scatter-add; summed over ranks under torchrun).
8. AdamW (betas 0.9/0.98, eps 1e-6, wd 0.2 on ≥2-D weights, 0 on gains, biases and
   the logit scale), linear warmup then cosine, per step.

Inference: ``argmax 100 · normalize(image(x)) · normalize(P)ᵀ``.

**The w_cls mixing bug.** The authors' code builds ``t_zs`` with ``w_cls,ft`` in the
numerator but ``w_cls,zs`` in the denominator (methods.md §4.4 step 6), so ``t_zs``
is not a convex combination when the two class texts differ (it can even shrink or
overweight the zero-shot class text). We **fix** it by default (``w_cls,zs`` in both,
a proper weighted mean, the stated intent of the "dynamic feature mixer");
``reproduce_wcls_bug=True`` restores the code's formula for comparisons.

**The w_cls broadcast.** The same lines of ``train.py`` (around 476 and 481) multiply
the (B,) class-text weight by the (B, D) class-text features without ``unsqueeze(1)``,
so PyTorch scales feature *column* j by sample j's weight; it runs only because the
authors' batch B = 512 equals the embedding dim D (and partial batches are dropped).
We weight per sample (``w[:, None]``) by default; ``reproduce_wcls_broadcast=True``
(``--reproduce-wcls-broadcast``) applies the broadcast, which needs every batch (per
rank and micro-batch) to hold exactly D images and drops the last partial batch.
Together with ``reproduce_wcls_bug`` it is the authors' formula exactly. Every
difference from the authors' code: ``docs/differences.md``.

Deliberate differences: epochs are selected by an unlabeled criterion (agreement of
the prototype prediction on a seeded augmented view of each held-out image with its
fixed zero-shot pseudo-label; epoch 0, the zero-shot prototypes, is a candidate; see
:mod:`nolabels.methods.selection`; the code has no rule and evaluates on test every
epoch); the unused "distill" model and adapter are not
built; class-template texts are encoded once per unique class in a batch. On the
offline surrogate the text tower (MiniLM) stays frozen and the image tower's
BatchNorm affine parameters train (no ViT, no trainable text tower); the logs say so.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nolabels import dist, ops
from nolabels.errors import InputError
from nolabels.llm import DEFAULT_API_KEY_ENV, ChatClient
from nolabels.methods.common import RunSettings, TuneData, encoder_info, map_rows, save_run
from nolabels.methods.selection import CRITERIA, agreement
from nolabels.methods.students import ConSEStudent, ImageViews, image_stats, is_vit_encoder
from nolabels.methods.trainer import TrainTask, fit, sample_seed, tensor_digest

DEFAULT_TEMPLATE = "a photo of a {}."
IMAGE_PROMPT = "Describe the {noun} in the photo concisely, less than 20 words."
GROUP_PROMPT = "Describe the common visual attributes of the {noun} in all the photos concisely, less than 20 words."


@dataclass
class LatteCLIPConfig(RunSettings):
    """LatteCLIP's hyper-parameters. ``lr`` 1e-7 is the README example (the paper's
    value was not found); the template, epochs and warm-up (and Caltech101's weight decay)
    vary per dataset: ``--dataset NAME`` applies the authors' values
    (:mod:`nolabels.methods.presets`, from their ``scripts/unsupervised/*.sh`` and
    ``src/training/abo.py``); run settings in :class:`RunSettings`."""

    template: str = DEFAULT_TEMPLATE
    alpha: float = 0.01
    warmup_steps: int = 10
    lr: float = 1e-7
    weight_decay: float = 0.2
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    use_image_caption: float = 1.0
    use_group_caption: float = 1.0
    use_template_caption: float = 1.0
    use_finetune_pseudolabel: float = 1.0
    use_zeroshot_pseudolabel: float = 1.0
    reproduce_wcls_bug: bool = False
    reproduce_wcls_broadcast: bool = False
    surrogate_norms: str = "all"


# --------------------------------------------------------------------------- pieces
def text_weight(e: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Confidence of each text embedding: top-1 minus top-2 of ``e · Pᵀ``, plus 1e-6."""
    s = e.float() @ prototypes.float().T
    top = s.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) + 1e-6


def mix_texts(w_cls: torch.Tensor, e_cls: torch.Tensor, w_img: torch.Tensor, e_img: torch.Tensor,
              w_grp: torch.Tensor, e_grp: torch.Tensor,
              w_cls_numerator: torch.Tensor | None = None,
              broadcast_cls: bool = False) -> torch.Tensor:
    """Confidence-weighted mean of the class / image / group texts (per row).

    Args:
        w_cls, w_img, w_grp: (B,) float32 weights.
        e_cls, e_img, e_grp: (B, D) text embeddings.
        w_cls_numerator: replaces ``w_cls`` in the numerator only (the authors' bug).
        broadcast_cls: the authors' ``train.py``: the (B,) class weight multiplies the
            (B, D) class texts without ``unsqueeze``, i.e. scales column j by weight j
            (needs B == D; ``docs/differences.md``).
    Returns:
        (B, D) mixed text features (not re-normalised).
    Raises:
        InputError: ``broadcast_cls`` with B != D.
    """
    wn = w_cls if w_cls_numerator is None else w_cls_numerator
    if broadcast_cls:
        if wn.shape[0] != e_cls.shape[1]:
            raise InputError(
                f"--reproduce-wcls-broadcast: a batch of {wn.shape[0]} images, but the "
                f"authors' (B,) x (B, D) broadcast runs only when the batch equals the "
                f"embedding dim D = {e_cls.shape[1]} (set --batch-size to D times the ranks "
                f"and --grad-accum, and use at least D training images)")
        cls_term = wn * e_cls  # (B,) broadcast along D, as the authors' code does
    else:
        cls_term = wn[:, None] * e_cls
    num = cls_term + w_img[:, None] * e_img + w_grp[:, None] * e_grp
    return num / (w_cls + w_img + w_grp)[:, None]


def prototype_targets(prototypes: torch.Tensor, labels: torch.Tensor, mixed: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """``z = P[y] + alpha (t − P[y])`` (not re-normalised)."""
    p = prototypes[labels]
    return p + alpha * (mixed - p)


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``P_c ← normalize(mean{z_i : y_i = c})`` for every class present (in place; summed
    over ranks when distributed). Returns ``prototypes``."""
    C = prototypes.shape[0]
    sums = torch.zeros(C, z.shape[1], dtype=torch.float32, device=z.device)
    sums.index_add_(0, labels, z.float())
    counts = torch.bincount(labels, minlength=C).to(torch.float32)
    if dist.is_distributed():
        both = torch.cat([sums, counts[:, None]], 1)
        both = dist.all_gather_variable(both[None].cpu()).sum(0).to(z.device)
        sums, counts = both[:, :-1], both[:, -1]
    m = counts > 0
    prototypes[m] = F.normalize(sums[m] / counts[m, None], dim=-1).to(prototypes.dtype)
    return prototypes


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: ``½[CE(s a bᵀ, arange) + CE(s b aᵀ, arange)]``."""
    logits = scale * a.float() @ b.float().T
    y = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


# --------------------------------------------------------------------------- captions
def _path_keys(path: str, root: str | None) -> list[str]:
    keys = [path, os.path.normpath(os.path.abspath(path))]
    if root and "::" not in path:
        try:
            keys.append(os.path.normpath(os.path.relpath(path, root)))
        except ValueError:
            pass
    return keys


@dataclass
class Captions:
    """Captions keyed by image path, and group captions (by class name, or by image)."""

    image: dict[str, str]
    group_by_class: dict[str, list[str]]
    group_by_image: dict[str, str]

    @property
    def empty(self) -> bool:
        return not (self.image or self.group_by_class or self.group_by_image)


def read_captions(files: Sequence[str | os.PathLike]) -> Captions:
    """Read caption JSONL files (see the module docstring); later lines win.

    Raises:
        InputError: a line that is not a JSON object of one of the three kinds, or a file
            that is not UTF-8; the message names the file and line (``FILE:LINE[:COL]``).
    """
    from nolabels.methods.zeroshot import text_lines

    cap = Captions({}, {}, {})
    for f in files:
        for ln, line in text_lines(f):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{f}:{ln}:{e.colno}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise InputError(f"{f}:{ln}: expected a JSON object")
            text = d.get("caption")
            if "class" in d and text is not None:
                cap.group_by_class.setdefault(str(d["class"]), []).append(str(text))
            elif "image" in d and "group_caption" in d:
                cap.group_by_image[str(d["image"])] = str(d["group_caption"])
                if text is not None:
                    cap.image[str(d["image"])] = str(text)
            elif "image" in d and text is not None:
                cap.image[str(d["image"])] = str(text)
            else:
                raise InputError(f"{f}:{ln}: expected {{'image', 'caption'}}, "
                                 "{'class', 'caption'} or {'image', 'group_caption'}")
    return cap


def first_line(text: str) -> str:
    """The first non-empty line of an LMM answer (as the authors read caption files)."""
    for ln in str(text).splitlines():
        if ln.strip():
            return ln.strip()
    return ""


# --------------------------------------------------------------------------- generator
class VisionChatClient:
    """The captioner: an OpenAI-compatible vision chat endpoint.

    ``describe(images, prompt)`` sends one user message with the prompt and the
    images (as base64 JPEG data URLs) to ``{base_url}/chat/completions`` and returns
    the first line of the answer. Greedy (temperature 0), ``max_tokens`` 77. HTTP,
    retries (``retries`` after the first attempt; ``Retry-After`` honoured) and the key
    (from the environment variable ``api_key_env`` only, default ``OPENAI_API_KEY``):
    :class:`nolabels.llm.ChatClient`, which raises :class:`nolabels.llm.LLMError`.
    """

    def __init__(self, base_url: str, model: str, *,
                 api_key_env: str | None = DEFAULT_API_KEY_ENV, max_tokens: int = 77,
                 temperature: float = 0.0, timeout: float = 120.0, retries: int = 2,
                 backoff: float = 1.0, sleep: Callable[[float], None] | None = None) -> None:
        self.client = ChatClient(base_url, model, api_key_env=api_key_env,
                                 max_attempts=retries + 1, backoff=backoff, timeout=timeout,
                                 sleep=sleep)
        self.url, self.model = self.client.url, model
        self.max_tokens, self.temperature = max_tokens, temperature

    @staticmethod
    def data_url(img) -> str:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=90)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    def describe(self, images: Sequence[Any], prompt: str) -> str:
        content: list[dict] = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": self.data_url(im)}} for im in images]
        return first_line(self.client.chat(content, temperature=self.temperature,
                                           max_tokens=self.max_tokens))


def group_grid(images: Sequence[Any], size: int = 672, gap: int = 20):
    """A 2×2 grid on black (``size``² px, ``gap`` px gaps), each image resized with its
    aspect ratio kept (Lanczos) and centred in its cell (the authors' group prompt image)."""
    from PIL import Image

    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    cell = (size - 3 * gap) // 2
    for k, im in enumerate(list(images)[:4]):
        im = im.convert("RGB")
        s = min(cell / im.width, cell / im.height)
        w, h = max(1, round(im.width * s)), max(1, round(im.height * s))
        im = im.resize((w, h), Image.LANCZOS)
        r, c = divmod(k, 2)
        x0 = gap + c * (cell + gap) + (cell - w) // 2
        y0 = gap + r * (cell + gap) + (cell - h) // 2
        canvas.paste(im, (x0, y0))
    return canvas


def generate_captions(source, items: Sequence[int], paths: Sequence[str],
                      zs_labels: Sequence[int], classes: Sequence[str], out: str | os.PathLike,
                      client: VisionChatClient, *, noun: str = "object",
                      group_noun: str = "objects", image_prompt: str = IMAGE_PROMPT,
                      group_prompt: str = GROUP_PROMPT, groups_per_class: int = 8,
                      group_size: int = 4, seed: int = 0,
                      log: Callable[[str], None] = lambda _m: None) -> Path:
    """Caption every image and ``groups_per_class`` groups per zero-shot class into ``out``.

    Resumable: lines already in ``out`` are kept and not asked again. Group members
    are drawn (with replacement if the class is small) from the images whose
    zero-shot label is the class, as the authors' ``*_compare.py``.
    """
    from nolabels.data.transforms import decode_image

    out = Path(out)
    have_img: set[str] = set()
    have_grp: dict[str, int] = {}
    if out.is_file():
        c = read_captions([out])
        have_img = set(c.image)
        have_grp = {k: len(v) for k, v in c.group_by_class.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    n_new = 0
    with open(out, "a", encoding="utf-8") as fh:
        for item, path in zip(items, paths):
            if path in have_img:
                continue
            img = decode_image(source.read_bytes(item))
            text = client.describe([img], image_prompt.format(noun=noun))
            fh.write(json.dumps({"image": path, "caption": text}) + "\n")
            fh.flush()
            n_new += 1
        rng = random.Random(sample_seed(seed, 5))
        by_class: dict[int, list[int]] = {}
        for j, y in enumerate(zs_labels):
            by_class.setdefault(int(y), []).append(j)
        for c, name in enumerate(classes):
            members = by_class.get(c, [])
            if not members:
                continue
            for g in range(have_grp.get(name, 0), groups_per_class):
                rng_g = random.Random(sample_seed(seed, c, g))
                pick = (rng_g.sample(members, group_size) if len(members) >= group_size
                        else [rng_g.choice(members) for _ in range(group_size)])
                imgs = [decode_image(source.read_bytes(items[j])) for j in pick]
                text = client.describe([group_grid(imgs)], group_prompt.format(noun=group_noun))
                fh.write(json.dumps({"class": name, "caption": text,
                                     "images": [paths[j] for j in pick]}) + "\n")
                fh.flush()
                n_new += 1
        del rng
    log(f"latteclip: {n_new} new captions written to {out}")
    return out


# --------------------------------------------------------------------------- towers
class _OpenCLIPTowers(nn.Module):
    """The whole open_clip model trains; texts are token rows."""

    def __init__(self, encoder, text_table: list[str]) -> None:
        super().__init__()
        import copy

        self.model = copy.deepcopy(encoder.model).float().train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.register_buffer("tokens", encoder.tokenizer(text_table), persistent=False)
        self.kind = "openclip"

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokens[ids]).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)

    def visual_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.visual.state_dict().items()}

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"open_clip model, image and text towers and logit scale all trainable ({n:,} parameters)"


class _SurrogateTowers(nn.Module):
    """Surrogate: frozen MiniLM text embeddings (precomputed table); the image tower's
    BatchNorm affine parameters and a logit scale train."""

    def __init__(self, encoder, text_table: list[str], norms: str = "all") -> None:
        super().__init__()
        self.student = ConSEStudent(encoder, norms)
        self.register_buffer("table", encoder.encode_text(text_table).float(), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(encoder.logit_scale)))
        self.kind = "surrogate"

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.train(mode)
        return self

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.student(x).float(), dim=-1)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def visual_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.student.named_trainable_parameters()}

    def describe(self) -> str:
        return (self.student.describe().replace(" and the classifier instead", "")
                + "; the MiniLM text tower stays frozen (no trainable text tower), logit scale trains")


class LatteCLIPModule(nn.Module):
    """One LatteCLIP step (see the module docstring); prototypes are buffers."""

    def __init__(self, towers: nn.Module, prototypes: torch.Tensor, zs_labels: torch.Tensor,
                 cfg: LatteCLIPConfig) -> None:
        super().__init__()
        self.towers = towers
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.register_buffer("prototypes_epoch", self.prototypes.clone())
        self.register_buffer("zs", zs_labels.long())
        self.cfg = cfg
        self.last: tuple | None = None

    def forward(self, batch):
        cfg = self.cfg
        f = self.towers.image(batch["image"])
        Pn = F.normalize(self.prototypes, dim=-1)
        with torch.no_grad():
            y_ft = (f @ Pn.T).argmax(1)
        y_zs = self.zs[batch["index"]]
        # class-template texts: encode each class present once
        cls_ids, inv = torch.unique(torch.cat([y_ft, y_zs]), return_inverse=True)
        e_cls = self.towers.text(cls_ids)[inv]
        b = f.shape[0]
        e_cls_ft, e_cls_zs = e_cls[:b], e_cls[b:]
        has_cap, has_grp = batch["cap"] >= 0, batch["grp"] >= 0
        e_img = torch.zeros_like(f)
        e_grp = torch.zeros_like(f)
        if bool(has_cap.any()):
            e_img[has_cap] = self.towers.text(batch["cap"][has_cap])
        if bool(has_grp.any()):
            e_grp[has_grp] = self.towers.text(batch["grp"][has_grp])
        with torch.no_grad():
            P0 = self.prototypes_epoch
            w_ft = text_weight(e_cls_ft, P0) * cfg.use_template_caption
            w_zs = text_weight(e_cls_zs, P0) * cfg.use_template_caption
            w_img = text_weight(e_img, P0) * has_cap * cfg.use_image_caption
            w_grp = text_weight(e_grp, P0) * has_grp * cfg.use_group_caption
            # every text weight 0 (all switches off): the class text alone
            w_ft = torch.where(w_ft + w_img + w_grp > 0, w_ft, torch.ones_like(w_ft))
            w_zs = torch.where(w_zs + w_img + w_grp > 0, w_zs, torch.ones_like(w_zs))
        bc = cfg.reproduce_wcls_broadcast
        t_ft = mix_texts(w_ft, e_cls_ft, w_img, e_img, w_grp, e_grp, broadcast_cls=bc)
        t_zs = mix_texts(w_zs, e_cls_zs, w_img, e_img, w_grp, e_grp,
                         w_cls_numerator=w_ft if cfg.reproduce_wcls_bug else None,
                         broadcast_cls=bc)
        z_ft = prototype_targets(Pn, y_ft, t_ft, cfg.alpha)
        z_zs = prototype_targets(Pn, y_zs, t_zs, cfg.alpha)
        s = self.towers.scale()
        loss = (cfg.use_finetune_pseudolabel * clip_loss(f, z_ft, s)
                + cfg.use_zeroshot_pseudolabel * clip_loss(f, z_zs, s))
        self.last = (z_ft.detach(), y_ft, z_zs.detach(), y_zs)
        return loss, {"pseudo_label_agreement": float((y_ft == y_zs).float().mean()),
                      "logit_scale": float(s.detach())}


class _LatteDataset(torch.utils.data.Dataset):
    """Train views plus text ids: ``cap`` (the image's caption, -1 if none) and ``grp``
    (a group caption of its zero-shot class, re-drawn per epoch, -1 if none)."""

    def __init__(self, views: ImageViews, cap_ids: Sequence[int], zs: Sequence[int],
                 pools: Mapping[int, Sequence[int]], seed: int) -> None:
        self.views, self.cap_ids, self.zs, self.pools, self.seed = views, cap_ids, zs, pools, seed

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, key):
        epoch, pos = key if isinstance(key, tuple) else (0, key)
        out = self.views[(epoch, pos)]
        pool = self.pools.get(int(self.zs[pos]), ())
        grp = pool[sample_seed(self.seed, epoch, pos, 77) % len(pool)] if pool else -1
        out["cap"] = torch.tensor(int(self.cap_ids[pos]))
        out["grp"] = torch.tensor(int(grp))
        return out


class LatteCLIPTask(TrainTask):
    """LatteCLIP's training stage. Selection: the prototype prediction on the held-out
    ``"strong"`` view (LatteCLIP's training augmentation, one seeded draw per image)
    against ``heldout_zs``, the fixed zero-shot pseudo-labels (``heldout_ds`` gives
    ``"weak"`` and ``"strong"``; the weak-view agreement is logged as
    ``heldout_agreement_weak``)."""

    name = "latteclip"
    criterion = "heldout_agreement"
    couples_samples = True  # the image-text contrastive loss is over the whole batch

    def __init__(self, module: LatteCLIPModule, data: TuneData, train_ds, heldout_ds,
                 cfg: LatteCLIPConfig, device: torch.device,
                 heldout_zs: torch.Tensor | None = None) -> None:
        self.module, self.data, self.cfg = module, data, cfg
        self.train_ds, self.heldout_ds = train_ds, heldout_ds
        self.device = device
        self.heldout_zs = heldout_zs

    def make_optimizer(self):
        decay, no_decay = [], []
        for n, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            exclude = (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                       or "logit_scale" in n or "norm" in n)
            (no_decay if exclude else decay).append(p)
        groups = [g for g in ({"params": no_decay, "weight_decay": 0.0},
                              {"params": decay, "weight_decay": self.cfg.weight_decay})
                  if g["params"]]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                 eps=self.cfg.eps)

    def make_scheduler(self, opt, total_steps: int):
        warm = self.cfg.warmup_steps

        def f(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            rest = max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / rest)))

        return torch.optim.lr_scheduler.LambdaLR(opt, f)

    def before_epoch(self, epoch: int) -> None:
        self.module.prototypes_epoch.copy_(self.module.prototypes)

    def after_micro_batch(self, out) -> None:
        if out is None:
            return
        z_ft, y_ft, z_zs, y_zs = out
        w_ft, w_zs = self.cfg.use_finetune_pseudolabel, self.cfg.use_zeroshot_pseudolabel
        zs, ys = [], []
        if w_ft:
            zs.append(z_ft)
            ys.append(y_ft)
        if w_zs:
            zs.append(z_zs)
            ys.append(y_zs)
        if zs:
            update_prototypes(self.module.prototypes, torch.cat(zs), torch.cat(ys))
        self.module.last = None

    def extra_tensors(self) -> dict:
        return {"prototypes": self.module.prototypes}

    def load_extra_tensors(self, d: dict) -> None:
        self.module.prototypes.copy_(d["prototypes"].to(self.module.prototypes.device))

    def extra_state(self) -> dict:
        return {"prototypes_epoch": self.module.prototypes_epoch.detach().cpu().clone()}

    def load_extra_state(self, d: dict) -> None:
        if "prototypes_epoch" in d:
            self.module.prototypes_epoch.copy_(d["prototypes_epoch"].to(self.device))

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        held = self.data.heldout
        if held.numel() == 0:
            return {}
        if self.heldout_zs is None:
            raise InputError("LatteCLIPTask: no held-out zero-shot pseudo-labels (heldout_zs)")
        m = self.module
        Pn = F.normalize(m.prototypes, dim=-1)

        def preds(b):  # [weak view, augmented view] prototype predictions
            return torch.stack([(m.towers.image(b["weak"]) @ Pn.T).argmax(1),
                                (m.towers.image(b["strong"]) @ Pn.T).argmax(1)], 1)

        got = map_rows(preds, self.heldout_ds, range(len(held)),
                       batch_size=self.cfg.eval_batch_size, workers=self.cfg.workers,
                       device=self.device)
        zs = self.heldout_zs.cpu().long()
        out = {"heldout_agreement": agreement(got[:, 1], zs),
               "heldout_agreement_weak": agreement(got[:, 0], zs)}
        acc = self.data.oracle.report(held, got[:, 0])
        if acc is not None:
            out["oracle_heldout_accuracy"] = acc
        return out


def latte_transform(size: int, mean, std):
    """OpenCLIP's train augmentation as LatteCLIP uses it: RandomResizedCrop(scale
    (0.9, 1), bicubic), ColorJitter(0.5, 0.5, 0.5, 0.1) p 0.8, RandomGrayscale 0.2."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def single_template(template: str) -> str:
    """A template with ``{}``, or a named set holding exactly one (``simple``)."""
    if "{}" in template:
        return template
    from nolabels.methods.zeroshot import resolve_templates

    named = resolve_templates(template)
    if len(named) != 1:
        raise InputError(f"latteclip uses one template; {template!r} has {len(named)}")
    return named[0]


def zero_shot_labels(encoder, emb: torch.Tensor, classes: Sequence[str], template: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(class embeddings of the single template, top-1 zero-shot labels of ``emb``)."""
    from nolabels.methods.zeroshot import class_embeddings

    cls = class_embeddings(encoder, classes, templates=[single_template(template)])
    pl = ops.pseudo_label(emb.to(cls.device), cls, logit_scale=encoder.logit_scale, topk=1)
    return cls, pl.labels.cpu()


def tune(encoder, data: TuneData, classes: Sequence[str], out: str | os.PathLike, *,
         captions: Captions | None = None, config: LatteCLIPConfig | None = None,
         epochs: int | None = None, log: Callable[[str], None] = print,
         quiet: bool = False) -> dict:
    """Run LatteCLIP on ``data`` with ``captions`` and write the run directory ``out``."""
    from nolabels.methods.zeroshot import norm_name

    cfg = config or LatteCLIPConfig()
    if epochs is not None:
        cfg.epochs = epochs
    cfg.template = single_template(cfg.template)
    if len(classes) < 2:
        raise InputError("latteclip needs at least 2 classes (text weights are top-1 − top-2 margins)")
    t0 = time.perf_counter()
    say = (lambda m: None) if quiet else log
    if getattr(encoder, "not_clip", None):
        say(f"note: {encoder.not_clip}")
    captions = captions or Captions({}, {}, {})
    dev = encoder.device
    C = len(classes)
    cls_emb, zs = zero_shot_labels(encoder, data.emb, classes, cfg.template)

    # the text table: class templates first (id = class), then captions
    table = [cfg.template.format(c.replace("_", " ")) for c in classes]
    ids: dict[str, int] = {}

    def tid(text: str) -> int:
        if text not in ids:
            ids[text] = len(table)
            table.append(text)
        return ids[text]

    root = getattr(data.source, "root", None)
    cap_id = []
    for p in data.paths:
        t = next((captions.image[k] for k in _path_keys(p, root) if k in captions.image), None)
        cap_id.append(tid(first_line(t)) if t is not None and first_line(t) else -1)
    by_norm = {norm_name(c): i for i, c in enumerate(classes)}
    pools: dict[int, list[int]] = {}
    for name, texts in captions.group_by_class.items():
        c = by_norm.get(norm_name(name))
        if c is None:
            raise InputError(f"group captions for {name!r}, which is not a class")
        pools.setdefault(c, []).extend(tid(first_line(t)) for t in texts if first_line(t))
    if captions.group_by_image:
        train_set = set(data.train.tolist())
        for j, p in enumerate(data.paths):
            t = next((captions.group_by_image[k] for k in _path_keys(p, root)
                      if k in captions.group_by_image), None)
            if t is not None and first_line(t) and j in train_set:
                pools.setdefault(int(zs[j]), []).append(tid(first_line(t)))
    n_cap = sum(i >= 0 for i in cap_id)
    say(f"latteclip: {n_cap} of {data.n} images have a caption; group captions for "
        f"{len(pools)} of {C} classes ({sum(len(v) for v in pools.values())} in all)")
    if n_cap == 0 and not pools:
        say("latteclip: warning: no captions: only the class-template texts are used")

    if is_vit_encoder(encoder):
        towers: nn.Module = _OpenCLIPTowers(encoder, table)
    elif hasattr(encoder, "image_model"):
        towers = _SurrogateTowers(encoder, table, cfg.surrogate_norms)
    else:
        raise InputError(f"{encoder.model_id}: latteclip needs an open_clip CLIP or the surrogate")
    towers.to(dev)
    say(f"latteclip: {towers.describe()}")
    train_rows = data.train
    module = LatteCLIPModule(towers, cls_emb.to(dev), zs[train_rows].to(dev), cfg)
    size, mean, std = image_stats(encoder)
    items = [data.items[i] for i in train_rows.tolist()]
    views = ImageViews(data.source, items, {"image": latte_transform(size, mean, std)}, cfg.seed)
    train_ds = _LatteDataset(views, [cap_id[i] for i in train_rows.tolist()],
                             zs[train_rows].tolist(), pools, cfg.seed)
    held_ds = ImageViews(data.source, [data.items[i] for i in data.heldout.tolist()],
                         {"weak": encoder.transform,
                          "strong": latte_transform(size, mean, std)}, cfg.seed)
    task = LatteCLIPTask(module, data, train_ds, held_ds, cfg, dev, heldout_zs=zs[data.heldout])
    tcfg = cfg.train_config(quiet)
    if cfg.reproduce_wcls_broadcast:  # the authors' B = D broadcast: full batches only
        D = int(cls_emb.shape[1])
        micro = cfg.batch_size / (dist.get_world_size() * cfg.grad_accum)
        if micro != D or int(train_rows.numel()) < cfg.batch_size:
            raise InputError(
                f"--reproduce-wcls-broadcast needs batches of exactly D = {D} images per rank "
                f"and micro-batch (here --batch-size {cfg.batch_size} over "
                f"{dist.get_world_size()} rank(s) x --grad-accum {cfg.grad_accum}, "
                f"{int(train_rows.numel())} training images)")
        tcfg.drop_last = True
        tcfg.auto_micro_batch = False  # every forward must see exactly D images
        say(f"latteclip: the authors' (B,) x (B, D) class-weight broadcast, B = D = {D}; "
            "the last partial batch of each epoch is dropped, batches are not split")
    settings = {"latteclip": asdict(cfg), "rows": tensor_digest(data.train, data.heldout),
                "zs": tensor_digest(zs), "texts": len(table), "captions": n_cap,
                "text_ids": tensor_digest(torch.tensor(cap_id)),
                "pools": json.dumps(sorted((k, len(v)) for k, v in pools.items()))}
    res = fit(task, tcfg, out, log=say, settings=settings)
    P = F.normalize(module.prototypes.detach(), dim=-1).cpu()
    model = {"method": "latteclip", "towers": towers.kind,
             "visual": towers.visual_state(),
             "student_config": (towers.student.config() if towers.kind == "surrogate" else None),
             "head": {"weight": P, "scale": 100.0, "normalize": True}}
    zs_acc = data.oracle.report(data.train, zs[data.train])
    summary = {"method": "latteclip", "classes": list(classes),
               "train_images": int(train_rows.numel()), "heldout_images": int(data.heldout.numel()),
               "captions": n_cap, "group_caption_classes": len(pools),
               "reproduce_wcls_bug": cfg.reproduce_wcls_bug,
               "reproduce_wcls_broadcast": cfg.reproduce_wcls_broadcast,
               "selection": CRITERIA["latteclip"],
               "selected_epoch": res.selected_epoch, "criterion_value": res.best_score,
               "towers": towers.describe(), "seconds": time.perf_counter() - t0,
               "history": res.history, "encoder": encoder_info(encoder)}
    if zs_acc is not None:
        summary["oracle_zero_shot_train_accuracy"] = zs_acc
    config = {"method": "latteclip", "encoder": encoder_info(encoder), "classes": list(classes),
              "hyper_parameters": asdict(cfg), "store": data.store,
              "selection": CRITERIA["latteclip"]}
    save_run(out, config, model, summary)
    return summary
