"""Public kernels. Each op validates its arguments, picks a backend
(``backend="auto"|"torch"|"cpu"|"triton"|"cuda"``) and runs as a
``torch.library`` custom op, so it works inside ``torch.compile(fullgraph=True)``.
"""
from nolabels.ops.attention import prompt_attention
from nolabels.ops.coder import coder_affinity, coder_class_scores, topk_similarity
from nolabels.ops.pseudo_label import PseudoLabels, Selection, pseudo_label, select_per_class

__all__ = [
    "PseudoLabels", "Selection", "pseudo_label", "select_per_class",
    "coder_affinity", "coder_class_scores", "topk_similarity",
    "prompt_attention",
]
