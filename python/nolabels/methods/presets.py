"""Per-dataset presets: the settings each method's authors' code uses for a data set.

``nolabels tune --dataset NAME`` and ``nolabels coder --dataset NAME`` apply one
:class:`DatasetPreset`; a flag given explicitly still wins over the preset. Without
``--dataset`` the package's generic defaults apply and the log says so.

What a preset holds (``None`` where the authors' code has no value for the data set;
the generic default then stays and the log names what was missing):

* ``lafter_templates`` / ``lafter_text_steps`` / ``lafter_amp``: LaFTer's
  ``ds_specific_templates`` and ``text_cls_epochs`` (:data:`nolabels.methods.lafter.TEXT_STEPS`),
  and fp32 (the authors call ``model.float()``: no autocast);
* ``nola_templates`` / ``nola_amp``: NoLA's ``ds_specific_templates`` (its CDE classifier;
  also used by ``--method cde``) and fp32;
* ``latteclip_template`` / ``latteclip_epochs`` / ``latteclip_warmup_steps`` /
  ``latteclip_weight_decay``: LatteCLIP's single class template and its per-dataset
  training script (the weight decay only where a script sets it);
* ``coder_templates``: the :data:`nolabels.methods.coder.TEMPLATES` set of CODER's
  ``CODER/template.py``; ``coder_tau`` (CODER*; :data:`~nolabels.methods.coder.TAU`);
  ``few_shot_init`` (β, α) (:data:`~nolabels.methods.coder.FEW_SHOT_INIT`);
  ``tip_templates``, the zero-shot classifier templates of the few-shot cache model
  (the dataset's Tip-Adapter template list); ``augment_passes``, the augmented passes
  averaged into each few-shot cache key (``augment_epoch``).

``--method zeroshot`` uses ``lafter_templates`` (CLIP's per-dataset prompt sets, as
LaFTer/NoLA ship them), else ``tip_templates``. Every value cites the authors' file in
``sources`` (and in a comment where it is written down); values that were looked for and
not found are listed in ``missing``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from nolabels.errors import InputError
from nolabels.methods.coder.templates import FEW_SHOT_INIT, TAU
from nolabels.methods.lafter import TEXT_STEPS

# --------------------------------------------------------------------------- sources
#: LaFTer (jmiemirza/LaFTer @ a5e3022): templates and text-classifier steps.
LAFTER_TEMPLATES_SRC = "jmiemirza/LaFTer utils/data_utils.py: ds_specific_templates"
LAFTER_STEPS_SRC = "jmiemirza/LaFTer utils/utils.py: text_cls_epochs"
LAFTER_AMP_SRC = "jmiemirza/LaFTer utils/utils.py: setup_lafter_training_utils (model.float())"
#: NoLA (fazliimam/NoLA @ b7ab0a5 / 1731a14).
NOLA_TEMPLATES_SRC = "fazliimam/NoLA utils/data_utils.py: ds_specific_templates"
NOLA_AMP_SRC = ("fazliimam/NoLA trainers/NoLA.py: build_model (clip_model.float() for "
                "PREC fp32, the default of utils/misc.py)")
#: LatteCLIP (astra-vision/LatteCLIP @ cf315fb).
LATTE_TEMPLATE_SRC = "astra-vision/LatteCLIP src/training/abo.py: {cls}.templates"
LATTE_SCRIPT_SRC = "astra-vision/LatteCLIP scripts/unsupervised/{script}_fine_tune_multiclass.sh"
#: CODER (YCaigogogo/CVPR24-CODER @ 1501735 / 89a6400).
CODER_TEMPLATE_SRC = "YCaigogogo/CVPR24-CODER CODER/template.py"
CODER_TAU_SRC = "YCaigogogo/CVPR24-CODER utils.py: get_thres"
CODER_YAML_SRC = "YCaigogogo/CVPR24-CODER configs/{yaml}"
TIP_SRC = "YCaigogogo/CVPR24-CODER datasets/few_shot_dataset/{file}: template"

# --------------------------------------------------------------------------- templates
# jmiemirza/LaFTer and fazliimam/NoLA utils/data_utils.py: ds_specific_templates
# ('ImageNet', 'ImageNetA/R/Sketch', 'Caltech101': the same 7 templates).
IMAGENET7 = ("a bad photo of the {}.", "a {} in a video game.", "a origami {}.",
             "a photo of the small {}.", "art of the {}.", "a photo of the large {}.",
             "itap of a {}.")
DTD8 = tuple(f"a photo of {a} {{}} {w}." for a in ("a", "the")
             for w in ("texture", "pattern", "thing", "object"))
# 'UCF101': 6 verbs x 2 articles x 4 media = 48, in the authors' order.
UCF48 = tuple(f"{m} {a} person {v}{{}}." for v in ("", "using ", "doing ", "during ",
                                                    "performing ", "practicing ")
              for a in ("a", "the")
              for m in ("a photo of", "a video of", "a example of", "a demonstration of"))
# 'CIFAR10_local': CLIP's 18 CIFAR templates.
CIFAR10_18 = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.",
    "a bad photo of the {}.", "a good photo of the {}.", "a photo of the small {}.",
    "a photo of the big {}.",
)
# 'CIFAR100_local': 81 templates (CLIP's 80 ImageNet templates, led by 'a photo of a {}'
# without a full stop).
CIFAR100_81 = (
    "a photo of a {}", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
# LaFTer 'EuroSAT' (3) and NoLA 'EuroSAT' (6: its remote-sensing set).
LAFTER_EUROSAT = ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                  "a centered satellite photo of the {}.")
NOLA_EUROSAT = ("a satellite photo of {}.", "a satellite photo of a {}.",
                "a satellite photo of the {}.", "a centered satellite photo of {}.",
                "This is an aerial image of a {}.", "a aerial image of {}.")
FLOWERS1 = ("a photo of a {}, a type of flower.",)
SUN2 = ("a photo of a {}.", "a photo of the {}.")
# NoLA 'OxfordPets' and 'Stanford-Cars' (question-like prompts, as written there;
# trailing spaces dropped).
NOLA_PETS = ("Describe what a pet {} looks like", "Visually describe a {}, a type of pet.")
NOLA_CARS = (
    "How can you identify a(n) {}?", "Description of a {}, a type of car.",
    "A caption of a photo of a {}:", "What are the primary characteristics of a {}?",
    "Description of the exterior of a {}",
    "What are the identifying characteristics of a {}, a type of car?",
    "Describe an image from the internet of a {}", "What does a {} look like?",
    "Describe what a {}, a type of car, looks like",
)
# CODER datasets/few_shot_dataset/imagenet.py: imagenet_templates (its own order).
TIP_IMAGENET = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                "a photo of the small {}.")


@dataclass(frozen=True)
class DatasetPreset:
    """The authors' settings for one data set (``None``: not in their code; see
    :attr:`missing`). Templates use ``{}`` for the class name."""

    name: str
    title: str
    aliases: tuple[str, ...] = ()
    lafter_templates: tuple[str, ...] | None = None
    lafter_text_steps: int | None = None
    lafter_amp: str | None = "off"
    nola_templates: tuple[str, ...] | None = None
    nola_amp: str | None = "off"
    latteclip_template: str | None = None
    latteclip_epochs: int | None = None
    latteclip_warmup_steps: int | None = None
    latteclip_weight_decay: float | None = None
    coder_templates: str | None = None
    coder_tau: float | None = None
    few_shot_init: tuple[float, float] | None = None  # (beta, alpha)
    tip_templates: tuple[str, ...] | None = None
    augment_passes: int | None = None
    sources: tuple[tuple[str, str], ...] = ()  # (field, "owner/repo path: what")
    missing: tuple[str, ...] = ()  # fields looked for in the authors' code and not found

    def source(self, field: str) -> str | None:
        """The citation of ``field`` (None if it has no value)."""
        return dict(self.sources).get(field)

    def values(self) -> dict[str, Any]:
        """The non-None settings (everything but name, title, aliases, sources, missing)."""
        skip = {"name", "title", "aliases", "sources", "missing"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}


def _preset(name: str, title: str, *, aliases: tuple[str, ...] = (), sources: Mapping[str, str],
            missing: tuple[str, ...] = (), **values: Any) -> DatasetPreset:
    """A preset whose ``lafter_amp``/``nola_amp`` cite the authors' fp32 and whose
    ``missing`` lists the method fields without a value."""
    src = dict(sources)
    src.setdefault("lafter_amp", LAFTER_AMP_SRC)
    src.setdefault("nola_amp", NOLA_AMP_SRC)
    return DatasetPreset(name=name, title=title, aliases=aliases, sources=tuple(src.items()),
                         missing=missing, **values)


def _latte(cls: str, script: str) -> dict[str, str]:
    return {"latteclip_template": LATTE_TEMPLATE_SRC.format(cls=cls),
            "latteclip_epochs": LATTE_SCRIPT_SRC.format(script=script) + ": --epochs",
            "latteclip_warmup_steps": LATTE_SCRIPT_SRC.format(script=script) + ": --warmup"}


def _coder(yaml: str, tip_file: str, *, tau: bool = False) -> dict[str, str]:
    out = {"coder_templates": CODER_TEMPLATE_SRC,
           "few_shot_init": CODER_YAML_SRC.format(yaml=yaml) + ": init_beta, init_alpha",
           "augment_passes": CODER_YAML_SRC.format(yaml=yaml) + ": augment_epoch",
           "tip_templates": TIP_SRC.format(file=tip_file)}
    if tau:
        out["coder_tau"] = CODER_TAU_SRC
    return out


_LAFTER = {"lafter_templates": LAFTER_TEMPLATES_SRC, "lafter_text_steps": LAFTER_STEPS_SRC}
_NOLA = {"nola_templates": NOLA_TEMPLATES_SRC}
_NO_LATTE = ("latteclip_template", "latteclip_epochs", "latteclip_warmup_steps")
_NO_FEW_SHOT = ("few_shot_init", "tip_templates", "augment_passes")

PRESETS: dict[str, DatasetPreset] = {p.name: p for p in [
    _preset(
        "imagenet", "ImageNet", aliases=("ilsvrc", "imagenet1k"),
        lafter_templates=IMAGENET7, lafter_text_steps=TEXT_STEPS["imagenet"],
        nola_templates=IMAGENET7, coder_templates="default", coder_tau=TAU["imagenet"],
        few_shot_init=FEW_SHOT_INIT["imagenet"], tip_templates=TIP_IMAGENET,
        augment_passes=1,  # configs/imagenet.yaml: augment_epoch 1
        sources={**_LAFTER, **_NOLA, **_coder("imagenet.yaml", "imagenet.py", tau=True)},
        missing=_NO_LATTE),
    _preset(
        "imagenet-v2", "ImageNet-V2", aliases=("imagenetv2",), coder_templates="default",
        coder_tau=TAU["imagenet-v2"],
        sources={"coder_templates": CODER_TEMPLATE_SRC, "coder_tau": CODER_TAU_SRC},
        missing=("lafter_templates", "lafter_text_steps", "nola_templates", *_NO_LATTE,
                 *_NO_FEW_SHOT)),
    *[_preset(
        n, t, aliases=a, lafter_templates=IMAGENET7, lafter_text_steps=TEXT_STEPS[n],
        nola_templates=IMAGENET7, sources={**_LAFTER, **_NOLA},
        missing=(*_NO_LATTE, "coder_templates", "coder_tau", *_NO_FEW_SHOT))
      for n, t, a in (("imagenet-a", "ImageNet-A", ("imageneta",)),
                      ("imagenet-r", "ImageNet-R", ("imagenetr",)),
                      ("imagenet-sketch", "ImageNet-Sketch", ("imagenetsketch", "imagenets")))],
    _preset(
        "caltech101", "Caltech101", aliases=("caltech", "caltech-101"),
        lafter_templates=IMAGENET7, lafter_text_steps=TEXT_STEPS["caltech101"],
        nola_templates=IMAGENET7, latteclip_template="a photo of a {}.", latteclip_epochs=50,
        latteclip_warmup_steps=10,
        latteclip_weight_decay=1e-7,  # caltech101_fine_tune_multiclass.sh: --wd 1e-7
        coder_templates="default", coder_tau=TAU["caltech101"],
        few_shot_init=FEW_SHOT_INIT["caltech101"], tip_templates=("a photo of a {}.",),
        augment_passes=20,
        sources={**_LAFTER, **_NOLA, **_latte("BaseDataset", "caltech101"),
                 "latteclip_weight_decay": LATTE_SCRIPT_SRC.format(script="caltech101") + ": --wd",
                 **_coder("caltech-101.yaml", "caltech101.py", tau=True)}),
    _preset(
        "dtd", "DTD (Describable Textures)", aliases=("describabletextures", "textures"),
        lafter_templates=DTD8, lafter_text_steps=TEXT_STEPS["dtd"], nola_templates=DTD8,
        latteclip_template="{} texture.", latteclip_epochs=100, latteclip_warmup_steps=10,
        coder_templates="dtd", coder_tau=TAU["dtd"], few_shot_init=FEW_SHOT_INIT["dtd"],
        tip_templates=("{} texture.",), augment_passes=20,
        sources={**_LAFTER, **_NOLA, **_latte("DtdDataset", "dtd"),
                 **_coder("dtd.yaml", "dtd.py", tau=True)}),
    _preset(
        "eurosat", "EuroSAT", lafter_templates=LAFTER_EUROSAT,
        lafter_text_steps=TEXT_STEPS["eurosat"], nola_templates=NOLA_EUROSAT,
        latteclip_template="a photo of a {}.",  # EurosatDataset: its own template commented out
        latteclip_epochs=15, latteclip_warmup_steps=40, coder_templates="eurosat",
        coder_tau=TAU["eurosat"], few_shot_init=FEW_SHOT_INIT["eurosat"],
        tip_templates=("a centered satellite photo of {}.",), augment_passes=20,
        sources={**_LAFTER, **_NOLA, **_latte("BaseDataset", "eurosat"),
                 **_coder("eurosat.yaml", "eurosat.py", tau=True)}),
    _preset(
        "fgvc_aircraft", "FGVC-Aircraft", aliases=("aircraft", "fgvc", "fgvcaircraft"),
        lafter_text_steps=TEXT_STEPS["fgvc_aircraft"],
        latteclip_template="a photo of a {}, a type of aircraft.", latteclip_epochs=50,
        latteclip_warmup_steps=15, coder_templates="fgvc_aircraft",
        few_shot_init=FEW_SHOT_INIT["fgvc_aircraft"],
        tip_templates=("a photo of a {}, a type of aircraft.",), augment_passes=20,
        sources={"lafter_text_steps": LAFTER_STEPS_SRC,
                 **_latte("FGVCAircraftDataset", "fgvc_aircraft"), **_coder("fgvc.yaml", "fgvc.py")},
        # LaFTer lists FGVCAircraft in text_cls_epochs only; neither repo has its templates
        missing=("lafter_templates", "nola_templates", "coder_tau")),
    _preset(
        "food101", "Food101", aliases=("food", "food-101"),
        lafter_text_steps=TEXT_STEPS["food101"],
        latteclip_template="a photo of a {}, a type of food.", latteclip_epochs=15,
        latteclip_warmup_steps=140, coder_templates="food101", coder_tau=TAU["food101"],
        few_shot_init=FEW_SHOT_INIT["food101"], tip_templates=("a photo of {}, a type of food.",),
        augment_passes=20,
        sources={"lafter_text_steps": LAFTER_STEPS_SRC, **_latte("Food101Dataset", "food101"),
                 **_coder("food101.yaml", "food101.py", tau=True)},
        missing=("lafter_templates", "nola_templates")),
    _preset(
        "flowers102", "Oxford Flowers102", aliases=("flowers", "oxfordflowers", "flower102",
                                                    "oxford_flowers", "oxfordflowers102"),
        lafter_templates=FLOWERS1, lafter_text_steps=TEXT_STEPS["flowers102"],
        nola_templates=FLOWERS1, latteclip_template="a photo of a {}, a type of flower.",
        latteclip_epochs=50, latteclip_warmup_steps=12, coder_templates="oxford_flowers",
        few_shot_init=FEW_SHOT_INIT["flowers102"], tip_templates=FLOWERS1, augment_passes=20,
        sources={**_LAFTER, **_NOLA, **_latte("Flower102Dataset", "flower102"),
                 **_coder("oxford_flowers.yaml", "oxford_flowers.py")},
        missing=("coder_tau",)),
    _preset(
        "oxford_pets", "Oxford-IIIT Pets", aliases=("pets", "oxfordpets", "oxfordpet", "oxford-pet"),
        nola_templates=NOLA_PETS,
        latteclip_template="a photo of a {}.",  # OxfordPetsDataset: pet template commented out
        latteclip_epochs=100, latteclip_warmup_steps=10, coder_templates="oxford_pets",
        coder_tau=TAU["oxford_pets"], few_shot_init=FEW_SHOT_INIT["oxford_pets"],
        tip_templates=("a photo of a {}, a type of pet.",),
        augment_passes=10,  # configs/oxford-pet.yaml: augment_epoch 10
        sources={**_NOLA, **_latte("BaseDataset", "oxford_pets"),
                 **_coder("oxford-pet.yaml", "oxford_pets.py", tau=True)},
        missing=("lafter_templates", "lafter_text_steps")),
    _preset(
        "stanford_cars", "Stanford Cars", aliases=("cars", "stanfordcars"),
        nola_templates=NOLA_CARS, latteclip_template="a photo of a {}.", latteclip_epochs=50,
        latteclip_warmup_steps=20,
        coder_templates="default",  # CODER/template.py has no cars variant
        few_shot_init=FEW_SHOT_INIT["stanford_cars"],
        # few_shot_dataset/stanford_cars.py is not in the stored snapshot (only its .pyc);
        # cars.py of the same folder (and Tip-Adapter's family) use this one template
        tip_templates=("a photo of a {}.",), augment_passes=20,
        sources={**_NOLA, **_latte("BaseDataset", "stanford_cars"),
                 **_coder("stanford_cars.yaml", "cars.py")},
        missing=("lafter_templates", "lafter_text_steps", "coder_tau")),
    _preset(
        "sun397", "SUN397", aliases=("sun",), lafter_templates=SUN2,
        lafter_text_steps=TEXT_STEPS["sun397"], nola_templates=SUN2,
        latteclip_template="a photo of a {}.", latteclip_epochs=15, latteclip_warmup_steps=40,
        coder_templates="default", few_shot_init=FEW_SHOT_INIT["sun397"],
        tip_templates=("a photo of a {}.",), augment_passes=20,
        sources={**_LAFTER, **_NOLA, **_latte("BaseDataset", "sun397"),
                 **_coder("sun397.yaml", "sun397.py")},
        missing=("coder_tau",)),
    _preset(
        "ucf101", "UCF101", aliases=("ucf",), lafter_templates=UCF48,
        lafter_text_steps=TEXT_STEPS["ucf101"], nola_templates=UCF48,
        latteclip_template="a photo of a person doing {}",  # no full stop in abo.py
        latteclip_epochs=50, latteclip_warmup_steps=20, coder_templates="ucf101",
        few_shot_init=FEW_SHOT_INIT["ucf101"], tip_templates=("a photo of a person doing {}.",),
        augment_passes=20,
        sources={**_LAFTER, **_NOLA, **_latte("UCF101Dataset", "ucf101"),
                 **_coder("ucf101.yaml", "ucf101.py")},
        missing=("coder_tau",)),
    _preset(
        "cifar10", "CIFAR-10", aliases=("cifar10local",), lafter_templates=CIFAR10_18,
        lafter_text_steps=TEXT_STEPS["cifar10"], nola_templates=CIFAR10_18,
        sources={**_LAFTER, **_NOLA},
        missing=(*_NO_LATTE, "coder_templates", "coder_tau", *_NO_FEW_SHOT)),
    _preset(
        "cifar100", "CIFAR-100", aliases=("cifar100local",), lafter_templates=CIFAR100_81,
        lafter_text_steps=TEXT_STEPS["cifar100"], nola_templates=CIFAR100_81,
        sources={**_LAFTER, **_NOLA},
        missing=(*_NO_LATTE, "coder_templates", "coder_tau", *_NO_FEW_SHOT)),
    _preset(
        "places365", "Places365", aliases=("places", "places-365"), coder_templates="places365",
        coder_tau=TAU["places365"],
        sources={"coder_templates": CODER_TEMPLATE_SRC, "coder_tau": CODER_TAU_SRC},
        missing=("lafter_templates", "lafter_text_steps", "nola_templates", *_NO_LATTE,
                 *_NO_FEW_SHOT)),
    _preset(
        "cub200", "CUB-200", aliases=("cub", "cub-200", "cub2002011"), coder_templates="cub200",
        coder_tau=TAU["cub200"],
        sources={"coder_templates": CODER_TEMPLATE_SRC, "coder_tau": CODER_TAU_SRC},
        missing=("lafter_templates", "lafter_text_steps", "nola_templates", *_NO_LATTE,
                 *_NO_FEW_SHOT)),
]}

#: LatteCLIP's domain-specific data sets (``scripts/unsupervised/*.sh``).
LATTECLIP_DATASETS = ("caltech101", "dtd", "eurosat", "fgvc_aircraft", "flowers102", "food101",
                      "oxford_pets", "stanford_cars", "sun397", "ucf101")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).strip().lower()


_INDEX: dict[str, str] = {}
for _p in PRESETS.values():
    for _a in (_p.name, _p.title, *_p.aliases):
        _INDEX.setdefault(_key(_a), _p.name)


def known() -> list[str]:
    """The preset names, sorted."""
    return sorted(PRESETS)


def lookup(name: str | None) -> DatasetPreset | None:
    """The preset for ``name`` (its name, title or an alias; case, ``_``, ``-`` and spaces
    ignored), or None."""
    if not name:
        return None
    hit = _INDEX.get(_key(name))
    return PRESETS[hit] if hit else None


def get_preset(name: str) -> DatasetPreset:
    """:func:`lookup`, raising :class:`~nolabels.errors.InputError` listing the known
    names for an unknown one."""
    p = lookup(name)
    if p is None:
        raise InputError(f"unknown --dataset {name!r}; known: {', '.join(known())}")
    return p


#: ``nolabels tune`` methods -> {config field: preset field}.
TUNE_FIELDS: dict[str, dict[str, str]] = {
    "lafter": {"templates": "lafter_templates", "text_steps": "lafter_text_steps",
               "amp": "lafter_amp"},
    "nola": {"templates": "nola_templates", "amp": "nola_amp"},
    "latteclip": {"template": "latteclip_template", "epochs": "latteclip_epochs",
                  "warmup_steps": "latteclip_warmup_steps",
                  "weight_decay": "latteclip_weight_decay"},
    "cde": {"templates": "nola_templates"},
    "zeroshot": {"templates": "lafter_templates"},
}


def tune_values(preset: DatasetPreset, method: str) -> dict[str, Any]:
    """The config values ``preset`` gives ``method`` (``{}`` for fields without a value;
    zeroshot falls back to ``tip_templates``). Template tuples become lists."""
    out: dict[str, Any] = {}
    for cfg_field, pf in TUNE_FIELDS.get(method, {}).items():
        v = getattr(preset, pf)
        if v is None and method == "zeroshot" and cfg_field == "templates":
            v = preset.tip_templates
        if v is not None:
            out[cfg_field] = list(v) if isinstance(v, tuple) and cfg_field == "templates" else v
    return out


def apply_to_config(cfg: Any, preset: DatasetPreset | None, method: str,
                    explicit: Mapping[str, Any] = ()) -> list[str]:
    """Set ``preset``'s values for ``method`` on ``cfg`` (a method config dataclass), except
    the fields in ``explicit`` (flags given by the user, applied afterwards by the caller).

    Returns:
        log lines: what was applied (with sources), what was kept generic and why.
    """
    if preset is None:
        return ["no --dataset: generic defaults"]
    vals = tune_values(preset, method)
    said = []
    for k, v in vals.items():
        pf = TUNE_FIELDS[method][k]
        shown = f"{len(v)} templates" if isinstance(v, list) else repr(v)
        if k in explicit:
            said.append(f"{k}: the flag's value (preset {shown} not used)")
            continue
        if cfg is not None and hasattr(cfg, k):
            setattr(cfg, k, v)
        src = preset.source(pf) or preset.source("tip_templates")
        said.append(f"{k}={shown} ({src})")
    gaps = [f for f, pf in TUNE_FIELDS.get(method, {}).items()
            if f not in vals and pf in preset.missing]
    lines = [f"--dataset {preset.name}: " + ("; ".join(said) if said else "nothing for "
                                              f"--method {method}")]
    if gaps:
        lines.append(f"--dataset {preset.name}: the authors' code has no {', '.join(gaps)} for "
                     f"{preset.title} (--method {method}): generic defaults kept")
    return lines


def coder_values(preset: DatasetPreset | None) -> dict[str, Any]:
    """CODER's settings from ``preset`` (``{}`` for None): ``templates`` (a
    :data:`nolabels.methods.coder.TEMPLATES` name), ``tau``, ``few_shot_init`` (β, α),
    ``zs_templates`` (``{c}`` form, for ``nolabels coder``) and ``augment_passes``."""
    if preset is None:
        return {}
    out = {"templates": preset.coder_templates, "tau": preset.coder_tau,
           "few_shot_init": preset.few_shot_init,
           "zs_templates": None if preset.tip_templates is None
           else [t.replace("{}", "{c}") for t in preset.tip_templates],
           "augment_passes": preset.augment_passes}
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["LATTECLIP_DATASETS", "PRESETS", "TUNE_FIELDS", "DatasetPreset", "apply_to_config",
           "coder_values", "get_preset", "known", "lookup", "tune_values"]
