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
import json
import os
from pathlib import Path

from nolabels.commands._common import (
    BACKENDS,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_int,
)
from nolabels.pipeline.coder import (  # noqa: F401 - re-exported for scripts
    REPRODUCE,
    Embeddings,
    coder,
    coder_knowledge,
    read_embeddings,
    read_lines,
)


def run_coder(args: argparse.Namespace) -> int:
    msg = coder(args.store, args.out, classes=args.classes, knowledge=args.knowledge,
                paths=args.paths, shots=args.shots, dataset=args.dataset,
                templates=args.templates, tau=args.tau, rerank=not args.no_rerank,
                zs_templates=args.zs_templates, augment_passes=args.augment_passes,
                shot_val_fraction=args.shot_val_fraction,
                seed=args.seed, model=args.model, encoder=args.encoder,
                cache_dir=args.cache_dir, batch_size=args.batch_size, backend=args.backend,
                evaluate=args.eval, reproduce=args.reproduce or ())
    print(json.dumps(msg))
    return 0


def run_knowledge(args: argparse.Namespace) -> int:
    msg = coder_knowledge(args.classes, args.out, base_url=args.base_url,
                          llm_model=args.llm_model, api_key_env=args.api_key_env,
                          model=args.model, encoder=args.encoder, pairs=args.pairs,
                          dataset=args.dataset, retries=args.retries, verbose=args.verbose)
    print(json.dumps(msg))
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
    p.add_argument("--knowledge", help="knowledge JSON (schema: nolabels.methods.coder.Knowledge), "
                                       "or the authors' expert_knowledge/ folder (with --classes "
                                       "in their order and --dataset, e.g. caltech-101)")
    p.add_argument("--out", required=True, help="predictions: .parquet (default) or .csv")
    p.add_argument("--paths", help="paths file for a .pt/.npy STORE (one per line)")
    p.add_argument("--shots", help="labelled few-shot embeddings (store dir, or .safetensors/.pt "
                                   "with 'emb' and 'labels'; .pt read with weights_only=True): "
                                   "few-shot CODER")
    p.add_argument("--dataset", help="apply the authors' settings for this data set "
                                     "(nolabels.methods.presets: imagenet, caltech101, dtd, "
                                     "eurosat, fgvc_aircraft, food101, flowers102, oxford_pets, "
                                     "stanford_cars, sun397, ucf101, ...): template variant, "
                                     "CODER* tau, few-shot init, zero-shot templates, "
                                     "augmentation passes; flags given explicitly win. "
                                     "Default: generic settings")
    p.add_argument("--templates", help="template set name (default: from --dataset)")
    p.add_argument("--tau", type=nonneg_float,
                   help="CODER* gap threshold, >= 0 (default: per dataset, else 0.1; 0: no "
                        "re-ranking)")
    p.add_argument("--no-rerank", action="store_true", help="plain CODER (no one-vs-one re-ranking)")
    p.add_argument("--zs-templates", nargs="+", type=_zs_template,
                   help="few-shot zero-shot classifier templates ({c} = class name; default: "
                        "the --dataset's Tip-Adapter templates, else 'a photo of a {c}.')")
    p.add_argument("--augment-passes", dest="augment_passes", type=nonneg_int,
                   help="few-shot: average this many seeded augmented views of each shot image "
                        "into its cache key (needs --shots to be a store made from images; "
                        "default: the --dataset's, e.g. 20, else 0: the stored embeddings)")
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
    p.add_argument("--reproduce", nargs="+", choices=(*REPRODUCE, "all"), metavar="QUIRK",
                   help="render texts as the authors' code does: none-synonyms (every synonym "
                        "text 'a photo of None'), underscores (keep '_' in attribute, "
                        "analogous and one-vs-one texts), dtd-ovo-comma (DTD's fused "
                        "one-vs-one template), or all (docs/differences.md)")
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
