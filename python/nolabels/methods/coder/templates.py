"""CODER's per-dataset tables: the text templates, CODER*'s τ and few-shot (β, α).

Follows Yi et al., CVPR 2024 (methods.md §5.2) and YCaigogogo/CVPR24-CODER
``CODER/template.py``, ``utils.py: get_thres`` and ``configs/*.yaml``.
"""
from __future__ import annotations

#: Template sets by name (methods.md §5.2, the authors' ``CODER/template.py``). Each maps a
#: text type to a list of format strings with fields {c} (class), {a} (attribute),
#: {x} (analogous class), {o} (the other class of a one-vs-one pair).
_OVO_GENERIC = [
    "Because of {a}, {c} is different from {o}.",
    "{c} is characterized by a distinct {a}, while {o} isn't.",
    "The distinctive way in which {c} handles {a} separates it significantly from {o}.",
    "{c} stands out in {a} compared to {o}.",
    "The way {c} approaches {a} distinguishes it from {o}.",
    "In {a} expression, {c} deviates from {o}.",
    "Differences in {a} usage separate {c} from {o}.",
]

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "default": {
        "name": ["a photo of {c}"],
        "att": ["{c} which has {a}"],
        "ana": ["a {c} similar to {x}."],
        "ovo": _OVO_GENERIC,
    },
    "eurosat": {
        "name": ["a photo of {c}, satellite domain."],
        "att": ["A satellite photo of {c} which has {a}."],
        "ana": ["A satellite photo of a {c} similar to {x}."],
        "ovo": [
            "The unique utilization of {a} in satellite photos makes {c} different from {o}.",
            "Differences in {a} representation separate {c} in satellite photos from {o}.",
            ("Contrasting {c} and {o} in satellite photos reveals notable differences in the "
             "representation of {a}."),
            "{c} and {o} showcase distinct visual features when it comes to {a} in satellite imagery.",
            ("The comparison of {c} and {o} in satellite photos underscores variations in the "
             "depiction of {a}."),
            ("In the context of satellite imagery, differences emerge between {c} and {o} in how "
             "they capture {a}."),
            ("Analyzing satellite photos highlights disparities in the portrayal of {a} between "
             "{c} and {o}."),
            ("{c} and {o} exhibit contrasting visual interpretations when representing {a} in "
             "satellite imagery."),
        ],
    },
    "oxford_pets": {
        "name": ["a photo of a {c}, a type of pet."],
        "att": ["A pet photo of {c} which has {a}."],
        "ana": ["A pet photo of a {c} similar to {x}."],
        "ovo": [
            ("A {c}, a species of pet, can be distinguished from a {o}, a species of pet, by the "
             "characteristics of {a}"),
            "Because of {a}, a {c}, a kind of pet, is different from a {o}, a kind of pet.",
            ("Due to their {a}, a {c}, a pet type, displays a different demeanor compared to a {o}, "
             "another pet type."),
            ("Because of their {a}, a {c}, a kind of pet, differs significantly from a {o}, a kind "
             "of pet."),
        ],
    },
    "food101": {
        "name": ["a photo of {c}, a type of food."],
        "att": ["A food photo of {c} which has {a}."],
        "ana": ["A food photo of a {c} similar to {x}."],
        "ovo": [
            "While both are popular dishes, {c} is notably different from {o} in that {a}.",
            "While both are popular snacks, {c} is notably different from {o} in that {a}.",
            "While both are popular dessert, {c} is notably different from {o} in that {a}.",
            "In terms of food aspects, a food photo of {c}, which has {a}, differs from {o}.",
        ],
    },
    "dtd": {
        "name": ["a photo of {c}"],
        "att": ["The texture of {c} is characterized by its {a} feature."],
        "ana": ["The texture of {c} bears a likeness to that of {x} ."],
        "ovo": [  # the authors' list misses a comma after the first entry (fixed here)
            "{c}, a type of texture, exhibits a unique {a} that sets it apart from {o}.",
            "Because of {a}, {c} is different from {o}.",
            "In handling {a}, {c} differs distinctly from {o}.",
            "In {a} expression, {c} deviates from {o}.",
        ],
    },
    "oxford_flowers": {
        "name": ["a photo of a {c}, a type of flower."],
        "att": ["{c} which has {a}"],
        "ana": ["a {c} similar to {x}."],
        "ovo": _OVO_GENERIC,
    },
    "fgvc_aircraft": {
        "name": ["a photo of a {c}, a type of aircraft."],
        "att": ["{c} which has {a}"],
        "ana": ["a {c} similar to {x}."],
        "ovo": _OVO_GENERIC,
    },
    "ucf101": {
        "name": ["a photo of a person doing {c}."],
        "att": ["{c} which has {a}"],
        "ana": ["a {c} similar to {x}."],
        "ovo": _OVO_GENERIC,
    },
    "places365": {
        "name": ["a photo of {c}"],
        "att": ["{c} which has {a}"],
        "ana": ["a {c} similar to {x}."],
        "ovo": [
            ("{c}, a type of places, can be distinguished from {o}, a type of places, by the "
             "characteristics of {a}"),
            "Because of {a}, {c}, a type of places, is different from {o}, a type of places.",
        ],
    },
    "cub200": {
        "name": ["a photo of {c}"],
        "att": ["{c} which has {a}"],
        "ana": ["a {c} similar to {x}."],
        "ovo": [
            "{c}, a type of bird, can be distinguished from {o} by the characteristics of {a}",
            "Because of {a}, {c}, a type of bird, is different from {o}.",
            "{c}, a type of bird, exhibits a unique {a} that sets it apart from {o}.",
            "{c}, a type of bird, uses {a} in a way that differs from {o}, making it distinctive.",
            "The unique expression of {a} is what separates {c}, a type of bird, from {o}.",
            "In handling {a}, {c}, a type of bird, differs distinctly from {o}.",
            "{c}, a type of bird, stands out in {a} compared to {o}.",
            "The way {c}, a type of bird, approaches {a} distinguishes it from {o}.",
            "In {a} expression, {c}, a type of bird, deviates from {o}.",
            "Unique {a} utilization makes {c}, a type of bird, different from {o}.",
            "Differences in {a} usage separate {c}, a type of bird, from {o}.",
        ],
    },
}
_ALIASES = {
    "imagenet": "default", "imagenet-v2": "default", "imagenet_v2": "default",
    "caltech101": "default", "caltech-101": "default", "cifar10": "default", "cifar-10": "default",
    "oxford-pet": "oxford_pets", "oxford_pet": "oxford_pets", "pets": "oxford_pets",
    "food-101": "food101", "food": "food101", "flowers": "oxford_flowers", "aircraft": "fgvc_aircraft",
    "places-365": "places365", "cub": "cub200", "cub-200": "cub200",
}
#: In the few-shot task the authors use the generic attribute/analogous templates for these.
_FEW_SHOT_GENERIC_ATT = {"oxford_pets", "dtd"}

