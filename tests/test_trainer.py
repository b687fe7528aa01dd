"""The shared trainer: the methods' label-smoothed loss by hand, data plan, resume == uninterrupted,
label-free selection, gradient accumulation, bf16 autocast, DDP under torchrun."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nolabels.methods import trainer
from nolabels.methods.selection import Selector, agreement, holdout_split, mean_confidence
from nolabels.methods.trainer import (
    TrainConfig,
    TrainingInterrupted,
    TrainTask,
    fit,
    plan_epoch,
    sample_seed,
    saved_activation_bytes,
    seeded,
    split_batch,
)
from torch import nn

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- losses
def _smoothed_ce_float64(logits, target, eps):
    """methods.md §1.5 by hand in float64: eps * mean_c(-log p_c) + (1 - eps) * (-log p_y)."""
    rows = []
    for z, y in zip(logits.double().tolist(), target.tolist(), strict=True):
        lse = math.log(sum(math.exp(v) for v in z))
        lp = [v - lse for v in z]
        rows.append(eps * (-sum(lp) / len(lp)) + (1 - eps) * (-lp[y]))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("eps", [0.1, 0.0, 0.3])
def test_label_smoothing_by_hand(eps):
    """The label-smoothed CE LaFTer/NoLA train with (``F.cross_entropy(label_smoothing=eps)``
    in LaFTer's text stage, its self-training and NoLA's student) equals the float64 hand
    computation; here through LaFTer's text-classifier module (noise off)."""
    from nolabels.methods.lafter import TextClassifierModule

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    m = TextClassifierModule(emb, labels, 4, noise_std=0.0, eps=eps, seed=3)
    loss, _ = m(None)
    with torch.no_grad():
        logits = emb.double() @ m.classifier.weight.double().T
    assert loss.item() == pytest.approx(_smoothed_ce_float64(logits, labels, eps), abs=1e-6)
    # eps reaches the loss: smoothing changes it
    if eps:
        assert abs(loss.item() - _smoothed_ce_float64(logits, labels, 0.0)) > 1e-3


# --------------------------------------------------------------------------- plan
def test_plan_epoch_and_split():
    b0 = plan_epoch(20, 0, 5, 8)
    assert [len(b) for b in b0] == [8, 8, 4]
    assert sorted(p for b in b0 for p in b) == list(range(20))
    assert b0 == plan_epoch(20, 0, 5, 8)  # deterministic
    assert b0 != plan_epoch(20, 1, 5, 8)  # a new order per epoch
    assert [len(b) for b in plan_epoch(20, 0, 5, 8, drop_last=True)] == [8, 8]
    fill = [p for b in b0 for p in b]
    ranks = [split_batch(b0[0], 2, r, 2, fill) for r in range(2)]
    assert sorted(p for r in ranks for m in r for p in m) == sorted(b0[0])
    assert all(len(m) == 2 for r in ranks for m in r)
    # a batch too small for every rank and micro-batch is topped up
    tiny = split_batch([3], 2, 1, 2, fill)
    assert len(tiny) == 2 and all(len(m) == 1 for m in tiny)


