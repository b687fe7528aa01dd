"""conftest's rule for the CPU-kernel tests: skipped when the compiled library is absent,
failed (an error in setup) when it was expected to load (``NOLABELS_EXPECT_BUILD=1``, or build info present
for a library that then did not load) — a broken local build must not look green."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

INNER = """
import pytest
{prelude}

@pytest.mark.cpu_kernel
def test_marked():
    pass

def test_fixture(cpu_kernel):
    pass
"""

BROKEN = """
from nolabels import _lib
_lib.STATUS.cpu_path = "/somewhere/_C.so"
_lib.STATUS.cpu_error = "failed to load _C.so: simulated"
_lib.STATUS.build_info = {"torch_build_version": "2.14.1"}
"""


def _run(tmp_path: Path, env: dict, prelude: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(INNER.format(prelude=prelude))
    e = {k: v for k, v in os.environ.items()
         if k not in ("NOLABELS_EXPECT_BUILD", "NOLABELS_NO_LIBRARY", "PYTEST_ADDOPTS")}
    e.update(env)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), e.get("PYTHONPATH", "")])
    # tests/conftest.py as a plugin: the rule under test, not a copy of it
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-rfEs",
                           "--rootdir", str(tmp_path), "-p", "no:cacheprovider",
                           str(tmp_path / "test_inner.py")],
                          env=e, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)


def test_expected_build_that_did_not_load_fails(tmp_path):
    r = _run(tmp_path, {"NOLABELS_NO_LIBRARY": "1", "NOLABELS_EXPECT_BUILD": "1"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 errors" in r.stdout  # failed in setup: red, never skipped
    assert ("the compiled CPU library was expected (NOLABELS_EXPECT_BUILD=1) but did not "
            "load: disabled by NOLABELS_NO_LIBRARY=1") in r.stdout


def test_build_info_makes_a_load_failure_fail(tmp_path):
    r = _run(tmp_path, {}, prelude=BROKEN)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 errors" in r.stdout and "failed to load _C.so: simulated" in r.stdout
    assert "build info says the library was built" in r.stdout
    r = _run(tmp_path, {"NOLABELS_EXPECT_BUILD": "0"}, prelude=BROKEN)  # explicit opt-out
    assert r.returncode == 0 and "2 skipped" in r.stdout, r.stdout + r.stderr


def test_not_expected_and_absent_skips(tmp_path):
    r = _run(tmp_path, {"NOLABELS_NO_LIBRARY": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 skipped" in r.stdout and "disabled by NOLABELS_NO_LIBRARY=1" in r.stdout


def test_loaded_library_runs_the_tests(tmp_path):
    from nolabels import _lib

    if not _lib.STATUS.cpu_loaded:
        pytest.skip(_lib.STATUS.cpu_error or "the compiled CPU library did not load")
    r = _run(tmp_path, {"NOLABELS_EXPECT_BUILD": "1"})
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout + r.stderr
