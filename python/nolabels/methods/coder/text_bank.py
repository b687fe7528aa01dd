"""CODER's text bank: the rendered texts of every class and their embeddings, cached on
disk keyed by (model id, hash of the texts).

Follows methods.md §5.3 and YCaigogogo/CVPR24-CODER ``CODER/CODER.py`` / ``CODER/template.py``.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from nolabels.errors import CorruptFileError, InputError
from nolabels.methods.coder.knowledge import Knowledge
from nolabels.methods.coder.templates import (
    _ALIASES,
    _FEW_SHOT_GENERIC_ATT,
    TEMPLATES,
    template_set,
)


class TextEncoder(Protocol):
    def encode_text(self, texts: list[str]) -> torch.Tensor: ...


KIND_MEAN, KIND_MAX = 0, 1  # ops.coder_class_scores' text kinds
TEXT_TYPES = ("att", "ana", "name", "syno")
TEXT_CACHE_KIND = "nolabels.coder-text-cache"  # safe_io kind of the text-embedding cache


@dataclass
class TextBank:
    """CODER's text bank for C classes: M general texts and the one-vs-one texts.

    Attributes:
        class_names: the C class names, in label order.
        texts: the M general texts, ordered per class as [att, ana, name, syno]
            (methods.md §5.3; the ops do not need any order).
        text_class: (M,) int64 class of each text.
        text_type: the type of each text: "att", "ana", "name" or "syno".
        ovo_texts: one-vs-one texts; ``ovo_pair[j] = (c1, c2)``: "c1 vs c2, attribute of c1".
        ovo_pair: (P, 2) int64.
        emb / ovo_emb: (M, D) / (P, D) float32 L2-normalised, after :meth:`encode`.
        model_id: the encoder the embeddings came from.
    """

    class_names: list[str]
    texts: list[str]
    text_class: torch.Tensor
    text_type: list[str]
    ovo_texts: list[str] = field(default_factory=list)
    ovo_pair: torch.Tensor = field(default_factory=lambda: torch.empty(0, 2, dtype=torch.int64))
    emb: torch.Tensor | None = None
    ovo_emb: torch.Tensor | None = None
    model_id: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def text_kind(self) -> torch.Tensor:
        """(M,) int64: 1 for name/synonym texts (their max enters the mean), 0 otherwise."""
        return torch.tensor([KIND_MAX if t in ("name", "syno") else KIND_MEAN for t in self.text_type],
                            dtype=torch.int64)

    @classmethod
    def build(
        cls,
        class_names: Sequence[str],
        knowledge: Knowledge | None = None,
        *,
        templates: str | Mapping[str, Sequence[str]] | None = None,
        types: Iterable[str] = TEXT_TYPES,
        task: str = "zero-shot",
        ovo: bool = True,
        keep_underscores: bool = False,
        none_synonyms: bool = False,
        fused_dtd_ovo: bool = False,
    ) -> TextBank:
        """Render the texts of every class with the paper's templates.

        The last three arguments reproduce the authors' ``CODER.py`` / ``template.py``
        where the package renders differently (``docs/differences.md``).

        Args:
            class_names: C names. "_" is shown as a space in every text, and in the
                synonyms; the authors do so only in the class-name texts.
            knowledge: attributes/analogous/synonyms/ovo; None = names only.
            templates: a template-set name (see :data:`TEMPLATES`; aliases such as
                "food-101" work), a mapping like ``TEMPLATES["default"]``, or None for
                ``knowledge.dataset``'s set.
            types: which of "att", "ana", "name", "syno" to include (zero-shot: all;
                the authors' few-shot bank: name, att, ana).
            task: "zero-shot" or "few-shot" (few-shot uses the generic att/ana
                templates for Pets and DTD, as the authors do).
            ovo: render the one-vs-one texts.
            keep_underscores: as the authors, keep "_" in the class names of attribute,
                analogous and one-vs-one texts (class-name texts still show a space).
            none_synonyms: as the authors, render every synonym as "None" (their
                ``get_templates(dataset, 'syno', synonym)`` fills ``class_name``, and the
                template formats the unset ``syno``): one such text per synonym.
            fused_dtd_ovo: as the authors, fuse DTD's first two one-vs-one templates
                into one (their list misses a comma).
        """
        if task not in ("zero-shot", "few-shot"):
            raise InputError(f"TextBank.build: task must be 'zero-shot' or 'few-shot', got {task!r}")
        types = tuple(types)
        bad = set(types) - set(TEXT_TYPES)
        if bad:
            raise InputError(f"TextBank.build: unknown text types {sorted(bad)}; use {TEXT_TYPES}")
        if not class_names:
            raise InputError("TextBank.build: no classes")
        knowledge = knowledge or Knowledge()
        if isinstance(templates, Mapping):
            tset = {k: list(v) for k, v in templates.items()}
            set_name = "custom"
        else:
            set_name = templates or knowledge.dataset or "default"
            tset = template_set(set_name)
        canon = _ALIASES.get(str(set_name).lower(), str(set_name).lower())
        if task == "few-shot" and canon in _FEW_SHOT_GENERIC_ATT:
            tset = {**tset, "att": TEMPLATES["default"]["att"], "ana": TEMPLATES["default"]["ana"]}
        if fused_dtd_ovo and canon == "dtd":
            tset = {**tset, "ovo": [tset["ovo"][0] + tset["ovo"][1], *tset["ovo"][2:]]}
        names = [Knowledge._key(c) for c in class_names]
        # the name shown in attribute / analogous / one-vs-one texts
        shown = [c.strip() for c in class_names] if keep_underscores else names
        if len(set(names)) != len(names):
            raise InputError("TextBank.build: duplicate class names")
        texts, tcls, ttype = [], [], []
        for ci, c in enumerate(names):
            e = knowledge.entry(c)
            cs = shown[ci]
            syno = (["None"] * len(e["synonyms"]) if none_synonyms else
                    [Knowledge._key(s) for s in e["synonyms"] if Knowledge._key(s) != c])
            rendered = {
                "att": [t.format(c=cs, a=a) for a in e["attributes"] for t in tset["att"]],
                "ana": [t.format(c=cs, x=x) for x in e["analogous"] for t in tset["ana"]],
                "name": [t.format(c=c) for t in tset["name"]],
                "syno": [t.format(c=s) for s in syno for t in tset["name"]],
            }
            for ty in TEXT_TYPES:  # the paper's order per class: att, ana, name, syno
                if ty in types:
                    texts += rendered[ty]
                    tcls += [ci] * len(rendered[ty])
                    ttype += [ty] * len(rendered[ty])
        counts = torch.bincount(torch.tensor(tcls, dtype=torch.int64), minlength=len(names))
        if bool((counts == 0).any()):
            empty = [names[i] for i in (counts == 0).nonzero().flatten().tolist()[:5]]
            raise InputError(f"TextBank.build: classes {empty} have no texts (include 'name' in types)")
        ovo_texts, pairs = [], []
        if ovo:
            index = {c: i for i, c in enumerate(names)}
            for c1, inner in knowledge.ovo.items():
                for c2, attrs in inner.items():
                    if c1 not in index or c2 not in index or c1 == c2:
                        continue
                    for a in attrs:
                        for t in tset["ovo"]:
                            ovo_texts.append(t.format(c=shown[index[c1]], o=shown[index[c2]], a=a))
                            pairs.append((index[c1], index[c2]))
        return cls(
            class_names=names, texts=texts, text_class=torch.tensor(tcls, dtype=torch.int64),
            text_type=ttype, ovo_texts=ovo_texts,
            ovo_pair=torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2),
        )

    # ------------------------------------------------------------------ encoding
    def texts_hash(self) -> str:
        h = hashlib.sha256()
        for t in [*self.texts, "\x00ovo\x00", *self.ovo_texts]:
            h.update(t.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def cache_path(self, cache_dir: str | os.PathLike, model_id: str) -> Path:
        """``CACHE_DIR/coder-text-<model>-<key>.safetensors``, ``key`` a hash of the
        producing model id and :meth:`texts_hash` (the exact texts)."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:80]
        key = hashlib.sha256(f"{model_id}\x00{self.texts_hash()}".encode()).hexdigest()[:24]
        return Path(cache_dir) / f"coder-text-{safe}-{key}.safetensors"

    def load_cached(self, cache_dir: str | os.PathLike, model_id: str) -> bool:
        """Take the embeddings from the cache if the model ``model_id`` embedded exactly
        these texts before; True on a hit.

        A hit needs the stored producer id, text hash and texts to equal this bank's and
        ``model_id``, and the shapes to fit. Raises
        :class:`~nolabels.errors.CorruptFileError` (naming the file) if the cache file is
        not a nolabels text cache (nothing in it is executed).
        """
        from nolabels.data.safe_io import load_tree

        path = self.cache_path(cache_dir, model_id)
        if not path.is_file():
            return False
        try:
            blob = load_tree(path, kind=TEXT_CACHE_KIND)
        except CorruptFileError as e:
            raise CorruptFileError(path, f"{str(e)[len(e.path) + 2:]}; delete it to recompute "
                                         "the text embeddings") from None
        if not isinstance(blob, dict) or not {"producer", "texts_hash", "emb", "ovo_emb"} <= set(blob):
            raise CorruptFileError(path, "a text cache without producer / texts_hash / emb / ovo_emb")
        emb, ovo = blob["emb"], blob["ovo_emb"]
        if (blob["producer"] != model_id or blob["texts_hash"] != self.texts_hash()
                or blob.get("texts") != self.texts or blob.get("ovo_texts") != self.ovo_texts):
            return False
        if not (isinstance(emb, torch.Tensor) and isinstance(ovo, torch.Tensor) and emb.dim() == 2
                and emb.shape[0] == len(self.texts) and ovo.dim() == 2
                and ovo.shape == (len(self.ovo_texts), emb.shape[1])
                and emb.dtype == ovo.dtype == torch.float32):
            raise CorruptFileError(path, "text embeddings of the wrong shape or dtype")
        self.emb, self.ovo_emb, self.model_id = emb, ovo, model_id
        return True

    def encode(
        self,
        encoder: TextEncoder | None,
        *,
        model_id: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 256,
    ) -> TextBank:
        """Embed every text (general and one-vs-one), L2-normalised, float32, in batches.

        Identical strings are encoded once. With ``cache_dir`` the embeddings are read
        from / written to ``cache_path(cache_dir, model_id)`` (safetensors + JSON, atomic
        write); a cache hit needs no encoder. The cache is keyed by the model that
        embeds the texts: ``model_id`` defaults to ``encoder.model_id`` and must equal it
        when both are given (``model_id`` alone, without an encoder: a cache lookup).
        """
        from nolabels.data.safe_io import save_tree

        producer = getattr(encoder, "model_id", None) if encoder is not None else None
        if model_id is None:
            model_id = producer
        elif producer is not None and producer != model_id:
            raise InputError(
                f"TextBank.encode: model_id {model_id!r} is not the encoder's ({producer!r}); "
                "text embeddings are cached under the model that computes them")
        if cache_dir is not None and model_id is None:
            raise InputError("TextBank.encode: a cache needs a model_id")
        path = self.cache_path(cache_dir, model_id) if cache_dir is not None else None
        if path is not None and self.load_cached(cache_dir, model_id):
            return self
        if encoder is None:
            raise InputError(
                f"TextBank.encode: no cached embeddings for model {model_id!r} "
                f"({path}) and no encoder to compute them"
            )
        allt = [*self.texts, *self.ovo_texts]
        uniq = list(dict.fromkeys(allt))
        if batch_size < 1:
            raise InputError(f"TextBank.encode: batch_size must be >= 1, got {batch_size}")
        chunks = []
        with torch.no_grad():
            for s in range(0, len(uniq), batch_size):
                e = torch.as_tensor(encoder.encode_text(uniq[s : s + batch_size]))
                if e.dim() != 2 or e.shape[0] != len(uniq[s : s + batch_size]):
                    raise InputError(f"TextBank.encode: encode_text returned shape {tuple(e.shape)}")
                chunks.append(e.detach().float().cpu())
        table = F.normalize(torch.cat(chunks), dim=1, eps=1e-12)
        if not bool(torch.isfinite(table).all()):
            raise InputError("TextBank.encode: the encoder returned NaN/Inf embeddings")
        pos = {t: i for i, t in enumerate(uniq)}
        rows = torch.tensor([pos[t] for t in allt], dtype=torch.int64)
        emb = table[rows]
        self.emb, self.ovo_emb = emb[: len(self.texts)].contiguous(), emb[len(self.texts):].contiguous()
        self.model_id = model_id
        if path is not None:
            h = self.texts_hash()
            save_tree(path, {"producer": model_id, "texts_hash": h, "emb": self.emb,
                             "ovo_emb": self.ovo_emb, "texts": list(self.texts),
                             "ovo_texts": list(self.ovo_texts)},
                      kind=TEXT_CACHE_KIND, meta={"producer": model_id, "texts_hash": h})
        return self

    def _need_emb(self) -> None:
        if self.emb is None:
            raise InputError("TextBank: call encode() first")