def test_holdout_split_and_selector():
    tr, he = holdout_split(50, 0.1, seed=3)
    assert len(he) == 5 and len(tr) == 45
    assert sorted(torch.cat([tr, he]).tolist()) == list(range(50))
    assert torch.equal(he, holdout_split(50, 0.1, seed=3)[1])
    assert not torch.equal(he, holdout_split(50, 0.1, seed=4)[1])
    assert holdout_split(10, 0.0)[1].numel() == 0
    s = Selector("c")
    assert not s.update(-1, 0.9)  # no such epoch (epoch 0, the initial model, is a candidate)
    assert s.update(1, 0.5) and not s.update(2, 0.5) and s.update(3, 0.7)
    assert not s.update(4, float("nan"))
    assert (s.best_epoch, s.best_score) == (3, 0.7)
    assert agreement(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
    assert mean_confidence(torch.tensor([[0.7, 0.3], [0.2, 0.8]])) == pytest.approx(0.75)


# --------------------------------------------------------------------------- toy task
class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=20, d=6, c=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = torch.randint(0, c, (n,), generator=g)
        self.seed = seed

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        epoch, pos = key
        with seeded(sample_seed(self.seed, epoch, pos)):  # a random "augmentation"
            x = self.x[pos] + 0.05 * torch.randn(self.x.shape[1])
        return {"index": pos, "x": x, "y": self.y[pos]}


class ToyModule(nn.Module):
    def __init__(self, d=6, c=3, noise=0.1):
        super().__init__()
        with seeded(1):
            self.lin = nn.Linear(d, c)
        self.register_buffer("proto", torch.zeros(c, d))
        self.noise = noise
        self.last = None

    def forward(self, batch):
        x = batch["x"] + self.noise * torch.randn_like(batch["x"])  # per-step noise
        logits = self.lin(x)
        self.last = (x.detach(), batch["y"])
        return nn.functional.cross_entropy(logits, batch["y"], label_smoothing=0.1), {"acc": float((logits.argmax(1) == batch["y"]).float().mean())}


class ToyTask(TrainTask):
    name = "toy"
    criterion = "score"

    def __init__(self, scores=None, scheduler=True, noise=0.1, prototypes=True):
        self.module = ToyModule(noise=noise)
        self.data = ToyData()
        self.scores = scores
        self.scheduler = scheduler
        self.prototypes = prototypes
        self.evaluated = []

    def num_samples(self):
        return len(self.data)

    def dataset(self):
        return self.data

    def make_optimizer(self):
        return torch.optim.AdamW(self.module.parameters(), lr=0.05)

    def make_scheduler(self, opt, total):
        if not self.scheduler:
            return None
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (total + 1))

    def after_micro_batch(self, out):
        if self.prototypes and out is not None:
            from nolabels.methods.latteclip import update_prototypes

            update_prototypes(self.module.proto, *out)

    def extra_tensors(self):
        return {"proto": self.module.proto}

    def load_extra_tensors(self, d):
        self.module.proto.copy_(d["proto"])

    def evaluate(self, epoch):
        self.evaluated.append(epoch)
        if epoch == 0:  # the initial model: a candidate, never the best of these toy runs
            return {"score": -1e9, "oracle_accuracy": 0.0}
        if self.scores is None:
            return {"score": float(-self.module.lin.weight.norm())}
        # the oracle favours the last epoch: it must not influence the selection
        return {"score": self.scores[epoch - 1], "oracle_accuracy": float(epoch)}


def _state(task):
    return {k: v.clone() for k, v in task.trainable_state().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# killed mid-epoch (checkpoint at step 4), at an epoch's last step before its
# evaluation (checkpoint 2), and right after a mid-epoch checkpoint that is also the
# epoch's last step (6: resumes with no step left in epoch 2, only its evaluation)
@pytest.mark.parametrize("stop,resumed", [(5, 4), (3, 2), (6, 6)])
def test_resume_equals_uninterrupted(tmp_path, stop, resumed):
    cfg = dict(epochs=3, batch_size=8, grad_accum=2, seed=11, checkpoint_every=2, quiet=True)
    a = ToyTask()
    ra = fit(a, TrainConfig(**cfg), tmp_path / "a")
    b = ToyTask()
    with pytest.raises(TrainingInterrupted):
        fit(b, TrainConfig(**cfg, stop_after_steps=stop), tmp_path / "b")
    b2 = ToyTask()  # a fresh process: new module, state only from the checkpoint
    rb = fit(b2, TrainConfig(**cfg), tmp_path / "b")
    assert rb.resumed_from == resumed
    _assert_same(_state(a), _state(b2))
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]
    assert ra.selected_epoch == rb.selected_epoch
    logs = (tmp_path / "b" / "logs" / "toy.jsonl").read_text().splitlines()
    assert len(logs) == 4 and '"criterion": "score"' in logs[0]  # epochs 0-3
    # a finished stage is not trained again
    c = ToyTask()
    rc = fit(c, TrainConfig(**cfg), tmp_path / "b")
    assert c.evaluated == [] and rc.selected_epoch == rb.selected_epoch
    _assert_same(_state(a), _state(c))


def test_resume_refuses_other_settings(tmp_path):
    cfg = dict(epochs=2, batch_size=8, seed=1, quiet=True)
    with pytest.raises(TrainingInterrupted):
        fit(ToyTask(), TrainConfig(**cfg, stop_after_steps=2, checkpoint_every=1), tmp_path)
    with pytest.raises(ValueError, match="different settings"):
        fit(ToyTask(), TrainConfig(**{**cfg, "batch_size": 4}), tmp_path)


