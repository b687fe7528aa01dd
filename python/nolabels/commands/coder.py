"""``nolabels coder`` (CODER / CODER* / few-shot CODER) and ``nolabels coder-knowledge`` (ATG).

::

    nolabels coder STORE --classes classes.txt --knowledge knowledge.json \\
        [--shots SHOTS] [--dataset NAME] [--model SPEC | --encoder MOD:FACTORY] --out preds.parquet

STORE is an embedding store directory (``manifest.json``, ``emb_*.npy``, ``meta_*.parquet``;
design.md §8), or a ``.safetensors`` / ``.npy`` / ``.pt`` file of image embeddings (see
:func:`read_embeddings`: a dict with "emb" and optionally "paths", "labels", "model_id";
otherwise pass ``--paths``, one path per line). SHOTS (few-shot) is a store or such a file
with "emb" and "labels" (ints or class names); a store's labels are the parent folder names
of its paths. No input file can run code: ``.npy`` is read with ``allow_pickle=False``, a
``.pt`` only with ``torch.load(weights_only=True)`` (tensors and plain containers).

Texts are encoded by ``--model`` (``nolabels.models`` spec; default: the store's model) or
``--encoder module:factory``, and cached in ``--cache-dir`` under the id of the model that
embeds them plus a hash of the texts, so a cache warmed by one encoder is never used for
another. Without ``--encoder`` and ``--model`` (or with the store's own spec) a warm cache of
the store's model id needs no encoder at all.

    nolabels coder-knowledge --classes classes.txt --out knowledge.json \\
        --base-url URL --llm-model NAME [--api-key-env OPENAI_API_KEY] [--pairs auto:2]

fills the knowledge JSON through an OpenAI-compatible chat endpoint (ATG). Base URL,
model and key also come from NOLABELS_LLM_BASE_URL, NOLABELS_LLM_MODEL, OPENAI_API_KEY.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nolabels.commands._common import (
    BACKENDS,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_int,
)
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
    are skipped); without that module, a minimal reader of the same layout."""
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
    try:
        from nolabels.data.store import EmbeddingStore
    except ImportError:
        EmbeddingStore = None
    if EmbeddingStore is not None and "format_version" in manifest:
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
    from nolabels.methods.coder import Knowledge

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
        try:
            from nolabels.models import load_encoder  # type: ignore[attr-defined]
        except ImportError:
            from nolabels.models.base import load_encoder  # type: ignore[no-redef]
        return load_encoder(model, device=device)
    return None


def write_table(path: str, columns: dict[str, list]) -> None:
    """Predictions to ``.csv`` or Parquet (stamped with schema metadata ``nolabels``, so a
    later run may replace the file), atomically. A ``path`` that is not UTF-8 is written as
    ``\\xNN`` text (Parquet: exact bytes in ``path_bytes``, see nolabels.data.readers)."""
    from nolabels.data.readers import display_text, path_columns

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if out.suffix == ".csv":
        import csv

        if "path" in columns:
            columns = {**columns, "path": [display_text(p) for p in columns["path"]]}
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            names = list(columns)
            w.writerow(names)
            w.writerows(zip(*(columns[n] for n in names)))
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover
            raise MissingDependencyError("writing parquet needs pyarrow: pip install 'nolabels[data]' "
                              "(or use --out preds.csv)") from e
        table = pa.table({k: (path_columns(v)["path"] if k == "path" else v)
                          for k, v in columns.items()})
        if "path" in columns:
            raw = path_columns(columns["path"])["path_bytes"]
            if raw.null_count < len(raw):
                table = table.append_column("path_bytes", raw)
        table = table.replace_schema_metadata({"nolabels": json.dumps({"command": "coder"})})
        pq.write_table(table, tmp)
    os.replace(tmp, out)


