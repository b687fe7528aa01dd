"""Pure-PyTorch reference implementations: readable, any device, float64-capable.

These are the ground truth every backend is tested against, and the ``torch``
backend of each op. They materialise intermediate matrices freely.
"""
from nolabels.reference.pseudo_label import pseudo_label_reference

__all__ = ["pseudo_label_reference"]
