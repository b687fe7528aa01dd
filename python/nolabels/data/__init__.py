"""Data: image readers (folder, list file, webdataset tars) and the embedding store.

``open_source(spec)`` lists images; ``EmbeddingStore`` holds float16 L2-normalised
embedding shards + Parquet metadata + ``manifest.json`` (resumable, atomic writes).
pyarrow and pillow are needed (``pip install 'nolabels[data]'``).
"""
from nolabels.data.readers import ImageDataset, ImageSource, collate, open_source
from nolabels.data.store import EmbeddingStore, StoreMismatchError

__all__ = [
           "EmbeddingStore",
           "ImageDataset",
           "ImageSource",
           "StoreMismatchError",
           "collate",
           "open_source",
]
