"""Backends declare what they take as data; dispatch and ``nolabels info`` read it.

CPU-only here: the CUDA rows are tested by faking a visible GPU (device count,
properties, compute capability) with monkeypatch.
"""
from __future__ import annotations

import types

import pytest
import torch
from nolabels import backends
from nolabels.backends import ANY_DEVICE, BackendImpl, define_op, dispatch
from nolabels.ops import prompt_attention, pseudo_label
from nolabels.ops._validate import SUPPORTED_DTYPES
from nolabels.ops.pseudo_label import PSEUDO_LABEL
from nolabels.reference.attention import prompt_attention_reference

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)


def _never(*args):
    raise AssertionError("not to be run")


# ----------------------------------------------------------------------------- reasons
def test_reasons_are_derived_from_the_declared_fields():
    b = BackendImpl("cuda", _never, devices=("cuda",), dtypes=(torch.float32,),
                    max={"k": 8}, choices={"head_dim": (16, 32)})
    call = {"device": CPU, "dtype": torch.bfloat16, "k": 9, "head_dim": 24}
    why = b.not_supported_reasons(call)
    assert why == [
        "the cuda backend takes CUDA tensors, got cpu",
        "dtype bfloat16 is not one of float32",
        "k=9 > 8",
        "head dim 24 is not one of (16, 32)",
    ]
    # the same call within every declared field: no reason
    wide = BackendImpl("torch", _never, devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES,
                       max={"k": 9}, choices={"head_dim": (24,)})
    assert wide.not_supported_reasons(call) == []
    # keys absent from the call are not checked
    assert b.not_supported_reasons({"device": GPU}) == []


def test_requirements_are_reasons(monkeypatch):
    lib = BackendImpl("cpu", _never, devices=("cpu",), dtypes=SUPPORTED_DTYPES,
                      needs=("library",), kernel="no_such_kernel")
    monkeypatch.setattr(backends, "library_cpu_status", lambda: None)
    assert lib.not_supported_reasons({"device": CPU}) == [
        "the loaded library has no CPU kernel for no_such_kernel (rebuild: scripts/dev_build.sh)"
    ]
    monkeypatch.setattr(backends, "library_cpu_status", lambda: "disabled for the test")
    assert lib.available() == "disabled for the test"
    tri = BackendImpl("triton", _never, devices=("cuda",), dtypes=SUPPORTED_DTYPES, needs=("triton",))
    monkeypatch.setattr(backends, "triton_status", lambda: "triton is not importable (test)")
    assert tri.not_supported_reasons({"device": GPU}) == ["triton is not importable (test)"]


