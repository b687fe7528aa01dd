"""The nolabels library surface: the pipeline steps the command line runs, as functions.

Each returns a small result object (or a JSON-able dict) and raises
:class:`nolabels.errors.NolabelsError` subclasses for problems the caller can fix::

    from nolabels import api

    api.embed("images/", "openclip:ViT-B-32/laion2b_s34b_b79k", "store")      # EmbedReport
    rep = api.label("store", "classes.txt", "labels", select_per_class=16)    # LabelReport
    api.evaluate("labels")                                                    # dict
    api.label("clipret_out/", "classes.txt", "labels2", model="openclip:ViT-B-32/laion2b_s34b_b79k")
    api.tune("nola", "store", "classes.txt", "run", descriptions="desc.json")  # dict
    api.predict("run", "store", "preds")                                      # dict
    api.coder("store", "preds.parquet", classes="classes.txt", knowledge="k.json")

Every function runs unchanged under ``torchrun`` (each rank does its share; see the
functions' docstrings). The kernels are in :mod:`nolabels.ops`.

=========  =================================================================================
embed      images (folder, list, tar shards) -> resumable embedding store
label      any embeddings (store, clip-retrieval, .npy, Parquet) -> pseudo-labels, streamed
evaluate   accuracy / per-class table of labels against class folders (reporting only)
tune       label-free tuning: zeroshot, cde, lafter, nola, latteclip -> a run directory
predict    a run applied to images or a store -> labels
coder      CODER / CODER* / few-shot CODER predictions
=========  =================================================================================
"""
from __future__ import annotations

from nolabels.data.sources import EmbeddingSource, open_embeddings
from nolabels.pipeline.coder import coder, coder_knowledge
from nolabels.pipeline.embed import EmbedReport, embed
from nolabels.pipeline.evaluate import evaluate, format_report
from nolabels.pipeline.label import LabelReport, label
from nolabels.pipeline.predict import predict
from nolabels.pipeline.tune import tune

__all__ = ["EmbedReport", "EmbeddingSource", "LabelReport", "coder", "coder_knowledge", "embed",
           "evaluate", "format_report", "label", "open_embeddings", "predict", "tune"]
