"""Shared fixtures for the method tests: a tiny random-init open_clip ViT (width 64,
2 layers, 32 px images, patch 8), a small class-tinted image folder embedded into a
store, and the tuning data read from it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from _pipeline_helpers import CLASSES, make_folder, tiny_config, tiny_spec


@dataclass
class Tiny:
    root: Path
    images: Path
    store: Path
    spec: str
    encoder: object
    classes: list


def tiny_setup(dirpath: Path, per_class: int = 8, seed: int = 0) -> Tiny:
    """Images -> store with the tiny model; returns the pieces (model loaded on CPU)."""
    from nolabels.commands.embed import embed
    from nolabels.models import load_encoder

    dirpath = Path(dirpath)
    cfg = tiny_config(dirpath)
    images = make_folder(dirpath / "imgs", per_class=per_class, seed=seed)
    spec = tiny_spec(cfg)
    enc = load_encoder(spec)
    embed(str(images), enc, dirpath / "store", workers=0, quiet=True)
    return Tiny(dirpath, images, dirpath / "store", spec, enc, list(CLASSES))
