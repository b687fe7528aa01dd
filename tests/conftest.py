"""Test configuration shared by every test file.

Triton kernels run on the CPU through the interpreter in CI: TRITON_INTERPRET
must be set before triton (or any nolabels Triton kernel) is imported. On a GPU
machine set NOLABELS_TEST_GPU=1 to run the Triton kernels compiled instead.
"""
import os

if os.environ.get("NOLABELS_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen():
    """A seeded CPU generator: fresh random inputs per test, reproducible runs."""
    return torch.Generator().manual_seed(int(os.environ.get("NOLABELS_TEST_SEED", "1234")))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A tiny open_clip model config (32 px ViT, 32-d embeddings), one per test module."""
    from _pipeline_helpers import tiny_config

    return tiny_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def tiny(cfg):
    """The tiny random-init open_clip encoder of :func:`cfg`."""
    from _pipeline_helpers import tiny_spec
    from nolabels.models import load_encoder

    return load_encoder(tiny_spec(cfg))
