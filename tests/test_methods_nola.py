"""NoLA: k rule, the confident subset on a hand-made case, the DINO labeller whose
targets are computed once, the CDE-initialised classifier, the loss falling on a tiny
random-init ViT, and the run directory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")
pytest.importorskip("pyarrow")

from _methods_helpers import tiny_setup
from nolabels.methods import nola
from nolabels.methods.common import load_tune_data
from nolabels.methods.students import PromptedViTStudent
from nolabels.methods.zeroshot import cde_embeddings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("nola"), per_class=8)


def test_find_k():
    # methods.md §3.3 examples
    assert nola.find_k(2820, 47) == 16  # DTD: 0.2*2820/47 = 12 -> 16
    assert nola.find_k(13500, 10) == 270  # EuroSAT
    assert nola.find_k(1281167, 1000) == 256  # ImageNet
    assert nola.find_k(50000, 10) == 1000  # CIFAR-10: no cap in the code
    assert nola.find_k(50000, 10, k_max=512) == 512  # the paper's bound
    assert nola.find_k(10, 10) == 16


def test_confident_subset_by_hand():
    """3 classes, class 2 is nobody's top-1: it falls back to rank-2 rows; a row already
    taken by a smaller class is dropped from the later one."""
    rows = torch.tensor([
        [0.90, 0.10, 0.00],  # r0: class 0
        [0.80, 0.30, 0.00],  # r1: class 0, least confident
        [0.95, 0.00, 0.10],  # r2: class 0, rank 2 = class 2
        [0.20, 0.90, 0.00],  # r3: class 1
        [0.10, 0.60, 0.50],  # r4: class 1, least confident; rank 2 = class 2
        [0.30, 0.90, 0.10],  # r5: class 1
    ])
    sel = nola.confident_subset(rows, torch.eye(3), 2, logit_scale=10.0)
    got = {c: set(sel.indices[sel.labels == c].tolist()) for c in range(3)}
    assert got == {0: {0, 2}, 1: {3, 5}, 2: {4}}
    # confidence order inside a class: r2 (margin .84 after normalisation) before r0
    p = F.softmax(10 * F.normalize(rows, dim=-1), dim=-1)
    assert p[2, 0] > p[0, 0] > p[1, 0]
    assert sel.indices[sel.labels == 0].tolist() == [2, 0]


def test_labeller_targets_computed_once(tiny, tmp_path, monkeypatch):
    calls = {"targets": 0, "h": 0}
    real_targets, real_train = nola.labeller_targets, nola.train_labeller

    def counting_targets(h, dino, **kw):
        calls["targets"] += 1
        return real_targets(h, dino, **kw)

    def train_and_hook(*a, **kw):
        h, s = real_train(*a, **kw)
        h.register_forward_hook(lambda *_: calls.__setitem__("h", calls["h"] + 1))
        return h, s

    monkeypatch.setattr(nola, "labeller_targets", counting_targets)
    monkeypatch.setattr(nola, "train_labeller", train_and_hook)
    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.2, seed=0)
    dino = torch.randn(data.n, 12, generator=torch.Generator().manual_seed(0))
    s = nola.tune(tiny.encoder, data, tiny.classes, tmp_path / "run", dino=dino,
                  config=nola.NoLAConfig(epochs=3, batch_size=8, num_prompts=2, k_min=3,
                                         labeller_epochs=4), quiet=True)
    assert calls == {"targets": 1, "h": 1}  # one pass over all images, never during tuning
    assert s["k"] == 3 and s["subset_size"] <= 9
    assert s["labeller"]["rows"] == s["subset_size"]
    assert [h["epoch"] for h in s["history"]] == [0, 1, 2, 3]  # 0: the CDE student
    assert s["selection"].startswith("heldout_agreement")
    assert "oracle_heldout_accuracy" in s["history"][0]
    assert all(h["labeller_heldout_agreement"] == s["labeller_heldout_agreement"]
               for h in s["history"])  # reported beside the criterion


def test_subset_missing_classes_is_warned_even_when_quiet(tiny, tmp_path, monkeypatch):
    """Zero-shot labels that put every image in one class (as a model that does not know
    the class names does): the run says which classes its labeller can never learn."""
    real = nola.confident_subset

    def one_class(*a, **kw):
        sel = real(*a, **kw)
        keep = sel.labels == sel.labels[0]
        return sel._replace(indices=sel.indices[keep], labels=sel.labels[keep])

    monkeypatch.setattr(nola, "confident_subset", one_class)
    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.2, seed=0)
    dino = torch.randn(data.n, 12, generator=torch.Generator().manual_seed(0))
    lines: list[str] = []
    s = nola.tune(tiny.encoder, data, tiny.classes, tmp_path / "run", dino=dino,
                  config=nola.NoLAConfig(epochs=1, batch_size=8, num_prompts=2, k_min=3,
                                         labeller_epochs=1), quiet=True, log=lines.append)
    missing = len(tiny.classes) - sum(c > 0 for c in s["subset_per_class"])
    assert missing == len(tiny.classes) - 1
    assert len(lines) == 1 and lines[0] == s["subset_warning"]
    assert f"no image of {missing} of {len(tiny.classes)} classes" in lines[0]


def test_log_warn_is_shown_when_quiet(capsys):
    from nolabels.progress import Log

    Log(quiet=True)("an info line")
    Log(quiet=True).warn("warning: a warning")
    Log(quiet=True, main=False).warn("warning: not on this rank")
    err = capsys.readouterr().err
    assert "a warning" in err and "an info line" not in err and "this rank" not in err


def test_labeller_learns_its_subset():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    labels = torch.arange(3).repeat(10)
    feats = centers[labels] + 0.3 * torch.randn(30, 8, generator=g)
    h, s = nola.train_labeller(feats, torch.arange(30), labels, 3, epochs=30, batch_size=8)
    assert (nola.labeller_targets(h, feats) == labels).float().mean() > 0.95
    assert isinstance(h[0], torch.nn.Linear) and h[0].out_features == 256  # 768->256->C shape


def test_classifier_starts_at_cde_and_loss_falls(tiny):
    from nolabels.methods.lafter import image_datasets
    from nolabels.methods.trainer import TrainConfig, fit

    desc = {"cat": ["a small furry pet"], "dog": ["a loyal pet"], "ship": ["a boat"]}
    cde = cde_embeddings(tiny.encoder, tiny.classes, desc)
    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.2, seed=0)
    student = PromptedViTStudent(tiny.encoder, num_prompts=4, seed=0)
    # a "perfect labeller": the class folder (the test images are class-tinted)
    targets = torch.tensor([tiny.classes.index(p.split("/")[-2]) for p in data.paths])
    module = nola.NoLAModule(student, cde, targets[data.train], 0.1)
    torch.testing.assert_close(module.classifier.weight, cde)
    tr, he = image_datasets(student, tiny.encoder, data, strong_aug="nola", seed=0, prefix=None)
    task = nola.NoLATask(module, data, targets[data.heldout], tr, he, 1e-2, 0.01, 32, 0)
    r = fit(task, TrainConfig(epochs=5, batch_size=8, seed=0, quiet=True))
    losses = [h["loss"] for h in r.history if h["epoch"] >= 1]  # epoch 0: the initial model
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.allclose(module.classifier.weight, cde)
