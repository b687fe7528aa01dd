"""Image decoding and evaluation-time preprocessing.

Encoders bring their own preprocessing (``Encoder.transform``); this module holds
what is shared: robust decoding to RGB and a plain resize / centre-crop / normalise
transform for models without one.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

#: the colour transparent pixels are composited over (what a viewer shows on a white page)
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im):
    """A PIL image of any mode -> an 8-bit RGB image with the same appearance.

    * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer ``I``
      (how Pillow opens 16-bit PNG, TIFF, PGM): the 0..65535 range is scaled to 0..255
      (``round(v / 257)``; values outside it are clipped), not clipped at 255.
      16-bit colour PNGs are opened by Pillow as 8-bit ``RGB``/``RGBA`` already.
    * ``F`` (float): values in [0, 1] when the maximum is at most 1 (scaled by 255),
      else taken as 0..255 (clipped).
    * Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent palette entry,
      premultiplied ``RGBa``/``La``): composited over :data:`BACKGROUND` (white).
    * ``CMYK``: Pillow's conversion, ``R = (255 - C) (255 - K) / 255`` (no ICC profile).
    * ``1``, ``L``, ``P``, ``YCbCr``, ...: Pillow's conversion.
    """
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT or mode == "F":
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        else:
            a = a / 257.0
        a8 = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "PA", "RGBa"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        bg = Image.new("RGBA", im.size, (*BACKGROUND, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes):
    """Encoded bytes -> PIL RGB image, fully decoded (modes converted by :func:`to_rgb`).

    Raises (and the embedding loop records the reason) on corrupt, truncated or
    unsupported data: PIL's ``UnidentifiedImageError``, ``OSError`` ("image file is
    truncated"), ``DecompressionBombError`` for absurdly large images.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        out = to_rgb(im)
        return out.copy() if out is im else out


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
