"""Every op under ``torch.compile(fullgraph=True)`` with the *default* Inductor backend on
CPU tensors (torch and cpu backends) gives the eager result. (The per-op test files check
``aot_eager``; Inductor additionally lowers the surrounding arithmetic to generated C++,
so the custom ops' fake implementations and registrations must hold up there too.)"""
from __future__ import annotations

import pytest
import torch
from nolabels.ops import (
    coder_affinity,
    coder_class_scores,
    prompt_attention,
    pseudo_label,
    topk_similarity,
)

CPU_BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.cpu_kernel)]  # conftest's rule


def _compiled(f):
    torch._dynamo.reset()
    return torch.compile(f, fullgraph=True)  # default backend: inductor


def _unit(gen, n, d):
    return torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pseudo_label_inductor(gen, backend):
    x, w = _unit(gen, 21, 12), _unit(gen, 5, 12)

    def f(a, b):
        pl = pseudo_label(a * 2.0 + 0.5, b, topk=2, backend=backend)
        return pl.probs.sum(dim=1) + pl.entropy.exp(), pl.labels, pl.lse

    got, want = _compiled(f)(x, w), f(x, w)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_similarity_inductor(gen, backend):
    q, keys = _unit(gen, 9, 12), _unit(gen, 50, 12)

    def f(a, b):
        v, i = topk_similarity(a.abs() + 0.1, b, 4, backend=backend)
        return v.cumsum(dim=1), i

    got, want = _compiled(f)(q, keys), f(q, keys)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_coder_ops_inductor(gen, backend):
    x, t = _unit(gen, 9, 12), _unit(gen, 30, 12)
    cls = torch.arange(30) % 5
    kind = (torch.arange(30) % 3 == 0).to(torch.int64)

    def f(a, txt):
        s = coder_class_scores(a * 2.0, txt, cls, kind, 5, backend=backend)
        return s.softmax(dim=1), coder_affinity(a, a[:3] - 1.0, txt, backend=backend) * 3

    got, want = _compiled(f)(x, t), f(x, t)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_prompt_attention_inductor(gen):
    b, n, h, d, p = 2, 9, 2, 16, 3
    q, k, v = (torch.randn(b, n, h, d, generator=gen) for _ in range(3))
    pk, pv = (torch.randn(p, h, d, generator=gen) for _ in range(2))

    def f(q, k, v, pk, pv):
        return prompt_attention(q * 1.5, k, v, pk, pv, backend="torch").sin()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    leaves2 = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    got, want = _compiled(f)(*leaves), f(*leaves2)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    want.square().sum().backward()
    for a, b_ in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, b_.grad)