# --------------------------------------------------------------------------- coder
def run_coder(args: argparse.Namespace) -> int:
    from nolabels.data.outputs import claim_output_file
    from nolabels.methods import coder as C

    claim_output_file(args.out)  # an existing --out that nolabels did not write is refused
    src = read_embeddings(args.store, args.paths)
    emb, paths, store_model = src.emb, src.paths, src.model_id
    knowledge = C.Knowledge.load(args.knowledge) if args.knowledge else C.Knowledge()
    if args.classes:
        class_names = read_lines(args.classes)
    elif knowledge.classes:
        class_names = list(knowledge.classes)
    else:
        raise InputError("coder: pass --classes (or a --knowledge file that lists the classes)")
    dataset = args.dataset or knowledge.dataset
    unknown = knowledge.unknown_classes(class_names)
    if unknown:
        print(f"coder: warning: knowledge names not in the class list: {unknown[:10]}", file=sys.stderr)
    # The text cache is keyed by the model that embeds the texts. Without --encoder, and
    # with --model absent or the store's own spec, that is the store's model: a warm cache
    # of its id needs no encoder. Otherwise the encoder is loaded to learn its model id.
    text_model = store_model if args.encoder is None and args.model in (None, src.spec) else None
    encoder = None
    warned = False

    def enc():
        nonlocal encoder
        if encoder is None:
            encoder = load_text_encoder(args.model or src.spec, args.encoder)
            if encoder is None:
                raise InputError("coder: no cached text embeddings and no encoder: pass --model or --encoder")
        return encoder

    cache = args.cache_dir

    def encode(bank):
        nonlocal warned
        if cache and text_model is not None and bank.load_cached(cache, text_model):
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
        return bank.encode(e, cache_dir=cache if mid else None, batch_size=args.batch_size)

    if store_model is None and args.encoder is None and args.model is None and src.spec is None:
        raise InputError("coder: unknown model: pass --model (the store has no model id) or --encoder")

    bank = encode(C.TextBank.build(class_names, knowledge, templates=args.templates or dataset))
    scores, rr = C.coder_zero_shot(emb, bank, rerank=not args.no_rerank, tau=args.tau, dataset=dataset,
                                   backend=args.backend)
    columns: dict[str, list] = {"path": paths}
    final = rr.pred
    columns["zs_pred"] = rr.pred.tolist()
    columns["zs_score"] = scores.gather(1, rr.pred[:, None]).squeeze(1).tolist()
    columns["reranked"] = rr.reranked.tolist()
    fit = None
    if args.shots:
        shots = read_embeddings(args.shots)
        s_emb = shots.emb
        s_lab = labels_from(shots.paths, shots.labels, class_names)
        fs_bank = encode(C.TextBank.build(class_names, knowledge, templates=args.templates or dataset,
                                          types=("name", "att", "ana"), task="few-shot", ovo=False))
        zs_w = torch.nn.functional.normalize(encode(C.TextBank.build(
            class_names, None, templates={"name": args.zs_templates, "att": [], "ana": [], "ovo": []},
            types=("name",), ovo=False)).emb.view(len(class_names), len(args.zs_templates), -1).mean(1), dim=1)
        few = C.CoderFewShot(fs_bank, zs_w, s_emb, s_lab, backend=args.backend)
        fit = few.fit(val_fraction=args.shot_val_fraction, dataset=dataset, seed=args.seed)
        final = few.predict(emb)
        columns["fs_pred"] = final.tolist()
    columns["pred"] = final.tolist()
    columns["label"] = [bank.class_names[i] for i in final.tolist()]
    write_table(args.out, columns)
    msg = {"rows": len(paths), "classes": len(class_names), "texts": len(bank.texts),
           "ovo_texts": len(bank.ovo_texts), "reranked": int(rr.reranked.sum()),
           "changed_by_rerank": int(rr.changed.sum()), "out": args.out}
    if fit is not None:
        msg.update(beta=fit.beta, alpha=fit.alpha, shots_val_acc=fit.val_acc, shots_cache=fit.n_cache,
                   shots_val=fit.n_val)
    if args.eval:  # labels from class folders, for reporting only
        idx = {C.Knowledge._key(c): i for i, c in enumerate(class_names)}
        truth = [idx.get(C.Knowledge._key(Path(p).parent.name), -1) for p in paths]
        keep = [i for i, t in enumerate(truth) if t >= 0]
        if keep:
            t = torch.tensor([truth[i] for i in keep])
            msg["accuracy_zero_shot"] = C.accuracy(scores.argmax(1)[keep], t)
            msg["accuracy_coder_star"] = C.accuracy(rr.pred[keep], t)
            if fit is not None:
                msg["accuracy_few_shot"] = C.accuracy(final[keep], t)
            msg["evaluated_rows"] = len(keep)
    print(json.dumps(msg))
    return 0


# --------------------------------------------------------------------------- knowledge
def run_knowledge(args: argparse.Namespace) -> int:
    from nolabels.data.outputs import claim_output_file
    from nolabels.methods import coder as C

    claim_output_file(args.out)  # an existing --out that nolabels did not write is refused
    base_url = args.base_url or os.environ.get("NOLABELS_LLM_BASE_URL")
    model = args.llm_model or os.environ.get("NOLABELS_LLM_MODEL")
    if not base_url or not model:
        raise InputError("coder-knowledge: pass --base-url and --llm-model "
                         "(or set NOLABELS_LLM_BASE_URL / NOLABELS_LLM_MODEL)")
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    class_names = [C.Knowledge._key(c) for c in read_lines(args.classes)]
    encoder = load_text_encoder(args.model, args.encoder)
    gen = C.KnowledgeGenerator(base_url, model, key, encoder=encoder, retries=args.retries)
    pairs: list[tuple[str, str]] = []
    if args.pairs:
        if args.pairs.startswith("auto:"):
            if encoder is None:
                raise InputError("coder-knowledge: --pairs auto:K needs --model or --encoder")
            k = int(args.pairs.split(":", 1)[1])
            e = torch.as_tensor(encoder.encode_text([f"a photo of {c}" for c in class_names]))
            pairs = C.confusing_pairs(e, class_names, k)
        else:
            pairs = [tuple(ln.split("\t")[:2]) for ln in read_lines(args.pairs)]  # type: ignore[misc]
    kn = gen.generate(class_names, pairs=pairs, dataset=args.dataset,
                      progress=(lambda s: print(f"coder-knowledge: {s}", file=sys.stderr)) if args.verbose else None)
    kn.save(args.out)
    print(json.dumps({"classes": len(kn.classes), "pairs": len(pairs), "requests": gen.requests, "out": args.out}))
    return 0


