"""The stage files on their own (issue 14: Trainer.fit -> a Checkpointer and the loop): resume
checkpoint round trip and its format, the config key refusing another run's files, the
best-state and finished-stage files, rank 0 alone writing, in-memory runs writing nothing."""
from __future__ import annotations

import pytest
import torch
from nolabels.data.safe_io import load_tree
from nolabels.errors import InputError
from nolabels.methods.checkpoint import (
    CHECKPOINT_KINDS,
    Checkpointer,
    Position,
    checkpoint_path,
    config_key,
)
from nolabels.methods.selection import Selector
from nolabels.methods.trainer import TrainConfig, TrainingInterrupted, TrainTask, fit
from torch import nn

#: what a resume checkpoint holds (the format older checkpoints were written in)
RESUME_KEYS = {"state", "optimizer", "scheduler", "extra", "step", "epoch", "step_in_epoch",
               "history", "epoch_sums", "selector", "config", "config_key", "micro_batch"}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=12):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        return {"x": self.x[key[1]], "y": self.y[key[1]]}


class _Lin(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 4, generator=g))
            self.lin.bias.copy_(torch.randn(3, generator=g))
        self.register_buffer("proto", torch.randn(3, 4, generator=g))

    def forward(self, b):
        return nn.functional.cross_entropy(self.lin(b["x"]), b["y"]), {}


class Task(TrainTask):
    name = "stage"
    criterion = "score"

    def __init__(self, seed=0):
        self.module, self.train_ds = _Lin(seed), _Rows()
        self.notes = {"seen": seed}

    def make_optimizer(self):
        return torch.optim.AdamW(self.module.parameters(), lr=0.1)

    def make_scheduler(self, opt, total):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def evaluate(self, epoch):
        return {"score": -float(self.module.lin.weight.norm())}

    def extra_tensors(self):
        return {"proto": self.module.proto}

    def load_extra_tensors(self, d):
        self.module.proto.copy_(d["proto"])

    def extra_state(self):
        return dict(self.notes)

    def load_extra_state(self, d):
        self.notes = dict(d)


def _trained(seed=0, steps=2):
    """A task whose optimizer and scheduler have state (``steps`` steps taken)."""
    t = Task(seed)
    opt = t.make_optimizer()
    sched = t.make_scheduler(opt, 10)
    for _ in range(steps):
        opt.zero_grad()
        t.module({"x": t.train_ds.x, "y": t.train_ds.y})[0].backward()
        opt.step()
        sched.step()
    return t, opt, sched


def _same_state(a, b):
    sa, sb = a.trainable_state(), b.trainable_state()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_round_trip(tmp_path):
    t, opt, sched = _trained(seed=0)
    t.notes = {"seen": 7}
    sel = Selector("score")
    sel.update(1, 0.5)
    pos = Position(step=5, epoch=1, step_in_epoch=2, history=[{"epoch": 1, "loss": 0.25}],
                   epoch_sums={"loss_sum": 1.5, "n": 6, "metrics": {"acc": 3.0}}, micro_batch=3)
    ck = Checkpointer(tmp_path, "stage", "KEY", {"epochs": 2}, say=print)
    ck.save(t, opt, sched, sel, pos)
    assert ck.resume_path == checkpoint_path(tmp_path, "stage")
    tree = load_tree(ck.resume_path, kind=CHECKPOINT_KINDS["resume"])
    assert set(tree) == RESUME_KEYS
    assert tree["config_key"] == "KEY" and tree["config"] == {"epochs": 2}

    u, opt2, sched2 = _trained(seed=1, steps=1)  # another state: all of it is overwritten
    sel2 = Selector("score")
    lines = []
    ck2 = Checkpointer(tmp_path, "stage", "KEY", {"epochs": 2}, say=lines.append)
    got = ck2.load(u, opt2, sched2, sel2)
    assert got == pos
    _same_state(t, u)
    assert u.notes == {"seen": 7}
    assert (sel2.best_epoch, sel2.best_score) == (1, 0.5)
    assert sched2.state_dict() == sched.state_dict()
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)
    assert lines == [f"stage: resuming at epoch 2, step 5 from {ck.resume_path}"]
    # no best file was written: nothing kept
    assert ck2.best_state is None


def test_no_checkpoint_loads_nothing(tmp_path):
    t, opt, sched = _trained()
    before = t.trainable_state()
    ck = Checkpointer(tmp_path, "stage", "KEY", {})
    assert ck.load(t, opt, sched, Selector()) is None
    assert ck.load_final(t) is None
    assert all(torch.equal(v, t.trainable_state()[k]) for k, v in before.items())


def test_other_settings_are_refused(tmp_path):
    t, opt, sched = _trained()
    ck = Checkpointer(tmp_path, "stage", "KEY-A", {"batch_size": 4})
    ck.save(t, opt, sched, Selector(), Position(step=1))
    ck.save_final(t, {"name": "stage", "selected_epoch": 1})
    other = Checkpointer(tmp_path, "stage", "KEY-B", {"batch_size": 8})
    with pytest.raises(InputError, match=r"different settings \(\{'batch_size': 4\}\).*"
                                         r"delete the checkpoint"):
        other.load(*_trained(), Selector())
    with pytest.raises(InputError, match=r"different settings.*delete the run"):
        other.load_final(Task())