def test_selection_is_label_free(tmp_path):
    """The unlabeled score peaks at epoch 2; the oracle favours epoch 3. The module ends
    with the epoch-2 state, which equals a 2-epoch run."""
    t = ToyTask(scores=[0.2, 0.9, 0.5], scheduler=False)
    r = fit(t, TrainConfig(epochs=3, batch_size=8, seed=2, quiet=True), tmp_path / "x")
    assert r.selected_epoch == 2 and r.best_score == 0.9
    assert [h["selected_so_far"] for h in r.history] == [0, 1, 2, 2]
    t2 = ToyTask(scores=[0.2, 0.9], scheduler=False)
    fit(t2, TrainConfig(epochs=2, batch_size=8, seed=2, quiet=True))
    _assert_same(_state(t), _state(t2))
    t3 = ToyTask(scores=[0.2, 0.9, 0.5], scheduler=False)
    r3 = fit(t3, TrainConfig(epochs=3, batch_size=8, seed=2, select="last", quiet=True))
    assert r3.selected_epoch == 3
    assert not torch.equal(t3.module.lin.weight, t.module.lin.weight)


def test_grad_accumulation_matches_full_batch():
    outs = []
    for accum in (1, 2, 4):
        t = ToyTask(scheduler=False, noise=0.0, prototypes=False)
        fit(t, TrainConfig(epochs=2, batch_size=8, grad_accum=accum, seed=3, quiet=True))
        outs.append(t.module.lin.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=0)


def test_bf16_autocast_cpu():
    """amp="bf16" runs the forward under bf16 autocast (the linear layer computes in
    bfloat16) while the trained parameters stay float32; amp="off" computes in float32."""
    seen = {}

    def record(mod, inp, out):
        seen.setdefault("dtypes", set()).add(out.dtype)

    results = {}
    for amp in ("bf16", "off"):
        seen.clear()
        t = ToyTask(scheduler=False)
        h = t.module.lin.register_forward_hook(record)
        r = fit(t, TrainConfig(epochs=1, batch_size=8, amp=amp, seed=0, quiet=True))
        h.remove()
        assert math.isfinite(r.history[-1]["loss"])
        assert t.module.lin.weight.dtype == torch.float32
        results[amp] = (seen["dtypes"], t.module.lin.weight.detach().clone())
    assert torch.bfloat16 in results["bf16"][0]
    assert results["off"][0] == {torch.float32}
    assert not torch.equal(results["bf16"][1], results["off"][1])  # bf16 rounding mattered
    with pytest.raises(ValueError, match="amp"):
        fit(ToyTask(), TrainConfig(amp="fp8"))


def test_workers_do_not_change_the_result():
    """DataLoader worker processes load the same samples (keys, per-sample seeds) and do
    not move the step's RNG: the same parameters as loading in the main process."""
    a, b = ToyTask(), ToyTask()
    ra = fit(a, TrainConfig(epochs=2, batch_size=8, seed=6, quiet=True))
    rb = fit(b, TrainConfig(epochs=2, batch_size=8, seed=6, workers=2, quiet=True))
    _assert_same(_state(a), _state(b))
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]


# --------------------------------------------------------------------------- micro-batches
class CoupledModule(ToyModule):
    """A loss that couples the samples of a batch (logits centred on the batch mean)."""

    def forward(self, batch):
        x = batch["x"] + self.noise * torch.randn_like(batch["x"])
        logits = self.lin(x)
        logits = logits - logits.mean(0, keepdim=True)
        self.last = (x.detach(), batch["y"])
        return nn.functional.cross_entropy(logits, batch["y"]), {}


class CoupledTask(ToyTask):
    name = "coupled"
    couples_samples = True

    def __init__(self):
        super().__init__()
        self.module = CoupledModule()


def _budget_for(task, cap):
    """A memory budget the CPU sizing turns into micro-batch ``cap``."""
    per = saved_activation_bytes(task.module, task.collate([task.data[(0, p)] for p in range(4)])) / 4
    return int((cap + 0.5) * trainer.ACTIVATION_FACTOR * per / trainer.MEMORY_FRACTION)