def test_triton_cpu_tensors_only_under_the_interpreter_and_never_for_auto(monkeypatch):
    tri = BackendImpl("triton", _never, devices=("cuda",), dtypes=SUPPORTED_DTYPES, needs=("triton",))
    torch_b = BackendImpl("torch", lambda: "ran", devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES)
    monkeypatch.setattr(backends, "triton_status", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tri.not_supported_reasons({"device": CPU}) == []
    assert dispatch("op", (tri, torch_b), "auto", CPU, {"device": CPU}) is torch_b
    assert dispatch("op", (tri, torch_b), "triton", CPU, {"device": CPU}) is tri
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in tri.not_supported_reasons({"device": CPU})[0]


def test_define_op_checks_names():
    with pytest.raises(ValueError, match="not one of"):
        BackendImpl("faiss", _never, devices=("cpu",), dtypes=SUPPORTED_DTYPES)
    b = BackendImpl("torch", _never, devices=(ANY_DEVICE,), dtypes=SUPPORTED_DTYPES)
    with pytest.raises(ValueError, match="repeat"):
        define_op("twice", (b, b))


# ----------------------------------------------------------------------------- capability
def _fake_gpu(monkeypatch, cap, name="Tesla T4"):
    """A visible cuda:0 with compute capability ``cap``, the CUDA library loaded with
    every kernel, a new enough driver."""
    props = types.SimpleNamespace(name=name, major=cap[0], minor=cap[1], total_memory=16 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)
    monkeypatch.setattr(backends, "_cuda_library_problem", lambda: None)
    monkeypatch.setattr(backends, "triton_status", lambda: None)
    for key in list(backends._HAS_KERNEL):
        monkeypatch.setitem(backends._HAS_KERNEL, key, True)


def test_old_gpu_falls_back_instead_of_failing(monkeypatch):
    """sm_75 (T4): below the SMs the CUDA kernels are built for and below Triton's
    supported GPUs, so auto takes the torch backend and an explicit cuda says why."""
    _fake_gpu(monkeypatch, (7, 5))
    call = {"device": GPU, "dtype": torch.float16, "topk": 1}
    assert PSEUDO_LABEL.select("auto", call).name == "torch"
    with pytest.raises(ValueError, match=r"cuda:0 \(Tesla T4\) has compute capability 7.5 < 8.0"):
        PSEUDO_LABEL.select("cuda", call)
    # the same call on an sm_90 GPU: the CUDA kernels; past their top-k limit: Triton's
    # does not take it either (16), so torch
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    assert PSEUDO_LABEL.select("auto", call).name == "cuda"
    assert PSEUDO_LABEL.select("auto", {**call, "topk": 17}).name == "torch"


# ----------------------------------------------------------------------------- NOLABELS_BACKEND
def test_env_backend_is_a_preference(monkeypatch, gen):
    q, k, v = (torch.randn(1, 5, 2, 8, generator=gen) for _ in range(3))
    monkeypatch.setenv("NOLABELS_BACKEND", "cpu")  # prompt_attention has no cpu backend
    torch.testing.assert_close(prompt_attention(q, k, v), prompt_attention_reference(q, k, v))
    x, w = torch.randn(6, 8, generator=gen), torch.randn(3, 8, generator=gen)
    call = {"device": CPU, "dtype": torch.float32, "topk": 1}
    if PSEUDO_LABEL.backend("cpu").available() is None:
        assert PSEUDO_LABEL.select("auto", call).name == "cpu"  # pseudo_label has it
    monkeypatch.setenv("NOLABELS_BACKEND", "torch")
    assert PSEUDO_LABEL.select("auto", call).name == "torch"
    monkeypatch.setenv("NOLABELS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="NOLABELS_BACKEND='tpu' is not a backend"):
        pseudo_label(x, w)


def test_explicit_backend_wins_over_env(monkeypatch):
    monkeypatch.setenv("NOLABELS_BACKEND", "cuda")
    call = {"device": CPU, "dtype": torch.float32, "topk": 1}
    assert PSEUDO_LABEL.select("torch", call).name == "torch"


# ----------------------------------------------------------------------------- nolabels info
def test_info_lists_every_reason_per_op_and_device(monkeypatch, capsys):
    from nolabels.backends import OP_REGISTRY
    from nolabels.cli import main

    _fake_gpu(monkeypatch, (7, 5))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0 Tesla T4 sm_75" in out
    for op, impls in OP_REGISTRY.items():
        block = out.split(f"op {op}:\n", 1)[1].split("\nop ", 1)[0]
        for b in impls:
            assert f"  {b.name:7s} {b.declared()}" in block
            for dev in (CPU, GPU):
                why = b.not_supported_reasons({"device": dev})
                line = f"    {str(dev):8s} " + ("ok" if not why else "no: " + "; ".join(why))
                assert line in block, (op, b.name, dev)
    pl = out.split("op pseudo_label:\n", 1)[1]
    assert "compute capability 7.5 < 8.0" in pl
    assert "triton takes CPU tensors only under TRITON_INTERPRET=1" in pl


def test_info_json_has_the_table(monkeypatch):
    from nolabels.info import info_dict

    _fake_gpu(monkeypatch, (7, 5))
    table = info_dict()["backends"]["topk_similarity"]
    assert list(table) == ["cuda", "triton", "cpu", "torch"]  # auto's order
    assert table["torch"]["devices"] == {"cpu": [], "cuda:0": []}
    assert any("7.5 < 8.0" in r for r in table["cuda"]["devices"]["cuda:0"])
    assert "k <= 1024" in table["cuda"]["declares"]


# ----------------------------------------------------------------------------- Triton helpers
def test_triton_host_code_asks_the_kernel_not_the_environment(monkeypatch):
    """The kernels were defined under TRITON_INTERPRET=1 (tests/conftest.py): their
    launch parameters stay the interpreter's when the variable changes later."""
    pytest.importorskip("triton")
    import nolabels.triton.attention as att
    from nolabels.triton import interpret
    from nolabels.triton._common import interpreted

    if not interpreted(att._fwd):
        pytest.skip("kernels compiled for a GPU (NOLABELS_TEST_GPU=1)")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpret()
    assert att.fwd_config(64, torch.float32)["BLOCK_M"] == 16  # the interpreter's blocks
    assert att._rne(torch.bfloat16) and att._f32_dots(torch.bfloat16)


def test_auto_without_a_fit_lists_every_backend():
    cuda_only = BackendImpl("cuda", _never, devices=("cuda",), dtypes=SUPPORTED_DTYPES, max={"k": 4})
    f32_only = BackendImpl("torch", _never, devices=(ANY_DEVICE,), dtypes=(torch.float32,))
    call = {"device": CPU, "dtype": torch.float16, "k": 5}
    with pytest.raises(ValueError, match="no backend can take this call") as e:
        dispatch("op", (cuda_only, f32_only), "auto", CPU, call)
    assert "cuda: the cuda backend takes CUDA tensors, got cpu; k=5 > 4" in str(e.value)
    assert "torch: dtype float16 is not one of float32" in str(e.value)
