"""Image decoding and evaluation-time preprocessing.

Encoders bring their own preprocessing (``Encoder.transform``); this module holds
what is shared: robust decoding to RGB and a plain resize / centre-crop / normalise
transform for models without one.
"""
from __future__ import annotations

import io
from collections.abc import Sequence


def decode_image(data: bytes):
    """Encoded bytes -> PIL RGB image, fully decoded.

    Raises (and the embedding loop records the reason) on corrupt, truncated or
    unsupported data: PIL's ``UnidentifiedImageError``, ``OSError`` ("image file is
    truncated"), ``DecompressionBombError`` for absurdly large images.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def eval_transform(size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                   std: Sequence[float] = (0.5, 0.5, 0.5), resize: int | None = None,
                   interpolation: str = "bicubic"):
    """PIL RGB -> (3, size, size) float32: resize the short side to ``resize``
    (default ``size * 8 // 7``), centre-crop ``size``, scale to [0, 1], normalise."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    return T.Compose([
        T.Resize(resize or size * 8 // 7, interpolation=mode),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])
