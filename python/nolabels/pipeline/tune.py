"""Label-free tuning (the work behind ``nolabels tune --method M IMAGES_OR_STORE --classes
classes.txt --model MODEL --out RUN``).

Methods: ``zeroshot`` (template ensemble), ``cde`` (templates + descriptions, NoLA's
CDE), ``lafter``, ``nola`` (needs DINO features: ``--dino-model``), ``latteclip``
(captions from ``--captions FILE.jsonl``, or generated with ``--caption-endpoint``).

IMAGES_OR_STORE is an embedding store (from ``nolabels embed``) or images (then
they are embedded into ``RUN/store`` first). Labels (class folders) are read only
to report accuracy; every choice is label-free (see
:mod:`nolabels.methods.selection`). Re-running the same command resumes: finished
stages are skipped and training continues from its last checkpoint. Scale out
with ``torchrun --nproc-per-node N -m nolabels tune ...``. The result is read by
``nolabels predict RUN IMAGES --out preds.parquet``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nolabels.errors import InputError
from nolabels.progress import Log

METHODS = ("zeroshot", "cde", "lafter", "nola", "latteclip")
PIXEL_METHODS = ("lafter", "nola", "latteclip")
SURROGATE_DINO = "surrogate:effnet-lite0"
#: Cached strong views per image of the CPU default for lafter/nola on the surrogate: the
#: setting ``benchmarks/eval_methods.py`` documents (``--views`` default 2, the README's
#: surrogate table), not a value tuned here.
DEFAULT_CACHE_VIEWS = 2


def _is_store(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "manifest.json"))


def _overrides(cfg, **kw):
    for k, v in kw.items():
        if v is not None and hasattr(cfg, k):
            setattr(cfg, k, v)
    return cfg


def tune(method: str, images: str | os.PathLike, classes: str | os.PathLike | Sequence[str],
         out: str | os.PathLike, *, model: str | None = None, checkpoint: str | None = None,
         dino_model: str | None = None, dino_checkpoint: str | None = None,
         descriptions: str | os.PathLike | None = None, templates: str | None = None,
         captions: Sequence[str] = (), caption_endpoint: str | None = None,
         caption_model: str | None = None, caption_api_key_env: str = "OPENAI_API_KEY",
         caption_noun: str = "object", groups_per_class: int = 8,
         hyper: dict[str, Any] | None = None, cache_views: int | None = None,
         device: str | None = "auto",
         embed_workers: int | str = "auto", embed_batch_size: int = 64,
         dataset: str | None = None, quiet: bool = False) -> dict:
    """Tune ``method`` label-free on ``images`` and write the run directory ``out``.

    Args:
        method: one of :data:`METHODS`.
        images: an embedding store, or images (folder, list file, tar shards).
        classes: classes.txt or a list of names.
        model: the encoder spec (optional when ``images`` is a store: its model).
        dino_model: NoLA's DINO model (default for the surrogate: its own image tower,
            ``surrogate:effnet-lite0``, a supervised stand-in, NOT DINO).
        descriptions: descriptions JSON (or a built-in name, ``cifar10``).
        templates: template set name / file (default: the method's).
        dataset: apply the authors' settings for this data set
            (:mod:`nolabels.methods.presets`; an unknown name is an InputError listing the
            known ones); ``hyper`` and ``templates`` still override it. None: generic
            defaults (the log says so).
        captions: LatteCLIP caption JSONL files.
        caption_endpoint: OpenAI-compatible base URL to generate LatteCLIP captions.
        hyper: overrides of the method's config fields (``epochs``, ``lr``, ``seed``, ...).
        cache_views: lafter / nola with the surrogate and ``surrogate_norms`` "block" or
            "last": cache the frozen prefix of the weak view and this many seeded strong
            views per image (``RUN/prefix_cache``) and train on them (CPU-friendly); 0:
            back-propagate through the whole tower. None (default): on a CPU, lafter/nola
            with the surrogate use :data:`DEFAULT_CACHE_VIEWS` views with ``surrogate_norms``
            "block" (unless other norms are asked for); otherwise 0 (see
            :func:`training_path`).
    Returns:
        the run summary.
    """
    from nolabels import dist
    from nolabels.data import EmbeddingStore
    from nolabels.methods.common import (
        aligned_store_features,
        encoder_info,
        load_tune_data,
        save_run,
    )
    from nolabels.methods.selection import (
        CRITERIA,
        DEFAULT_HELDOUT_FRACTION,
        small_heldout_note,
    )
    from nolabels.methods.zeroshot import read_classes, read_descriptions, resolve_templates
    from nolabels.models import load_encoder
    from nolabels.pipeline.embed import embed

    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    hyper = dict(hyper or {})
    from nolabels.methods import presets

    preset = presets.get_preset(dataset) if dataset is not None else None  # before any work
    from nolabels.data.outputs import check_output_dir, claim_output_dir, on_main_rank

    t0 = time.perf_counter()
    out = Path(out)
    check_output_dir(out, "run")  # a non-empty folder that is not a run is refused, untouched
    with dist.dist_session(device) as ctx:
        log = Log(quiet, ctx.is_main)
        names = read_classes(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
        desc = read_descriptions(descriptions, names) if descriptions is not None else None
        if method == "cde" and desc is None:
            raise InputError("--method cde needs --descriptions (a JSON file or 'cifar10')")
        if templates is not None:  # a bad set name or file is refused before any work
            if method == "latteclip":
                from nolabels.methods.latteclip import single_template

                resolve_templates([single_template(templates)])
            else:
                resolve_templates(templates)
        if method == "latteclip" and captions:  # malformed caption files, too
            from nolabels.methods.latteclip import read_captions

            read_captions(captions)

        on_main_rank(claim_output_dir, out, "run")  # create (and mark) it, or resume ours
        # the store
        tap = None  # the weak view's other tower outputs, collected while embedding it
        if _is_store(images):
            store_dir = Path(images)
            st = EmbeddingStore(store_dir)
            spec = st.model["spec"]
            if model is not None and model != spec:
                raise InputError(f"{store_dir} was embedded with {spec}, not {model}")
            encoder = load_encoder(spec, checkpoint=checkpoint or st.model.get("checkpoint"),
                                   device=ctx.device)
            if encoder.model_id != st.model["model_id"]:
                raise InputError(f"{store_dir} was embedded with {st.model['model_id']} but "
                                 f"the model loaded is {encoder.model_id}")
            cache_views = training_path(method, encoder, cache_views, hyper, ctx.device, log)
        else:
            if model is None:
                raise InputError("--model is required when IMAGES is not an embedding store")
            encoder = load_encoder(model, checkpoint=checkpoint, device=ctx.device)
            cache_views = training_path(method, encoder, cache_views, hyper, ctx.device, log)
            store_dir = out / "store"
            # the surrogate: the weak view's prefix / DINO stand-in come from this same pass
            from nolabels.methods.nola import own_tower_stand_in
            from nolabels.methods.students import weak_outputs, weak_tap

            want = weak_outputs(encoder, pooled=method == "nola" and own_tower_stand_in(
                encoder, dino_model, dino_checkpoint), prefix_norms=hyper.get(
                "surrogate_norms") if cache_views and method in ("lafter", "nola") else None)
            with weak_tap(encoder, want) as tap:
                embed(images, encoder, store_dir, batch_size=embed_batch_size,
                      workers=embed_workers, device=ctx.device, quiet=quiet)
        if not encoder.has_text:
            raise InputError(f"{encoder.spec} has no text encoder: these methods need a "
                             "CLIP-like model")
        log(f"tune --method {method}: model {encoder.model_id}, {len(names)} classes")

        from nolabels.methods import lafter, latteclip, nola

        cfg_cls = {"lafter": lafter.LaFTerConfig, "nola": nola.NoLAConfig,
                   "latteclip": latteclip.LatteCLIPConfig}.get(method)
        cfg = cfg_cls() if cfg_cls else None
        explicit = set(hyper) | ({"templates", "template"} if templates is not None else set())
        for line in presets.apply_to_config(cfg, preset, method, explicit):
            log(f"tune: {line}")  # before the flags, so that they override the preset
        if cfg is not None:
            unknown = [k for k in hyper if not hasattr(cfg, k)]
            if unknown:
                raise InputError(f"--method {method} has no setting(s) {unknown}; known: "
                                 f"{[f.name for f in dataclasses.fields(cfg)]}")
            _overrides(cfg, **hyper)
            if templates is not None and hasattr(cfg, "templates"):
                cfg.templates = templates
            elif templates is not None and hasattr(cfg, "template"):
                cfg.template = templates
        seed = getattr(cfg, "seed", int(hyper.get("seed", 0)))
        heldout = getattr(cfg, "heldout_fraction", float(hyper.get("heldout_fraction", DEFAULT_HELDOUT_FRACTION)))
        data = load_tune_data(store_dir, names, heldout_fraction=heldout, seed=seed,
                              need_pixels=method in PIXEL_METHODS)
        note = small_heldout_note(int(data.heldout.numel()), heldout)
        if note and method in PIXEL_METHODS:  # the trained methods: they pick an epoch
            log(note)

        weak_files = {}  # outputs of the weak view's one pass besides the store embedding
        if method == "nola" and nola.own_tower_stand_in(encoder, dino_model, dino_checkpoint):
            weak_files["pooled"] = nola.stand_in_file(out, encoder, data)
        prefix = None
        if cache_views:
            if method not in ("lafter", "nola"):
                raise InputError("--cache-views applies to lafter and nola")
            prefix = _prefix_cache(encoder, data, cfg, cache_views, out, embed_batch_size,
                                   log, quiet, tap=tap, weak_files=weak_files,
                                   workers=embed_workers)

        if method in ("zeroshot", "cde"):
            tmpl = templates or (presets.tune_values(preset, method).get("templates")
                                 if preset is not None else None) or "simple"
            summary = _zero_shot(method, encoder, data, names, desc, tmpl, out,
                                 save_run, encoder_info, CRITERIA)
        elif method == "lafter":
            summary = lafter.tune(encoder, data, names, out, descriptions=desc, config=cfg,
                                  prefix=prefix, log=log, quiet=quiet)
        elif method == "nola":
            if dino_model is None:
                if getattr(encoder, "not_clip", None):
                    dino_model = SURROGATE_DINO
                    log("nola: DINO stand-in: the surrogate's own EfficientNet-Lite0 image "
                        f"features ({SURROGATE_DINO}; supervised ImageNet, NOT DINO)")
                else:
                    raise InputError("--method nola needs --dino-model (e.g. "
                                     "timm:vit_base_patch16_224.dino, with --dino-checkpoint "
                                     "FILE offline)")
            if weak_files:  # the encoder's own tower: no second model, no second pass
                dino, dino_info = nola.own_tower_features(
                    encoder, data, weak_files, tap=tap, batch_size=embed_batch_size,
                    workers=embed_workers, log=log, quiet=quiet)
            else:
                dino_store = out / "dino_store"
                embed(data.source, dino_model, dino_store, checkpoint=dino_checkpoint,
                      batch_size=embed_batch_size, workers=embed_workers, device=ctx.device,
                      quiet=quiet)
                dino = aligned_store_features(dino_store, data.items)
                dst = EmbeddingStore(dino_store)
                dino_info = {"model_id": dst.model["model_id"], "spec": dst.model["spec"]}
            summary = nola.tune(encoder, data, names, out, dino=dino, descriptions=desc,
                                config=cfg, dino_info=dino_info, prefix=prefix, log=log,
                                quiet=quiet)
        else:  # latteclip
            files = list(captions)
            if caption_endpoint:
                cls_emb, zs = latteclip.zero_shot_labels(encoder, data.emb, names, cfg.template)
                client = latteclip.VisionChatClient(
                    caption_endpoint, caption_model or "default",
                    api_key_env=caption_api_key_env)
                gen_out = out / "captions.jsonl"
                if ctx.is_main:
                    latteclip.generate_captions(
                        data.source, data.items, data.paths, zs.tolist(), names, gen_out, client,
                        noun=caption_noun, group_noun=caption_noun + "s",
                        groups_per_class=groups_per_class, seed=cfg.seed, log=log)
                dist.barrier()
                files.append(str(gen_out))
            caps = latteclip.read_captions(files) if files else None
            summary = latteclip.tune(encoder, data, names, out, captions=caps, config=cfg,
                                     log=log, quiet=quiet)
        if isinstance(summary.get("history"), list):
            # the criterion curve's and the oracle curve's best epochs, one line each
            from nolabels.methods.selection import curve_lines, curve_summary

            summary["selection_curves"] = curve_summary(
                summary["history"], CRITERIA[method].split(":")[0])
            for line in curve_lines(summary["selection_curves"]):
                log(line)
        summary["total_seconds"] = time.perf_counter() - t0
        summary["dataset_preset"] = None if preset is None else preset.name
        if ctx.is_main:
            from nolabels.data.store import atomic_write_json
            from nolabels.methods.common import _jsonable

            atomic_write_json(out / "summary.json", _jsonable(summary))
        return summary


def training_path(method: str, encoder, cache_views: int | None, hyper: dict[str, Any],
                  device, log) -> int:
    """How lafter/nola train, said in the log; returns the number of cached strong views.

    ``cache_views`` None (the default) means: on a CPU, the surrogate (no ViT) trains on
    cached frozen-prefix features, :data:`DEFAULT_CACHE_VIEWS` strong views per image with
    ``surrogate_norms`` "block" (``hyper`` is updated), unless ``surrogate_norms`` "all"
    is asked for (no frozen prefix); elsewhere (a GPU, a ViT) the whole tower trains.
    An explicit number is kept (0: the whole tower, ``--full-tower``).
    """
    if method not in ("lafter", "nola"):
        return cache_views or 0  # a non-zero count is refused later, with the reason
    from nolabels.methods.students import is_vit_encoder

    surrogate = (not is_vit_encoder(encoder) and hasattr(encoder, "image_model")
                 and hasattr(encoder, "imagenet_emb"))
    why = ""
    if cache_views is None:
        cache_views = 0
        if surrogate and getattr(device, "type", str(device)) == "cpu":
            if hyper.get("surrogate_norms", "block") in ("block", "last"):
                hyper.setdefault("surrogate_norms", "block")
                cache_views = DEFAULT_CACHE_VIEWS
                why = "; the CPU default for the surrogate, --full-tower trains the whole tower"
            else:
                why = "; --surrogate-norms all has no frozen prefix to cache"
    if cache_views:
        log(f"{method}: training path: cached frozen prefix (the weak view and {cache_views} "
            f"seeded strong views per image, surrogate norms "
            f"{hyper.get('surrogate_norms', 'block')}{why})")
    else:
        log(f"{method}: training path: full tower (back-propagation through the whole image "
            f"tower, a fresh strong augmentation each epoch{why})")
    return cache_views


def _prefix_cache(encoder, data, cfg, views: int, out: Path, batch_size: int, log, quiet,
                  tap=None, weak_files=None, workers: int | str = 0):
    from nolabels import dist
    from nolabels.methods.students import (
        build_prefix_cache,
        image_stats,
        make_student,
        prefix_cache_key,
        prefix_view_path,
        strong_transform,
        weak_view_outputs,
    )

    student = make_student(encoder, surrogate_norms=cfg.surrogate_norms)
    if not student.cacheable:
        raise InputError("--cache-views needs the surrogate with --surrogate-norms block or "
                         f"last (a {student.kind} student has no frozen prefix)")
    size, mean, std = image_stats(encoder)
    strong = strong_transform(cfg.strong_aug, size, mean, std)
    tfs = {"weak": encoder.transform, **{f"strong{a}": strong for a in range(views)}}
    key = prefix_cache_key(student, encoder.model_id, data.source.fingerprint(), data.items,
                           list(tfs), 0)
    # the weak view (and the DINO stand-in) in one pass, or from the store's pass (tap)
    weak_view_outputs(encoder, data.source, data.items, {
        f"prefix:{cfg.surrogate_norms}": prefix_view_path(out / "prefix_cache", key, "weak"),
        **(weak_files or {})}, tap=tap, store_emb=data.emb, batch_size=batch_size,
        workers=workers, log=log, quiet=quiet)
    if dist.get_rank() == 0:
        build_prefix_cache(student, data.source, data.items, tfs, out / "prefix_cache", key=key,
                           batch_size=batch_size, log=log, quiet=quiet)
    dist.barrier()
    return build_prefix_cache(student, data.source, data.items, tfs, out / "prefix_cache",
                              key=key, quiet=True)


def _zero_shot(method, encoder, data, names, desc, templates, out, save_run, encoder_info,
               criteria) -> dict:
    from nolabels import ops
    from nolabels.methods.zeroshot import class_embeddings, resolve_templates

    tmpl = resolve_templates(templates)
    cls = class_embeddings(encoder, names, templates=tmpl, descriptions=desc)
    pl = ops.pseudo_label(data.emb.to(cls.device), cls, logit_scale=encoder.logit_scale, topk=1)
    summary = {"method": method, "classes": names, "images": data.n, "templates": len(tmpl),
               "descriptions": None if desc is None else sum(len(v) for v in desc.values()),
               "selection": criteria[method], "encoder": encoder_info(encoder)}
    import torch

    acc = data.oracle.report(torch.arange(data.n), pl.labels.cpu())
    if acc is not None:
        summary["oracle_accuracy_on_tuning_images"] = acc
    model = {"method": method, "head": {"weight": cls.cpu(), "scale": float(encoder.logit_scale),
                                        "normalize": True}}
    config = {"method": method, "encoder": encoder_info(encoder), "classes": names,
              "templates": tmpl, "descriptions": desc, "store": data.store,
              "selection": criteria[method]}
    save_run(out, config, model, summary)
    return summary


__all__ = ["METHODS", "PIXEL_METHODS", "tune"]
