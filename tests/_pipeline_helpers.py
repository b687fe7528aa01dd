"""Shared fixtures for the pipeline tests (models, store, CLI, torchrun): tiny random
open_clip models and small image folders."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ("cat", "dog", "ship")
CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.tar.gz"


def tiny_config(dirpath: Path, name: str = "nl-tiny") -> Path:
    """Write a tiny open_clip model config (32 px ViT, 32-d embeddings); return its path."""
    p = Path(dirpath) / f"{name}.json"
    p.write_text(json.dumps(TINY_CFG))
    return p


def tiny_spec(cfg: Path) -> str:
    """A random-init spec for the tiny config."""
    return f"openclip:{cfg}/random"


def make_folder(root: Path, per_class: int = 4, size: int = 32, seed: int = 0,
                classes=CLASSES) -> Path:
    """root/<class>/<i>.png: random-noise RGB images (class-tinted), ``per_class`` each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        d = Path(root) / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            a[..., ci % 3] = np.clip(a[..., ci % 3].astype(int) + 80, 0, 255)
            Image.fromarray(a).save(d / f"{i:03d}.png")
    return Path(root)


def cifar_images(dest: Path, per_class: int = 2) -> Path:
    """The first ``per_class`` shipped demo images of each CIFAR-10 class, as a folder."""
    from nolabels.commands.demo import archive_path

    dest = Path(dest)
    counts: dict[str, int] = {}
    with tarfile.open(archive_path(), "r:gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            cls = Path(m.name).parts[-2]
            if counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            out = dest / cls / Path(m.name).name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(m).read())
    return dest
