"""nolabels: label-free classification with CLIP, and the fused kernels behind it.

Quick start::

    import nolabels
    nolabels.info()                                   # versions, devices, backends
    pl = nolabels.ops.pseudo_label(img_emb, cls_emb, topk=3)
"""
from nolabels import ops
from nolabels.info import info

__version__ = "0.1.0"
__all__ = ["ops", "info", "__version__"]
