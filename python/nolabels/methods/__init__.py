"""Label-free methods. ``zeroshot``: prompt-template ensembles and CDE class embeddings."""