#: CODER* gap threshold τ per dataset (YCaigogogo/CVPR24-CODER ``utils.py: get_thres``; the
#: authors tuned no τ for Aircraft, Cars, Flowers, SUN397 or UCF101: not found there).
TAU: dict[str, float] = {
    "imagenet": 0.1, "imagenet-v2": 0.05, "places365": 0.1, "caltech101": 0.3, "dtd": 0.6,
    "cub200": 0.2, "eurosat": 0.3, "food101": 0.1, "oxford_pets": 0.1,
}
#: τ for a dataset the authors did not tune: 0.1, the value of ImageNet, Places, Food and Pets.
DEFAULT_TAU = 0.1

#: Few-shot initial (β, α) per dataset: ``init_beta``, ``init_alpha`` of
#: YCaigogogo/CVPR24-CODER ``configs/<yaml>`` (file named per entry).
FEW_SHOT_INIT: dict[str, tuple[float, float]] = {
    "imagenet": (72.0, 1.66),  # imagenet.yaml
    "dtd": (30.18, 2.57),  # dtd.yaml
    "eurosat": (91.34, 1.73),  # eurosat.yaml
    "caltech101": (24.76, 100.0),  # caltech-101.yaml
    "fgvc_aircraft": (96.0, 9.775),  # fgvc.yaml
    "oxford_pets": (26.0, 1.0),  # oxford-pet.yaml
    "flowers102": (38.0, 4.37),  # oxford_flowers.yaml
    "stanford_cars": (23.5, 1.5),  # stanford_cars.yaml
    "sun397": (43.57, 1.18),  # sun397.yaml
    "ucf101": (49.51, 2.0),  # ucf101.yaml
    "food101": (1.0, 1.0),  # food101.yaml (the authors' own value, not a fallback)
}
DEFAULT_FEW_SHOT_INIT = (1.0, 1.0)


def _canon(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    d = dataset.strip().lower()
    hit = {"oxford-pet": "oxford_pets", "oxford_pet": "oxford_pets", "places-365": "places365",
           "caltech-101": "caltech101", "food-101": "food101", "cub": "cub200",
           "imagenet_v2": "imagenet-v2"}.get(d)
    if hit is None:  # the preset names and aliases (flowers, aircraft, cars, ...)
        from nolabels.methods.presets import lookup

        p = lookup(d)
        hit = p.name if p is not None else d
    return hit


def template_set(name: str | None) -> dict[str, list[str]]:
    """The template set for a dataset name ("default" for None / unknown names)."""
    if name is None:
        return TEMPLATES["default"]
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return TEMPLATES.get(key, TEMPLATES["default"])


def default_tau(dataset: str | None) -> float:
    """CODER*'s τ for ``dataset`` (:data:`TAU`), else :data:`DEFAULT_TAU`."""
    return TAU.get(_canon(dataset) or "", DEFAULT_TAU)
