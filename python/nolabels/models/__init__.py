"""Models: image/text encoders behind one interface, and prompted open_clip towers.

``load_encoder(spec)`` builds an :class:`Encoder` from ``openclip:ARCH/TAG``,
``openclip:ARCH`` + checkpoint, ``timm:NAME`` (e.g. DINO) or the offline
``surrogate:effnet-lite0+minilm`` (ConSE, **not CLIP**). Heavy dependencies
(open_clip, timm, sentence-transformers) are imported only when a model is built.
"""
from nolabels.models.base import (
    Encoder,
    WeightsUnavailableError,
    load_encoder,
    register_encoder,
)
from nolabels.models.prompted_vit import PromptedVisionTransformer

# The built-in kinds, named lazily: each module is imported when its first model is built.
register_encoder("openclip", "nolabels.models.clip:from_spec")
register_encoder("timm", "nolabels.models.dino:from_spec")
register_encoder("surrogate", "nolabels.models.surrogate:from_spec")

__all__ = ["Encoder", "PromptedVisionTransformer", "WeightsUnavailableError", "load_encoder",
           "register_encoder"]
