"""CODER / CODER* / few-shot CODER over image embeddings, and ATG knowledge generation
(the work behind ``nolabels coder`` and ``nolabels coder-knowledge``).

Image embeddings come from an embedding store directory (read shard by shard: memory is
one shard plus the text bank, whatever the store's size), any layout
:func:`nolabels.data.sources.open_embeddings` reads, or a ``.safetensors`` / ``.npy`` /
``.pt`` file (``.npy`` without pickle, ``.pt`` only with ``torch.load(weights_only=True)``).
Texts are encoded by ``model`` (a ``nolabels.models`` spec; default the store's) or
``encoder`` (``module:factory``) and cached in ``cache_dir``, keyed by the model that
embeds them and a hash of the texts.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nolabels.data.safe_io import (
    TREE_FORMAT,
    load_npy,
    load_safetensors,
    load_torch_file,
    load_tree,
)
from nolabels.errors import CorruptFileError, InputError, MissingDependencyError


# --------------------------------------------------------------------------- inputs
def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (a file that is not UTF-8 is an
    InputError naming the file and line)."""
    from nolabels.methods.zeroshot import text_lines

    return [ln.strip() for _, ln in text_lines(path) if ln.strip()]


@dataclass
class Embeddings:
    """Image embeddings read from a store or a file."""

    emb: torch.Tensor  # (N, D) float32
    paths: list[str]
    model_id: str | None = None  # the text-cache key
    spec: str | None = None  # a nolabels.models spec that can rebuild the encoder
    labels: list | None = None  # shot labels (ints or class names), if the source has them


