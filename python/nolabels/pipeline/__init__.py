"""Pipelines behind nolabels.api: embed, label, evaluate, predict (streaming, resumable)."""