def test_fit_without_resume_ignores_another_runs_checkpoint(tmp_path):
    """``resume=False`` neither loads nor refuses a checkpoint of other settings; it
    trains from scratch (the same as a fresh directory) and overwrites it."""
    cfg = dict(epochs=2, batch_size=4, seed=1, quiet=True)
    with pytest.raises(TrainingInterrupted):
        fit(Task(), TrainConfig(**cfg, stop_after_steps=2, checkpoint_every=1), tmp_path / "a")
    a = Task()
    r = fit(a, TrainConfig(**{**cfg, "batch_size": 6}), tmp_path / "a", resume=False)
    b = Task()
    fit(b, TrainConfig(**{**cfg, "batch_size": 6}), tmp_path / "b")
    assert r.resumed_from is None
    _same_state(a, b)


def test_config_key():
    cfg = TrainConfig(epochs=2, batch_size=8)
    k = config_key(cfg, 10, {"lr": 1})
    # what does not change the computation may change between a checkpoint and its resume
    for change in ({"quiet": True}, {"workers": 3}, {"stop_after_steps": 1},
                   {"checkpoint_every": 5}, {"auto_micro_batch": False}, {"memory_budget": 10}):
        assert config_key(TrainConfig(epochs=2, batch_size=8, **change), 10, {"lr": 1}) == k
    for change in ({"batch_size": 4}, {"seed": 1}, {"epochs": 3}, {"grad_accum": 2}):
        assert config_key(TrainConfig(**{"epochs": 2, "batch_size": 8, **change}), 10,
                          {"lr": 1}) != k
    assert config_key(cfg, 11, {"lr": 1}) != k
    assert config_key(cfg, 10, {"lr": 2}) != k


def test_best_state(tmp_path):
    t, opt, sched = _trained()
    ck = Checkpointer(tmp_path, "stage", "KEY", {})
    state = t.trainable_state()
    ck.keep_best(2, state)
    assert ck.best_state is state
    tree = load_tree(checkpoint_path(tmp_path, "stage", "best"), kind=CHECKPOINT_KINDS["best"])
    assert tree["epoch"] == 2 and tree["state"].keys() == state.keys()
    # a resume whose selector has a best epoch gets the best state back ...
    sel = Selector("score")
    sel.update(2, 0.1)
    ck.save(t, opt, sched, sel, Position(step=3, epoch=2))
    ck2 = Checkpointer(tmp_path, "stage", "KEY", {})
    ck2.load(*_trained(seed=1), Selector())
    assert all(torch.equal(v, state[k]) for k, v in ck2.best_state.items())
    # ... one without a best epoch does not read the file
    ck.save(t, opt, sched, Selector(), Position(step=3, epoch=2))
    ck3 = Checkpointer(tmp_path, "stage", "KEY", {})
    ck3.load(*_trained(seed=1), Selector())
    assert ck3.best_state is None


def test_final_round_trip(tmp_path):
    t = Task(seed=3)
    ck = Checkpointer(tmp_path, "stage", "KEY", {"epochs": 1})
    ck.save_final(t, {"name": "stage", "selected_epoch": 1, "steps": 4})
    tree = load_tree(checkpoint_path(tmp_path, "stage", "final"), kind=CHECKPOINT_KINDS["final"])
    assert set(tree) == {"state", "result", "config", "config_key"}
    u = Task(seed=4)
    lines = []
    r = Checkpointer(tmp_path, "stage", "KEY", {}, say=lines.append).load_final(u)
    assert r == {"name": "stage", "selected_epoch": 1, "steps": 4}
    _same_state(t, u)
    assert lines == [f"stage: already trained (epoch 1 kept); loaded "
                     f"{checkpoint_path(tmp_path, 'stage', 'final')}"]


def test_only_rank_zero_and_only_with_a_directory_writes(tmp_path):
    t, opt, sched = _trained()
    for ck in (Checkpointer(tmp_path, "stage", "KEY", {}, main=False),
               Checkpointer(None, "stage", "KEY", {})):
        ck.save(t, opt, sched, Selector(), Position(step=1))
        ck.keep_best(1, t.trainable_state())
        ck.save_final(t, {})
        ck.write_log([{"epoch": 1}])
        assert ck.best_state is not None  # kept in memory all the same
    assert list(tmp_path.iterdir()) == []
    mem = Checkpointer(None, "stage", "KEY", {})
    assert mem.load(t, opt, sched, Selector()) is None and mem.load_final(t) is None


def test_log_and_old_pickles(tmp_path):
    ck = Checkpointer(tmp_path, "stage", "KEY", {}, say=(lines := []).append)
    ck.write_log([{"epoch": 0, "loss": None}, {"epoch": 1, "loss": 0.5}])
    assert (tmp_path / "logs" / "stage.jsonl").read_text() == \
        '{"epoch": 0, "loss": null}\n{"epoch": 1, "loss": 0.5}\n'
    ck.note_old_pickles()
    assert lines == []
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "stage.best.pt").write_bytes(b"not loaded")
    ck.note_old_pickles()
    assert len(lines) == 1 and "['stage.best.pt']" in lines[0] and "never loaded" in lines[0]