# --------------------------------------------------------------------------- registration
def _default_cache() -> str:
    return os.environ.get("NOLABELS_CACHE", str(Path.home() / ".cache" / "nolabels" / "text"))


def _zs_template(text: str) -> str:
    """A ``--zs-templates`` entry: a format string with the field ``{c}`` (the class)."""
    try:
        ok = "{c}" in text and bool(text.format(c="x"))
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"must contain {{c}} (the class name) and no other "
                                          f"{{field}}, got {text!r}")
    return text


def _pairs(text: str) -> str:
    """``--pairs``: ``auto:K`` (K >= 1) or a TSV file (checked when read)."""
    if text.startswith("auto:"):
        try:
            positive_int(text.split(":", 1)[1])
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be auto:K with K >= 1, or a file, got "
                                              f"{text!r}") from None
    return text


def register(subparsers) -> None:
    """Add ``coder`` and ``coder-knowledge`` to the ``nolabels`` command line."""
    p = subparsers.add_parser("coder", help="CODER zero-shot / CODER* / few-shot CODER from an embedding store",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="embedding store directory, or a .safetensors/.npy/.pt file of "
                                 "image embeddings (.npy read without pickle, .pt only with "
                                 "torch.load(weights_only=True): no file can run code)")
    p.add_argument("--classes", help="class names, one per line (label order)")
    p.add_argument("--knowledge", help="knowledge JSON (schema: nolabels.methods.coder.Knowledge)")
    p.add_argument("--out", required=True, help="predictions: .parquet (default) or .csv")
    p.add_argument("--paths", help="paths file for a .pt/.npy STORE (one per line)")
    p.add_argument("--shots", help="labelled few-shot embeddings (store dir, or .safetensors/.pt "
                                   "with 'emb' and 'labels'; .pt read with weights_only=True): "
                                   "few-shot CODER")
    p.add_argument("--dataset", help="dataset name: template variant, CODER* τ and few-shot init")
    p.add_argument("--templates", help="template set name (default: from --dataset)")
    p.add_argument("--tau", type=nonneg_float,
                   help="CODER* gap threshold, >= 0 (default: per dataset, else 0.1; 0: no "
                        "re-ranking)")
    p.add_argument("--no-rerank", action="store_true", help="plain CODER (no one-vs-one re-ranking)")
    p.add_argument("--zs-templates", nargs="+", type=_zs_template, default=["a photo of a {c}."],
                   help="few-shot zero-shot classifier templates ({c} = class name)")
    p.add_argument("--shot-val-fraction", type=fraction, default=0.25,
                   help="share of each class's shots held out to choose alpha, beta, in [0, 1) "
                        "(default 0.25; 0: the dataset's default alpha, beta)")
    p.add_argument("--model", help="text encoder spec (nolabels.models; default: the store's model spec)")
    p.add_argument("--encoder", help="custom text encoder factory, module:callable")
    p.add_argument("--cache-dir", default=_default_cache(), help="text-embedding cache directory")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="texts per text-encoder call (default 256)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="ops backend (auto, torch, cpu, triton, cuda)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the few-shot validation split (default 0)")
    p.add_argument("--eval", action="store_true",
                   help="report accuracy using class-folder names in the paths (reporting only)")
    p.set_defaults(func=run_coder)

    k = subparsers.add_parser("coder-knowledge", help="generate CODER's knowledge JSON with an LLM (ATG)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--classes", required=True, help="class names, one per line")
    k.add_argument("--out", required=True, help="knowledge JSON to write")
    k.add_argument("--base-url", help="OpenAI-compatible base URL (env NOLABELS_LLM_BASE_URL)")
    k.add_argument("--llm-model", help="chat model name (env NOLABELS_LLM_MODEL)")
    k.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (never pass keys on the command line)")
    k.add_argument("--pairs", type=_pairs,
                   help="one-vs-one pairs: a TSV file of 'c1<TAB>c2', or auto:K (K >= 1 nearest "
                        "classes)")
    k.add_argument("--dataset", help="dataset name stored in the JSON")
    k.add_argument("--model", help="text encoder spec for the analogous-class rejection rule")
    k.add_argument("--encoder", help="custom text encoder factory, module:callable")
    k.add_argument("--retries", type=positive_int, default=4,
                   help="attempts per request on network errors, HTTP 429 and 5xx (default 4)")
    k.add_argument("--verbose", action="store_true")
    k.set_defaults(func=run_knowledge)
