"""Models: image/text encoders behind one interface, and prompted open_clip towers.

``load_encoder(spec)`` builds an :class:`Encoder` from ``openclip:ARCH/TAG``,
``openclip:ARCH`` + checkpoint, ``timm:NAME`` (e.g. DINO) or the offline
``surrogate:effnet-lite0+minilm`` (ConSE, **not CLIP**). Heavy dependencies
(open_clip, timm, sentence-transformers) are imported only when a model is built.
"""
from nolabels.models.base import Encoder, WeightsUnavailableError, load_encoder
from nolabels.models.prompted_vit import PromptedVisionTransformer

__all__ = ["Encoder", "PromptedVisionTransformer", "WeightsUnavailableError", "load_encoder"]