@pytest.mark.parametrize("cap", [3, 100])
def test_coupled_loss_probe_trains_nothing(cap):
    """A task whose loss couples samples is sized by a separate probe forward: its steps
    are cut only by the cap (10 -> 3 + 3 + 3 + 1, logged as an approximation, the same as
    ``grad_accum=4``) or not at all (the same as the full batch, no warning); the probe
    itself changes neither parameters, prototypes nor the RNG."""
    t = CoupledTask()
    lines = []
    r = fit(t, TrainConfig(epochs=2, batch_size=10, seed=3, memory_budget=_budget_for(t, cap)),
            log=lines.append)
    ref = CoupledTask()
    fit(ref, TrainConfig(epochs=2, batch_size=10, seed=3, grad_accum=4 if cap == 3 else 1,
                         auto_micro_batch=False, quiet=True))
    _assert_same(_state(t), _state(ref))
    assert (r.micro_batch, r.accumulation) == ((3, 4) if cap == 3 else (10, 1))
    warned = [x for x in lines if "couples the samples" in x]
    assert warned == (["coupled: warning: its loss couples the samples of a batch; "
                       "micro-batches of 3 approximate the full batch"] if cap == 3 else [])
    if cap == 100:  # the check can fail: the same loss probed inside its first step (as a
        # mean loss is: 2 samples, then the rest) trains differently
        cut = CoupledTask()
        cut.couples_samples = False
        fit(cut, TrainConfig(epochs=2, batch_size=10, seed=3, memory_budget=_budget_for(t, cap),
                             quiet=True))
        assert not torch.equal(cut.module.lin.weight, ref.module.lin.weight)


class OOMToyModule(ToyModule):
    """Runs out of memory (as CUDA would) on more than 2 samples."""

    def forward(self, batch):
        if batch["x"].shape[0] > 2:
            raise torch.OutOfMemoryError(f"simulated: {batch['x'].shape[0]} samples")
        return super().forward(batch)


class OOMToyTask(ToyTask):
    def __init__(self):
        super().__init__()
        self.module = OOMToyModule()


def test_halved_micro_batch_is_checkpointed(tmp_path):
    """The micro-batch halved on out-of-memory errors (8 -> 6 after the probe -> 3 -> 2)
    goes into the checkpoints: a run interrupted after the halving resumes with it (no
    new sizing, no error) and equals the uninterrupted run."""
    cfg = dict(epochs=2, batch_size=8, seed=7, checkpoint_every=1)
    a = OOMToyTask()
    la = []
    ra = fit(a, TrainConfig(**cfg), tmp_path / "a", log=la.append)
    assert (ra.micro_batch, ra.accumulation) == (2, 4)
    assert sum("halved, step 0 redone" in x for x in la) == 2
    with pytest.raises(TrainingInterrupted):
        fit(OOMToyTask(), TrainConfig(**cfg, stop_after_steps=2, quiet=True), tmp_path / "b")
    b = OOMToyTask()
    lb = []
    rb = fit(b, TrainConfig(**cfg), tmp_path / "b", log=lb.append)
    assert rb.resumed_from == 2
    assert [x for x in lb if "micro-batch" in x] == [
        "toy: micro-batch 2 x accumulation 4 = effective batch 8 (from the checkpoint)"]
    _assert_same(_state(a), _state(b))
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]


# --------------------------------------------------------------------------- DDP
DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_trainer import ToyTask
from nolabels import dist
from nolabels.methods.trainer import TrainConfig, fit
with dist.dist_session("cpu") as ctx:
    t = ToyTask(scheduler=False, noise=0.0)
    fit(t, TrainConfig(epochs=2, batch_size=8, seed=5, quiet=True))
    st = {k: v for k, v in t.trainable_state().items()}
    torch.save(st, f"{sys.argv[1]}/rank{ctx.rank}.pt")
"""


def test_ddp_torchrun_equals_single_process(tmp_path):
    """2 gloo processes, each half of every global batch: the same parameters (and
    the same rank-summed prototype updates) as one process."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "python"),
           "TORCHELASTIC_ERROR_FILE": str(tmp_path / "err.json")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(script), str(tmp_path),
                          str(REPO / "tests")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    single = ToyTask(scheduler=False, noise=0.0)
    fit(single, TrainConfig(epochs=2, batch_size=8, seed=5, quiet=True))
    ref = single.trainable_state()
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], ref[k], atol=1e-5, rtol=1e-5)
    assert ref["extra.proto"].abs().sum() > 0
