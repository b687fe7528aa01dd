"""Label-free model selection with constructed runs: epoch 0 is a candidate (a run that
only degrades returns it, and its run state holds the epoch-0 weights), LaFTer's teacher
reference is frozen at epoch 0, the class-balance guard's numbers, a collapsing student
is not selected, and the two curves' best epochs."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from nolabels.errors import InputError
from nolabels.methods import lafter, nola
from nolabels.methods.common import Oracle, TuneData
from nolabels.methods.selection import (
    Selector,
    agreement,
    balance_penalty,
    balanced_agreement,
    class_entropy,
    coverage_warning,
    curve_lines,
    curve_summary,
    small_heldout_note,
)
from nolabels.methods.students import Student
from nolabels.methods.trainer import (
    TrainConfig,
    TrainingInterrupted,
    TrainTask,
    checkpoint_path,
    fit,
    load_checkpoint_file,
    sample_seed,
    seeded,
)
from torch import nn


# --------------------------------------------------------------------------- the guard
def test_balance_guard_hand_made_example():
    # reference (the frozen teacher's labels): 4 classes, 2 images each -> H(r) = ln 4
    ref = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # predictions drifting to class 0: q = (6/8, 2/8, 0, 0)
    pred = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    h_r, h_q = math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert class_entropy(ref, 4) == pytest.approx(h_r)             # 1.386294
    assert class_entropy(pred, 4) == pytest.approx(h_q)            # 0.562335
    # (0.9 * 1.386294 - 0.562335) / 1.386294 = 0.494361
    assert balance_penalty(pred, ref, 4) == pytest.approx((0.9 * h_r - h_q) / h_r)
    assert balance_penalty(pred, ref, 4) == pytest.approx(0.494361, abs=1e-6)
    got = balanced_agreement(pred, ref, 4)
    assert got["heldout_agreement"] == pytest.approx(2 / 8)        # positions 0 and 1
    assert got["heldout_balanced_agreement"] == pytest.approx(0.25 - 0.494361, abs=1e-6)
    assert got["heldout_prediction_entropy"] == pytest.approx(h_q)
    assert got["heldout_reference_entropy"] == pytest.approx(h_r)
    # collapsed to one class: the whole prior entropy beyond the tolerance, 1 - 0.1
    assert balance_penalty(torch.zeros(8, dtype=torch.long), ref, 4) == pytest.approx(0.9)
    # within the 10 % tolerance: no penalty (one image moved, H(q) = 0.974 H(r))
    mild = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    assert class_entropy(mild, 4) > 0.9 * h_r
    assert balance_penalty(mild, ref, 4) == 0.0
    # a more balanced student than its prior is never penalised; nor is anything when the
    # prior itself is one class (H(r) = 0)
    assert balance_penalty(ref, torch.zeros(8, dtype=torch.long), 4) == 0.0
    assert balance_penalty(torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long),
                           4) == 0.0


def test_selector_takes_epoch_zero_and_keeps_the_earlier_tie():
    s = Selector("c")
    assert s.update(0, 0.6)                       # the initial model is a candidate
    assert not s.update(1, 0.6)                   # a tie keeps the earlier epoch
    assert not s.update(2, 0.5) and not s.update(3, float("nan"))
    assert (s.best_epoch, s.best_score) == (0, 0.6)
    assert s.update(4, 0.61) and s.best_epoch == 4
    assert not s.update(-1, 9.0)


def test_curve_summary_reports_both_best_epochs():
    hist = [{"epoch": 0, "c": 0.5, "oracle_heldout_accuracy": 0.30},
            {"epoch": 1, "c": 0.7, "oracle_heldout_accuracy": 0.40},
            {"epoch": 2, "c": 0.7, "oracle_heldout_accuracy": 0.45},
            {"epoch": 3, "c": 0.6, "oracle_heldout_accuracy": 0.45}]
    cs = curve_summary(hist, "c")
    assert (cs["criterion_best_epoch"], cs["criterion_best"]) == (1, 0.7)
    assert (cs["oracle_best_epoch"], cs["oracle_best"]) == (2, 0.45)
    assert cs["oracle_at_criterion_best"] == 0.40
    lines = curve_lines(cs)
    assert len(lines) == 2
    assert "c best at epoch 1 (0.7000)" in lines[0]
    assert lines[1].startswith("oracle (labels, reported only")
    assert "best at epoch 2 (0.4500)" in lines[1]
    # no labels: no oracle line
    assert len(curve_lines(curve_summary([{"epoch": 0, "c": 0.1}], "c"))) == 1


# --------------------------------------------------------------------------- toy trainer runs
class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, d=5):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        return {"x": self.x[key[1]], "y": self.y[key[1]]}


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        with seeded(3):
            self.lin = nn.Linear(5, 3)

    def forward(self, b):
        return F.cross_entropy(self.lin(b["x"]), b["y"]), {}


class DegradingTask(TrainTask):
    """Its unlabeled score falls every epoch; the oracle rises (it must not matter)."""

    name = "degrading"
    criterion = "score"

    def __init__(self):
        self.module, self.train_ds = _Lin(), _Data()
        self.evaluated = []

    def make_optimizer(self):
        return torch.optim.SGD(self.module.parameters(), lr=0.1)

    def evaluate(self, epoch):
        self.evaluated.append(epoch)
        return {"score": 1.0 - 0.1 * epoch, "oracle_heldout_accuracy": 0.1 * epoch}


def _params(task):
    return {k: v.detach().clone() for k, v in task.trainable_state().items()}


def test_a_run_that_only_degrades_returns_epoch_zero(tmp_path):
    t = DegradingTask()
    start = _params(t)
    r = fit(t, TrainConfig(epochs=3, batch_size=4, seed=0, quiet=True), tmp_path)
    assert t.evaluated == [0, 1, 2, 3]
    assert r.selected_epoch == 0 and r.best_score == 1.0
    assert [h["epoch"] for h in r.history] == [0, 1, 2, 3]
    assert r.history[0]["loss"] is None and r.history[0]["score"] == 1.0
    for k, v in start.items():  # the module holds the epoch-0 weights ...
        assert torch.equal(t.trainable_state()[k], v), k
    fin = load_checkpoint_file(checkpoint_path(tmp_path, "degrading", "final"), "final")
    for k, v in start.items():  # ... and so does the saved stage
        assert torch.equal(fin["state"][k], v), k
    # the JSON log records the criterion for every epoch, epoch 0 included, and the
    # oracle separately under an oracle_ key
    log = [json.loads(x) for x in (tmp_path / "logs" / "degrading.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [0, 1, 2, 3]
    assert all(x["criterion"] == "score" and "score" in x and "oracle_heldout_accuracy" in x
               for x in log)
    cs = curve_summary(r.history, "score")
    assert cs["criterion_best_epoch"] == 0 and cs["oracle_best_epoch"] == 3
    # select="last" still logs epoch 0 but keeps the last epoch
    t2 = DegradingTask()
    r2 = fit(t2, TrainConfig(epochs=3, batch_size=4, seed=0, select="last", quiet=True))
    assert r2.selected_epoch == 3 and r2.history[0]["epoch"] == 0
    assert not torch.equal(t2.module.lin.weight, start["lin.weight"])


def test_epoch_zero_survives_resume(tmp_path):
    """Killed mid-run and resumed: epoch 0 is not re-evaluated on the trained state and
    is still the one returned (the best-state file holds its weights)."""
    t = DegradingTask()
    start = _params(t)
    with pytest.raises(TrainingInterrupted):
        fit(t, TrainConfig(epochs=3, batch_size=4, seed=0, checkpoint_every=2, quiet=True,
                           stop_after_steps=6), tmp_path)
    t2 = DegradingTask()
    r = fit(t2, TrainConfig(epochs=3, batch_size=4, seed=0, checkpoint_every=2, quiet=True),
            tmp_path)
    assert r.resumed_from is not None and 0 not in t2.evaluated
    assert r.selected_epoch == 0 and [h["epoch"] for h in r.history] == [0, 1, 2, 3]
    for k, v in start.items():
        assert torch.equal(t2.trainable_state()[k], v), k


# --------------------------------------------------------------------------- LaFTer, constructed
class NormStudent(Student):
    """A LaFTer-shaped student: a trainable LayerNorm shared with the teacher, plus a
    trainable "prompt" only the student sees."""

    kind = "toy-norm"

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.prompt = nn.Parameter(torch.zeros(d))
        self.dim = d

    def forward(self, x):
        return self.norm(x) + self.prompt

    def teacher_features(self, x, *, cached=False):
        return F.normalize(self.norm(x), dim=-1)

    def describe(self):
        return "toy"

    def config(self):
        return {"kind": self.kind}


class Views(torch.utils.data.Dataset):
    """Weak view = the point; strong view = the point + seeded noise per (epoch, pos)."""

    def __init__(self, x, noise=0.05):
        self.x, self.noise = x, noise

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        epoch, pos = key
        with seeded(sample_seed(9, epoch, pos)):
            strong = self.x[pos] + self.noise * torch.randn(self.x.shape[1])
        return {"index": pos, "weak": self.x[pos], "strong": strong}


C, D = 3, 8


def _lafter_task(task_cls=lafter.LaFTerTask, lr=0.0):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(C, D, generator=g) * 3
    y = torch.arange(C).repeat(8)                      # 24 points, 8 per class
    x = centers[y] + 0.3 * torch.randn(len(y), D, generator=g)
    held = torch.arange(0, 24, 2)                      # 12 held out, 4 per class
    train = torch.arange(1, 24, 2)
    data = TuneData(source=None, items=list(range(24)), paths=[str(i) for i in range(24)],
                    emb=x, model_id="toy", train=train, heldout=held,
                    oracle=Oracle(y.tolist()), store="")
    student = NormStudent(D)
    with torch.no_grad():
        W = F.normalize(F.layer_norm(centers, (D,)), dim=-1)
    module = lafter.LaFTerModule(student, W, W.clone(), eps=0.1)
    task = task_cls(module, data, Views(x[train]), Views(x[held]), lr, 0.01, 8, 0)
    return task, data, x


def test_frozen_teacher_does_not_move_with_the_layernorms():
    task, data, x = _lafter_task()
    frozen = copy.deepcopy(task.module)                # what a frozen copy would say
    task.prepare()
    weak = x[data.heldout]
    ref = task.reference.clone()
    assert torch.equal(ref, frozen.teacher(weak))
    assert len(set(ref.tolist())) == C                 # the toy teacher sees every class
    with torch.no_grad():                              # the shared norm trains ...
        task.module.student.norm.weight.mul_(torch.linspace(-1.0, 2.0, D))
        task.module.student.norm.bias.add_(torch.linspace(0.5, -0.5, D))
    moved = task.module.teacher(weak)
    assert not torch.equal(moved, ref)                 # ... the co-adapting teacher moves
    ev = task.evaluate(1)
    assert torch.equal(task.reference, ref)            # the frozen one does not
    assert torch.equal(frozen.teacher(weak), ref)
    student = task.module.logits(weak).argmax(1)
    assert ev["heldout_agreement_weak"] == pytest.approx(agreement(student, ref))
    assert ev["heldout_agreement_coadapting"] == pytest.approx(agreement(student, moved))


class CollapsingTask(lafter.LaFTerTask):
    """Every epoch, "training" collapses the shared LayerNorm to a constant output (the
    optimizer itself is inert: lr 0), so student and co-adapting teacher predict one class
    for every image."""

    def before_epoch(self, epoch):
        with torch.no_grad():
            self.module.student.norm.weight.zero_()
            self.module.student.norm.bias.copy_(torch.linspace(-1.0, 1.0, D))


def test_a_collapsing_student_is_not_selected(tmp_path):
    task, data, x = _lafter_task(CollapsingTask)
    start = _params(task)
    r = fit(task, TrainConfig(epochs=2, batch_size=6, seed=0, quiet=True, amp="off"), tmp_path)
    h0, h1 = r.history[0], r.history[1]
    assert h0["epoch"] == 0 and h1["epoch"] == 1
    # the old criterion (agreement with the co-adapting teacher) is fooled: 1.0
    assert h1["heldout_agreement_coadapting"] == 1.0
    assert h1["heldout_agreement_coadapting"] >= h0["heldout_agreement_coadapting"]
    assert h1["heldout_prediction_entropy"] == 0.0
    assert h1["balance_penalty"] == pytest.approx(0.9)
    # against the frozen teacher the collapsed model agrees on one class's share only
    assert h1["heldout_agreement"] == pytest.approx(4 / 12)
    assert h1["heldout_balanced_agreement"] == pytest.approx(4 / 12 - 0.9)
    assert h0["heldout_balanced_agreement"] > 0.9     # the untouched start
    assert r.criterion == "heldout_balanced_agreement" and r.selected_epoch == 0
    for k, v in start.items():                        # the kept state is the start
        assert torch.equal(task.trainable_state()[k], v), k
    assert "oracle_heldout_accuracy" in h0 and "oracle_heldout_frozen_teacher_accuracy" in h0


# --------------------------------------------------------------------------- NoLA
def test_labeller_heldout_agreement():
    cde = torch.eye(3, 4)
    emb = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0],
                        [0, 0, 1.0, 0]])                # CDE labels 0 1 2 1 2
    targets = torch.tensor([0, 1, 0, 1, 1])
    held = torch.tensor([2, 3, 4])                      # CDE 2 1 2 vs labeller 0 1 1
    assert nola.labeller_heldout_agreement(targets, emb, held, cde, 100.0) == pytest.approx(1 / 3)
    assert nola.labeller_heldout_agreement(targets, emb, torch.tensor([], dtype=torch.long),
                                           cde, 100.0) is None


# --------------------------------------------------------------------------- nolabels tune
def test_tune_logs_both_curves_best_epochs(tmp_path, caplog):
    """``nolabels tune`` (the pipeline) logs one line per curve and stores them."""
    pytest.importorskip("open_clip")
    pytest.importorskip("pyarrow")
    import logging

    from _methods_helpers import tiny_setup
    from nolabels.pipeline.tune import tune

    (tmp_path / "tiny").mkdir()
    t = tiny_setup(tmp_path / "tiny", per_class=4)
    with caplog.at_level(logging.INFO, logger="nolabels"):
        s = tune("nola", t.store, t.classes, tmp_path / "run", dino_model=t.spec,
                 hyper={"epochs": 2, "batch_size": 6, "num_prompts": 2, "k_min": 2,
                        "labeller_epochs": 2})
    msgs = [r.getMessage() for r in caplog.records]
    sel = [m for m in msgs if m.startswith("selection: heldout_agreement best at epoch ")]
    orc = [m for m in msgs if m.startswith("oracle (labels, reported only, never selected on): "
                                           "oracle_heldout_accuracy best at epoch ")]
    assert len(sel) == 1 and len(orc) == 1, msgs
    cs = json.loads((tmp_path / "run" / "summary.json").read_text())["selection_curves"]
    assert cs["criterion_best_epoch"] == s["selected_epoch"]
    assert f"best at epoch {cs['oracle_best_epoch']} " in orc[0]
    assert [h["epoch"] for h in s["history"]] == [0, 1, 2]


def test_coverage_warning_names_the_missing_classes():
    assert coverage_warning([3, 1, 2], ["a", "b", "c"], "x") is None
    w = coverage_warning([0, 5, 0], ["cat", "dog", "emu"], "the subset")
    assert w.startswith("warning: the subset has no image of 2 of 3 classes (cat, emu)")
    many = coverage_warning([0] * 11 + [4], [f"c{i}" for i in range(12)], "s")
    assert "(c0, c1, c2, c3, c4, c5, c6, c7 and 3 more)" in many
    with pytest.raises(InputError):
        coverage_warning([1, 2], ["a"], "s")


def test_small_heldout_note_only_below_the_floor():
    assert small_heldout_note(0, 0.0) is None  # nothing held out: nothing to note
    assert small_heldout_note(100, 0.1) is None
    n = small_heldout_note(40, 0.1)
    assert n.startswith("note: model selection scores 40 held-out images (--heldout-fraction 0.1)")
    assert "by 2.5 points" in n
