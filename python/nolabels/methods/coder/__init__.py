"""CODER: cross-modal neighbour representation, CODER* re-ranking and few-shot CODER.

Implements methods.md §5 (Yi et al., CVPR 2024, "Leveraging Cross-Modal Neighbor
Representation for Improved CLIP Classification") on top of ``nolabels.ops``, one job
per module:

* :mod:`.templates` — the authors' per-dataset tables: text templates (dataset variants
  selectable by name), CODER*'s τ, few-shot initial (β, α).
* :mod:`.knowledge` — :class:`Knowledge`, the "expert knowledge" bundle (attributes,
  analogous classes, synonyms, one-vs-one attributes) as one JSON file; see its docstring
  for the schema. An example for CIFAR-10 ships as package data
  (:func:`load_example_knowledge`); :func:`read_authors_knowledge` imports the authors'
  own bundle (``expert_knowledge/``).
* :mod:`.text_bank` — :class:`TextBank`, the rendered texts, encoded in batches by any
  encoder with ``encode_text(list[str])``, with the embeddings cached on disk keyed by
  (model id, hash of the texts).
* :mod:`.zero_shot` — :func:`zero_shot_scores` / :func:`coder_zero_shot`, CODER's
  heuristic classifier (``ops.coder_class_scores``), and :func:`ovo_rerank`, CODER*:
  one-vs-one re-ranking of the top-5 classes for every sample whose top-1/top-2
  probability gap is below τ.
* :mod:`.few_shot` — :class:`CoderFewShot`, few-shot CODER in a training-free Tip-Adapter
  cache, with α, β chosen by grid search on a held-out split of the labelled shots.
* :mod:`.generate` — :class:`KnowledgeGenerator`, ATG: fills a :class:`Knowledge`
  through an OpenAI-compatible chat endpoint with the paper's prompts.

Deliberate departures from the authors' code (each documented where it happens):

1. CODER* re-ranks *every* sample whose gap is below τ; the authors' code additionally
   required the ground-truth label to be in the top-5 (harmless to accuracy, but not
   label-free). Labels are never read here.
2. Few-shot α, β are searched on held-out *shots*, never on test data, and the reported
   predictions use the searched values only (the authors report max(test acc at init,
   test acc at searched) and, for ImageNet, search on the test set).
3. The affinity is computed once per split (the authors recompute it in each of the
   75,000 grid-search calls), through the D×D Gram matrix (``ops.coder_affinity``).
4. ATG's analogous-class re-ask loop stops as soon as an answer has no rejected class
   (the authors' flag bug made it always re-ask 6 times once any rejection occurred).
5. The DTD one-vs-one template list has its missing comma restored (4 templates, not 3
   with two fused); ``TextBank.build(fused_dtd_ovo=True)`` renders the authors' 3.
6. Synonym texts are the synonyms in the name template; the authors' ``CODER.py`` passes
   the synonym as ``class_name``, so every synonym text is "a photo of None"
   (``TextBank.build(none_synonyms=True)`` renders that).
7. Class names are shown with "_" as a space in every text; the authors keep the "_" in
   attribute, analogous and one-vs-one texts (``TextBank.build(keep_underscores=True)``).

Every departure, with the flag that reproduces it: ``docs/differences.md``.

The names below are re-exported here (``from nolabels.methods import coder as C; C.X``);
the rest lives in, and is patched in, its module.
"""
from __future__ import annotations

from nolabels.methods.coder.few_shot import (
    CoderFewShot,
    accuracy,
    augmented_embeddings,
    grid,
    minmax_rows,
    stratified_split,
)
from nolabels.methods.coder.generate import ChatError, KnowledgeGenerator, confusing_pairs
from nolabels.methods.coder.knowledge import (
    Knowledge,
    load_example_knowledge,
    load_knowledge,
    read_authors_knowledge,
)
from nolabels.methods.coder.templates import (
    DEFAULT_FEW_SHOT_INIT,
    DEFAULT_TAU,
    FEW_SHOT_INIT,
    TAU,
    TEMPLATES,
    default_tau,
)
from nolabels.methods.coder.text_bank import TEXT_CACHE_KIND, TextBank
from nolabels.methods.coder.zero_shot import coder_zero_shot, ovo_rerank, zero_shot_scores

__all__ = [
    "DEFAULT_FEW_SHOT_INIT", "DEFAULT_TAU", "FEW_SHOT_INIT", "TAU", "TEMPLATES", "TEXT_CACHE_KIND",
    "ChatError", "CoderFewShot", "Knowledge", "KnowledgeGenerator", "TextBank", "accuracy",
    "augmented_embeddings", "coder_zero_shot", "confusing_pairs", "default_tau", "grid",
    "load_example_knowledge", "load_knowledge", "minmax_rows", "ovo_rerank",
    "read_authors_knowledge", "stratified_split", "zero_shot_scores",
]
