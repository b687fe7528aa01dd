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


# ----------------------------------------------------------------------------- CPU kernels
# Tests of the compiled CPU kernels carry ``@pytest.mark.cpu_kernel`` (or request the
# ``cpu_kernel`` fixture). When the library did not load they are skipped, unless it was
# expected to load, and then they FAIL: a broken local build must not look green.
def cpu_kernel_expected() -> str | None:
    """Why the compiled CPU library is expected to load here, or None if it is not.

    ``NOLABELS_EXPECT_BUILD=1`` (set by .ci/run) expects it, ``=0`` does not; unset, it
    is expected when the package's build info is present (CMake built the CPU library,
    which is always part of a build) and ``NOLABELS_NO_LIBRARY=1`` did not switch it off.
    """
    flag = os.environ.get("NOLABELS_EXPECT_BUILD", "").strip()
    if flag:
        return "NOLABELS_EXPECT_BUILD=1" if flag == "1" else None
    if os.environ.get("NOLABELS_NO_LIBRARY") == "1":
        return None
    from nolabels import _lib

    if _lib.STATUS.build_info:
        return "the package's build info says the library was built"
    return None


def require_cpu_kernel() -> None:
    """Return if the compiled CPU library is loaded; else fail the test if it was
    expected (:func:`cpu_kernel_expected`), else skip it."""
    from nolabels import _lib

    st = _lib.STATUS
    if st.cpu_loaded:
        return
    why_not = st.cpu_error or "the compiled CPU library did not load"
    expected = cpu_kernel_expected()
    if expected:
        pytest.fail(f"the compiled CPU library was expected ({expected}) but did not load: "
                    f"{why_not}", pytrace=False)
    pytest.skip(why_not)


@pytest.fixture
def cpu_kernel() -> None:
    """Request in a test that needs the compiled CPU kernels (see :func:`require_cpu_kernel`)."""
    require_cpu_kernel()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_kernel: needs the compiled CPU kernels (skipped without them, failed "
                   "when the build was expected: NOLABELS_EXPECT_BUILD=1 or build info present)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cpu_kernel") is not None:
        require_cpu_kernel()


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