def read_store_dir(path: Path) -> Embeddings:
    """An embedding store directory (``nolabels.data.store.EmbeddingStore``; failed images
    are skipped); a folder of bare ``emb_*.npy`` / ``meta_*.parquet`` shards without a
    store manifest (no ``format_version``): a minimal reader of the same layout."""
    manifest = {}
    if (path / "manifest.json").exists():
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(path / "manifest.json", f"not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise CorruptFileError(path / "manifest.json", "not a JSON object")
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    model_id = model.get("model_id") or manifest.get("model_id")
    spec = model.get("spec")
    if "format_version" in manifest:
        from nolabels.data.store import EmbeddingStore

        emb, meta = EmbeddingStore(path).load()
        labels = meta.get("label")
        labels = labels if labels and all(lab is not None for lab in labels) else None
        return Embeddings(torch.from_numpy(np.asarray(emb, dtype=np.float32)), list(meta["path"]),
                          model_id, spec, labels)
    embs = sorted(path.glob("emb_*.npy"))
    if not embs:
        raise InputError(f"{path}: no emb_*.npy shards (not an embedding store)")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("reading an embedding store needs pyarrow: pip install 'nolabels[data]'") from e
    arrays, paths = [], []
    for e in embs:
        arr = load_npy(e)
        meta = e.with_name(e.name.replace("emb_", "meta_").replace(".npy", ".parquet"))
        if not meta.exists():
            raise InputError(f"{path}: {e.name} has no {meta.name}")
        try:
            table = pq.read_table(meta).to_pydict()
        except Exception as err:  # noqa: BLE001 - pyarrow's errors vary by version
            raise CorruptFileError(meta, f"not a readable Parquet file ({type(err).__name__})") from None
        rows = table.get("row", list(range(len(table["path"]))))
        good = [(r, p) for r, p in zip(rows, table["path"]) if r is not None and r >= 0]
        good.sort()
        arrays.append(arr[[r for r, _ in good]])
        paths += [p for _, p in good]
    emb = torch.from_numpy(np.concatenate(arrays).astype(np.float32))
    return Embeddings(emb, paths, model_id, spec)


def _read_embedding_file(p: Path):
    """What a ``.safetensors`` / ``.npy`` / ``.pt`` embeddings file holds (a dict or an
    array), read without executing anything; CorruptFileError naming the file otherwise."""
    if p.suffix == ".npy":
        return load_npy(p)
    if p.suffix in (".pt", ".pth"):
        return load_torch_file(p)
    tensors, meta = load_safetensors(p)
    if meta.get("nolabels.format") == TREE_FORMAT:
        return load_tree(p)
    if len(tensors) == 1 and not ({"emb", "embeddings"} & set(tensors)):
        return next(iter(tensors.values()))
    obj: dict = dict(tensors)
    for key in ("model_id", "spec"):
        if key in meta:
            obj[key] = meta[key]
    for key in ("paths", "labels"):
        if key in meta and key not in obj:
            try:
                obj[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise CorruptFileError(p, f"metadata {key!r} is not a JSON list") from None
    return obj


def _as_matrix(p: Path, x) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"dtype {t.dtype}")
        return t.float()
    except (TypeError, ValueError, RuntimeError) as e:
        raise CorruptFileError(p, f"the embeddings are not a numeric array ({e})") from None


def _str_or_none(p: Path, key: str, v):
    if v is not None and not isinstance(v, str):
        raise CorruptFileError(p, f"{key!r} must be a string")
    return v


def read_embeddings(spec: str, paths_file: str | None = None) -> Embeddings:
    """Image embeddings from a store directory or a ``.safetensors`` / ``.npy`` / ``.pt`` file.

    A file holds an (N, D) array, or a dict with ``emb`` (or ``embeddings``) and optionally
    ``paths`` (N strings), ``labels`` (N ints or class names), ``model_id``, ``spec``. In a
    plain ``.safetensors`` file the dict's strings are its metadata (``paths`` and ``labels``
    as JSON lists; ``labels`` may also be an int tensor). ``.npy`` is read with
    ``allow_pickle=False`` and ``.pt`` with ``torch.load(weights_only=True)``: no file can
    run code. Anything else raises :class:`~nolabels.errors.CorruptFileError` naming the file.
    """
    p = Path(spec)
    if p.is_dir():
        out = read_store_dir(p)
    elif p.suffix in (".npy", ".pt", ".pth", ".safetensors"):
        obj = _read_embedding_file(p)
        if isinstance(obj, dict):
            emb = obj.get("emb", obj.get("embeddings"))
            if emb is None:
                raise InputError(f"{p}: a dict needs an 'emb' entry")
            paths = obj.get("paths", [])
            if not isinstance(paths, (list, tuple)) or not all(isinstance(x, str) for x in paths):
                raise CorruptFileError(p, "'paths' must be a list of strings")
            labels = obj.get("labels")
            if labels is not None and not isinstance(labels, (list, tuple, torch.Tensor)):
                raise CorruptFileError(p, "'labels' must be a list of ints / class names")
            out = Embeddings(_as_matrix(p, emb), list(paths),
                             _str_or_none(p, "model_id", obj.get("model_id")),
                             _str_or_none(p, "spec", obj.get("spec")), labels)
        else:
            out = Embeddings(_as_matrix(p, obj), [])
    else:
        raise InputError(f"{spec}: expected an embedding store directory, .safetensors, .npy or .pt")
    if paths_file:
        out.paths = read_lines(paths_file)
    if not out.paths:
        out.paths = [str(i) for i in range(out.emb.shape[0])] if out.emb.dim() else []
    if out.emb.dim() != 2 or out.emb.shape[0] != len(out.paths):
        raise InputError(f"{spec}: embeddings {tuple(out.emb.shape)} do not match {len(out.paths)} paths")
    return out


def labels_from(paths: list[str], labels, class_names: list[str]) -> torch.Tensor:
    """Shot labels: given ints / names, else the parent folder of each path."""
    from nolabels.methods.coder.knowledge import Knowledge

    index = {Knowledge._key(c): i for i, c in enumerate(class_names)}
    if labels is None:
        labels = [Path(p).parent.name for p in paths]
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    out = []
    for lab in labels:
        if isinstance(lab, str):
            key = Knowledge._key(lab)
            if key not in index:
                raise InputError(f"shot label {lab!r} is not one of the classes")
            out.append(index[key])
        else:
            out.append(int(lab))
    return torch.tensor(out, dtype=torch.int64)


def load_text_encoder(model: str | None, factory: str | None, device: str = "cpu"):
    """An object with ``encode_text`` (and ``model_id``), or None if neither is given."""
    if factory:
        mod, _, attr = factory.partition(":")
        if not attr:
            raise InputError(f"--encoder must be module:factory, got {factory!r}")
        obj = getattr(importlib.import_module(mod), attr)
        return obj() if callable(obj) and not hasattr(obj, "encode_text") else obj
    if model:
        from nolabels.models import load_encoder

        return load_encoder(model, device=device)
    return None


# --------------------------------------------------------------------------- coder
def _image_batches(store: str | os.PathLike, paths_file: str | None):
    """(embeddings (R, D) float32, paths, model_id, spec) per shard of ``store``: a
    directory is streamed shard by shard; a file is one batch."""
    from nolabels.data.sources import detect_layout, open_embeddings

    p = Path(store)
    layout = None
    if p.is_dir() and paths_file is None:
        try:
            layout = detect_layout(p)
        except InputError:
            layout = None  # e.g. a bare emb_*/meta_* folder: read_embeddings' minimal reader
    if layout in ("store", "clip-retrieval"):
        from nolabels.data.readers import paths_from_columns

        src = open_embeddings(p)

        def gen():
            for sh in src.iter_shards():
                meta = sh.meta
                paths = paths_from_columns(
                    [x if x is not None else str(i) for x, i in zip(
                        meta.column("path").to_pylist(), meta.column("item").to_pylist())],
                    meta.column("path_bytes").to_pylist() if "path_bytes" in meta.column_names
                    else None)
                yield torch.from_numpy(sh.emb).float(), paths
        return gen(), src.model_id, src.model_spec
    e = read_embeddings(os.fspath(store), paths_file)
    return iter([(e.emb, e.paths)]), e.model_id, e.spec


class _TableWriter:
    """Prediction rows to ``.csv`` or Parquet, batch by batch, atomically at close."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.out = Path(path)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.csv = self.out.suffix == ".csv"
        self._w: Any = None
        self._f: Any = None
        self.rows = 0

    def write(self, columns: dict[str, list]) -> None:
        from nolabels.data.readers import display_text, path_columns

        if self.csv:
            import csv

            cols = {**columns, "path": [display_text(x) for x in columns["path"]]}
            if self._f is None:
                self._f = open(self.tmp, "w", newline="", encoding="utf-8")
                self._w = csv.writer(self._f)
                self._w.writerow(list(cols))
            self._w.writerows(zip(*cols.values()))
        else:
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError as e:  # pragma: no cover
                raise MissingDependencyError("writing parquet needs pyarrow: pip install "
                                             "'nolabels[data]' (or use --out preds.csv)") from e
            pc = path_columns(columns["path"])
            t = pa.table({k: (pc["path"] if k == "path" else v) for k, v in columns.items()})
            t = t.append_column("path_bytes", pc["path_bytes"])  # null unless not UTF-8
            t = t.replace_schema_metadata({"nolabels": json.dumps({"command": "coder"})})
            if self._w is None:
                self._w = pq.ParquetWriter(self.tmp, t.schema)
            self._w.write_table(t)
        self.rows += len(columns["path"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        elif self._w is not None:
            self._w.close()
        else:  # no rows: an empty file with the header / schema
            raise InputError("coder: no image embeddings")
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        try:
            if self._f is not None:
                self._f.close()
            elif self._w is not None:
                self._w.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def coder(store: str | os.PathLike, out: str | os.PathLike, *,
          classes: str | os.PathLike | None = None, knowledge: str | os.PathLike | None = None,
          paths: str | None = None, shots: str | os.PathLike | None = None,
          dataset: str | None = None, templates: str | None = None, tau: float | None = None,
          rerank: bool = True, zs_templates: Sequence[str] | None = None,
          augment_passes: int | None = None, shot_val_fraction: float = 0.25, seed: int = 0, model: str | None = None,
          encoder: str | None = None, cache_dir: str | None = None, batch_size: int = 256,
          backend: str = "auto", evaluate: bool = False, reproduce: Sequence[str] = ()) -> dict:
    """CODER zero-shot, CODER* (``rerank``) and few-shot CODER (``shots``) predictions.

    Args:
        store: image embeddings (a store or other embedding folder, streamed by shard; or a
            ``.safetensors``/``.npy``/``.pt`` file, with ``paths`` one per line).
        out: predictions, ``.parquet`` or ``.csv``: path, zs_pred, zs_score, reranked,
            [fs_pred], pred, label.
        classes: class names file (default: the knowledge file's classes).
        knowledge: CODER knowledge JSON (:class:`nolabels.methods.coder.Knowledge`), or the
            authors' ``expert_knowledge`` folder (needs ``classes`` in their order;
            :func:`nolabels.methods.coder.read_authors_knowledge`).
        shots: labelled few-shot embeddings (store, or a file with "emb" and "labels").
        dataset: a :mod:`nolabels.methods.presets` name (an unknown one is an InputError
            listing the known ones): CODER's template variant, CODER* τ, the few-shot
            (β, α) initialisation, zero-shot templates and augmentation passes. Without
            it (and without a known ``dataset`` in the knowledge file): generic defaults.
        zs_templates: few-shot zero-shot classifier templates (``{c}``: the class); default
            the preset's Tip-Adapter templates, else "a photo of a {c}.".
        augment_passes: augmented views averaged into each few-shot cache key (default
            the preset's, else 0: the shots' stored embeddings). Needs ``shots`` to be a
            store embedded from images that are still readable.
        evaluate: also report accuracies against class-folder names (reporting only).
        reproduce: the authors' text rendering: any of :data:`REPRODUCE` ("all": every
            one; see ``docs/differences.md``).
    Returns:
        a JSON-serialisable summary (rows, classes, texts, reranked, ..., out).
    """
    from nolabels.data.outputs import claim_output_file
    from nolabels.methods import coder as C
    from nolabels.methods import presets as P

    preset = P.get_preset(dataset) if dataset else None  # unknown names fail before any work
    given = preset is not None
    claim_output_file(out)  # an existing --out that nolabels did not write is refused
    batches, store_model, store_spec = _image_batches(store, paths)
    render = reproduce_flags(reproduce)
    class_names = read_lines(classes) if classes else None
    kn = C.load_knowledge(knowledge, class_names, dataset) if knowledge else C.Knowledge()
    if class_names is None and kn.classes:
        class_names = list(kn.classes)
    elif class_names is None:
        raise InputError("coder: pass --classes (or a --knowledge file that lists the classes)")
    dataset = dataset or kn.dataset
    if preset is None and dataset:  # the knowledge file's data set, when it is a known one
        preset = P.lookup(dataset)
    cs = P.coder_values(preset)
    said = ", ".join(f"{k}={len(v)} templates" if k == "zs_templates" else f"{k}={v}"
                     for k, v in cs.items()) or "no CODER settings in the authors' code"
    print("coder: no --dataset: generic defaults" if preset is None else
          f"coder: --dataset {preset.name}{'' if given else ' (the knowledge file)'}: {said}",
          file=sys.stderr)
    unknown = kn.unknown_classes(class_names)
    if unknown:
        print(f"coder: warning: knowledge names not in the class list: {unknown[:10]}",
              file=sys.stderr)
    # The text cache is keyed by the model that embeds the texts. Without an encoder
    # factory, and with the model absent or the store's own spec, that is the store's
    # model: a warm cache of its id needs no encoder. Otherwise the encoder is loaded to
    # learn its model id.
    text_model = store_model if encoder is None and model in (None, store_spec) else None
    enc_obj = None
    warned = False

    def enc():
        nonlocal enc_obj
        if enc_obj is None:
            enc_obj = load_text_encoder(model or store_spec, encoder)
            if enc_obj is None:
                raise InputError("coder: no cached text embeddings and no encoder: pass "
                                 "--model or --encoder")
        return enc_obj

    def encode(bank):
        nonlocal warned
        if cache_dir and text_model is not None and bank.load_cached(cache_dir, text_model):
            return bank
        e = enc()
        mid = getattr(e, "model_id", None)
        if not warned:
            warned = True
            if mid is None:
                print("coder: warning: the text encoder has no model_id; its text embeddings "
                      "are not cached", file=sys.stderr)
            elif store_model is not None and mid != store_model:
                print(f"coder: warning: texts are embedded by {mid} but the images by "
                      f"{store_model}", file=sys.stderr)
        return bank.encode(e, cache_dir=cache_dir if mid else None, batch_size=batch_size)

    if store_model is None and encoder is None and model is None and store_spec is None:
        raise InputError("coder: unknown model: pass --model (the store has no model id) or "
                         "--encoder")

    tset = templates or cs.get("templates") or dataset
    bank = encode(C.TextBank.build(class_names, kn, templates=tset, **render))
    few = fit = None
    if shots:
        sh = read_embeddings(os.fspath(shots))
        s_lab = labels_from(sh.paths, sh.labels, class_names)
        fs_bank = encode(C.TextBank.build(class_names, kn, templates=tset,
                                          types=("name", "att", "ana"), task="few-shot",
                                          ovo=False, **render))
        zs_t = list(zs_templates) if zs_templates else cs.get("zs_templates",
                                                                ["a photo of a {c}."])
        passes = cs.get("augment_passes", 0) if augment_passes is None else augment_passes
        shot_emb = _shot_keys(shots, sh, passes, seed, batch_size) if passes else sh.emb
        zs_w = torch.nn.functional.normalize(encode(C.TextBank.build(
            class_names, None, templates={"name": zs_t, "att": [], "ana": [], "ovo": []},
            types=("name",), ovo=False)).emb.view(len(class_names), len(zs_t), -1).mean(1),
            dim=1)
        few = C.CoderFewShot(fs_bank, zs_w, shot_emb, s_lab, backend=backend)
        fit = few.fit(val_fraction=shot_val_fraction, dataset=dataset, seed=seed,
                      init=cs.get("few_shot_init"))

    writer = _TableWriter(out)
    n_rr = n_changed = 0
    idx = {C.Knowledge._key(c): i for i, c in enumerate(class_names)}
    hits = {"zs": 0, "star": 0, "fs": 0, "n": 0}
    try:
        for emb, paths_b in batches:
            if emb.dim() != 2 or emb.shape[0] != len(paths_b):
                raise InputError(f"{store}: embeddings {tuple(emb.shape)} do not match "
                                 f"{len(paths_b)} paths")
            scores, rr = C.coder_zero_shot(emb, bank, rerank=rerank, tau=tau, dataset=dataset,
                                           backend=backend)
            final = rr.pred
            cols: dict[str, list] = {
                "path": list(paths_b), "zs_pred": rr.pred.tolist(),
                "zs_score": scores.gather(1, rr.pred[:, None]).squeeze(1).tolist(),
                "reranked": rr.reranked.tolist()}
            if few is not None:
                final = few.predict(emb)
                cols["fs_pred"] = final.tolist()
            cols["pred"] = final.tolist()
            cols["label"] = [bank.class_names[i] for i in final.tolist()]
            writer.write(cols)
            n_rr += int(rr.reranked.sum())
            n_changed += int(rr.changed.sum())
            if evaluate:  # labels from class folders, for reporting only
                truth = torch.tensor([idx.get(C.Knowledge._key(Path(x).parent.name), -1)
                                      for x in paths_b])
                keep = truth >= 0
                hits["n"] += int(keep.sum())
                hits["zs"] += int((scores.argmax(1)[keep] == truth[keep]).sum())
                hits["star"] += int((rr.pred[keep] == truth[keep]).sum())
                hits["fs"] += int((final[keep] == truth[keep]).sum())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    msg: dict[str, Any] = {"rows": writer.rows, "classes": len(class_names),
                           "texts": len(bank.texts), "ovo_texts": len(bank.ovo_texts),
                           "reranked": n_rr, "changed_by_rerank": n_changed,
                           "out": os.fspath(out)}
    msg["dataset"] = preset.name if preset is not None else None
    if fit is not None:
        msg.update(beta=fit.beta, alpha=fit.alpha, shots_val_acc=fit.val_acc,
                   shots_cache=fit.n_cache, shots_val=fit.n_val, augment_passes=passes)
    if evaluate and hits["n"]:
        msg["accuracy_zero_shot"] = hits["zs"] / hits["n"]
        msg["accuracy_coder_star"] = hits["star"] / hits["n"]
        if fit is not None:
            msg["accuracy_few_shot"] = hits["fs"] / hits["n"]
        msg["evaluated_rows"] = hits["n"]
    return msg


def _shot_keys(shots, sh, passes: int, seed: int, batch_size: int) -> torch.Tensor:
    """Few-shot cache keys averaged over ``passes`` seeded augmented views
    (:func:`nolabels.methods.coder.augmented_embeddings`), when ``shots`` is an embedding
    store whose images and model can be reopened; otherwise the stored embeddings, with a
    warning saying why."""
    from nolabels.methods import coder as C

    def stored(why: str) -> torch.Tensor:
        print(f"coder: warning: {passes} augmentation passes need {why}; the stored "
              "(un-augmented) shot embeddings are used", file=sys.stderr)
        return sh.emb

    p = Path(shots)
    if not (p / "manifest.json").is_file():
        return stored("--shots to be an embedding store made from images")
    from nolabels.data import EmbeddingStore
    from nolabels.methods.common import reopen_source
    from nolabels.models import load_encoder

    st = EmbeddingStore(p)
    spec = st.model.get("spec")
    if not spec or "source" not in st.manifest:
        return stored("the store's model spec and image source")
    try:
        source = reopen_source(st)
    except FileNotFoundError:
        return stored(f"the images {p} was embedded from")
    _, meta = st.load()
    if list(meta["path"]) != list(sh.paths):
        raise InputError(f"{p}: the store's rows changed while reading it")
    enc = load_encoder(spec, checkpoint=st.model.get("checkpoint"))
    if enc.model_id != st.model.get("model_id"):
        raise InputError(f"{p} was embedded with {st.model.get('model_id')} but {spec} loads "
                         f"{enc.model_id}: its augmented cache keys would not match")
    print(f"coder: few-shot cache keys: {passes} augmented views per shot "
          f"(seed {seed})", file=sys.stderr)
    return C.augmented_embeddings(enc, source, meta["item"], passes, seed=seed,
                                  batch_size=min(batch_size, 64))


#: ``coder(reproduce=...)`` / ``nolabels coder --reproduce``: the authors' text rendering
#: quirks, each the :meth:`~nolabels.methods.coder.TextBank.build` argument it sets.
REPRODUCE = {"none-synonyms": "none_synonyms", "underscores": "keep_underscores",
             "dtd-ovo-comma": "fused_dtd_ovo"}


def reproduce_flags(reproduce: Sequence[str]) -> dict[str, bool]:
    """The ``TextBank.build`` keyword arguments for ``reproduce`` (names of
    :data:`REPRODUCE`, or "all")."""
    names = set(REPRODUCE) if "all" in reproduce else set(reproduce)
    bad = names - set(REPRODUCE)
    if bad:
        raise InputError(f"reproduce: unknown {sorted(bad)}; use {sorted(REPRODUCE)} or all")
    return {REPRODUCE[n]: True for n in sorted(names)}


# --------------------------------------------------------------------------- knowledge
def coder_knowledge(classes: str | os.PathLike, out: str | os.PathLike, *,
                    base_url: str | None = None, llm_model: str | None = None,
                    api_key_env: str | None = "OPENAI_API_KEY", model: str | None = None,
                    encoder: str | None = None, pairs: str | None = None,
                    dataset: str | None = None, retries: int = 3,
                    verbose: bool = False) -> dict:
    """Fill a CODER knowledge JSON through an OpenAI-compatible chat endpoint (ATG).

    ``base_url``/``llm_model`` default to NOLABELS_LLM_BASE_URL / NOLABELS_LLM_MODEL; the
    key is read from the environment variable ``api_key_env`` only. ``pairs``: ``auto:K``
    (needs ``model`` or ``encoder``) or a TSV file of confusing class pairs.
    Returns ``{"classes", "pairs", "requests", "out"}``.
    """
    from nolabels.data.outputs import claim_output_file
    from nolabels.methods import coder as C

    claim_output_file(out)  # an existing --out that nolabels did not write is refused
    base_url = base_url or os.environ.get("NOLABELS_LLM_BASE_URL")
    llm = llm_model or os.environ.get("NOLABELS_LLM_MODEL")
    if not base_url or not llm:
        raise InputError("coder-knowledge: pass --base-url and --llm-model "
                         "(or set NOLABELS_LLM_BASE_URL / NOLABELS_LLM_MODEL)")
    class_names = [C.Knowledge._key(c) for c in read_lines(classes)]
    text_enc = load_text_encoder(model, encoder)
    gen = C.KnowledgeGenerator(base_url, llm, api_key_env=api_key_env, encoder=text_enc,
                               retries=retries)
    pair_list: list[tuple[str, str]] = []
    if pairs:
        if pairs.startswith("auto:"):
            if text_enc is None:
                raise InputError("coder-knowledge: --pairs auto:K needs --model or --encoder")
            k = int(pairs.split(":", 1)[1])
            e = torch.as_tensor(text_enc.encode_text([f"a photo of {c}" for c in class_names]))
            pair_list = C.confusing_pairs(e, class_names, k)
        else:
            pair_list = [tuple(ln.split("\t")[:2]) for ln in read_lines(pairs)]  # type: ignore[misc]
    kn = gen.generate(class_names, pairs=pair_list, dataset=dataset,
                      progress=(lambda s: print(f"coder-knowledge: {s}", file=sys.stderr)) if verbose else None)
    kn.save(out)
    return {"classes": len(kn.classes), "pairs": len(pair_list), "requests": gen.requests,
            "out": os.fspath(out)}


__all__ = ["REPRODUCE", "Embeddings", "coder", "coder_knowledge", "read_embeddings", "read_lines",
           "reproduce_flags"]
