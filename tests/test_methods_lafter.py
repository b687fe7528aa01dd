"""LaFTer: the text set, the text-only classifier, the teacher sharing the trainable
LayerNorms, the loss falling on a tiny random-init ViT, resume == uninterrupted."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("pyarrow")

from _methods_helpers import tiny_setup
from nolabels.methods import lafter
from nolabels.methods.common import load_run, load_tune_data
from nolabels.methods.students import PromptedViTStudent
from nolabels.methods.trainer import TrainConfig, TrainingInterrupted, fit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("lafter"), per_class=8)


def test_text_dataset(tiny):
    desc = {"cat": ["a furry pet", "whiskers"], "dog": [], "ship": ["a boat"]}
    emb, labels, texts = lafter.text_dataset(tiny.encoder, tiny.classes,
                                             ["a photo of a {}.", "the {}."], desc)
    assert texts == ["a photo of a cat.", "the cat.", "a furry pet", "whiskers",
                     "a photo of a dog.", "the dog.", "a photo of a ship.", "the ship.", "a boat"]
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(texts)))
    # each text encoded separately = the encoder on that text
    torch.testing.assert_close(emb[2], tiny.encoder.encode_text(["a furry pet"])[0],
                               atol=1e-5, rtol=0)


def test_text_classifier_trains_with_noise():
    """Stage 1 on separable synthetic 'texts': default init (not from text), noisy
    full-batch steps; the clean loss falls and the noise is resampled every step."""
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    labels = torch.arange(3).repeat_interleave(5)
    emb = torch.nn.functional.normalize(centers[labels] + 0.1 * torch.randn(15, 16, generator=g), dim=-1)
    m = lafter.TextClassifierModule(emb, labels, 3, noise_std=0.1, eps=0.1, seed=0)
    w0 = m.classifier.weight.detach().clone()
    clean0 = torch.nn.functional.cross_entropy(m.classifier(emb), labels).item()
    # two forward passes differ only by the noise
    l1, _ = m(None)
    l2, _ = m(None)
    assert l1.item() != l2.item()
    task = lafter.TextClassifierTask(m, steps=100, lr=5e-3, wd=0.01)
    fit(task, TrainConfig(epochs=1, batch_size=1, seed=0, quiet=True))
    clean1 = torch.nn.functional.cross_entropy(m.classifier(emb), labels).item()
    assert clean1 < clean0 - 0.2
    assert not torch.allclose(w0, m.classifier.weight)
    # default nn.Linear init, not the class embeddings
    assert not torch.allclose(torch.nn.functional.normalize(w0, dim=-1), centers, atol=0.2)


def test_teacher_shares_trainable_layernorms(tiny):
    s = PromptedViTStudent(tiny.encoder, num_prompts=4, seed=0)
    enc_ln = tiny.encoder.model.visual.ln_post.weight.detach().clone()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t0 = s.teacher_features(x)
    f0 = s(x)
    with torch.no_grad():
        s.pvt.prompts.add_(1.0)
    assert torch.equal(s.teacher_features(x), t0)  # no prompts in the teacher
    assert not torch.allclose(s(x), f0)
    with torch.no_grad():
        s.pvt.visual.ln_post.weight.mul_(1.5)
        s.pvt.visual.transformer.resblocks[0].ln_1.bias.add_(0.3)
    assert not torch.allclose(s.teacher_features(x), t0)  # the teacher drifts with the LNs
    names = {n for n, _ in s.named_trainable_parameters()}
    assert "pvt.prompts" in names and "pvt.visual.ln_post.weight" in names
    assert all("prompts" in n or "ln" in n for n in names)
    # the encoder's own tower is untouched (deep copy)
    assert torch.equal(tiny.encoder.model.visual.ln_post.weight, enc_ln)


def _stage2(tiny, tmp_path, epochs, seed=0, lr=1e-2):
    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.2, seed=seed)
    W, _ = lafter.train_text_classifier(tiny.encoder, tiny.classes, steps=20, seed=seed)
    student = PromptedViTStudent(tiny.encoder, num_prompts=4, seed=seed)
    module = lafter.LaFTerModule(student, W, copy.deepcopy(W), 0.1)
    tr, he = lafter.image_datasets(student, tiny.encoder, data, strong_aug="lafter", seed=seed,
                                   prefix=None, heldout_strong=True)
    return lafter.LaFTerTask(module, data, tr, he, lr, 0.01, 32, 0), data


def test_lafter_loss_falls_on_tiny_vit(tiny, tmp_path):
    task, data = _stage2(tiny, tmp_path, 6)
    r = fit(task, TrainConfig(epochs=6, batch_size=8, seed=0, quiet=True))
    losses = [h["loss"] for h in r.history if h["epoch"] >= 1]  # epoch 0: the initial model
    assert losses[-1] < losses[0] - 0.05, losses
    assert [h["epoch"] for h in r.history] == list(range(7))
    assert all("heldout_balanced_agreement" in h and "oracle_heldout_accuracy" in h
               for h in r.history)
    assert r.criterion == "heldout_balanced_agreement" and 0 <= r.selected_epoch <= 6


def test_lafter_resume_equals_uninterrupted(tiny, tmp_path):
    """Real strong augmentations, teacher drift, prompts: kill after 3 steps, resume."""
    cfg = dict(epochs=2, batch_size=8, seed=4, checkpoint_every=2, quiet=True)
    a, _ = _stage2(tiny, tmp_path, 2, seed=4)
    fit(a, TrainConfig(**cfg), tmp_path / "a")
    b, _ = _stage2(tiny, tmp_path, 2, seed=4)
    with pytest.raises(TrainingInterrupted):
        fit(b, TrainConfig(**cfg, stop_after_steps=3), tmp_path / "b")
    c, _ = _stage2(tiny, tmp_path, 2, seed=4)
    r = fit(c, TrainConfig(**cfg), tmp_path / "b")
    assert r.resumed_from == 2
    sa, sc = a.trainable_state(), c.trainable_state()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k


def test_lafter_tune_writes_run(tiny, tmp_path):
    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.2, seed=0)
    s = lafter.tune(tiny.encoder, data, tiny.classes, tmp_path / "run",
                    config=lafter.LaFTerConfig(text_steps=10, epochs=2, batch_size=8,
                                               num_prompts=2), quiet=True)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "logs" / "lafter.jsonl").read_text().count("\n") == 3  # 0-2
    assert s["selection"].startswith("heldout_balanced_agreement") and s["train_images"] == 19
    model = load_run(tmp_path / "run")[1]
    assert set(model["student"]) == {n for n, _ in PromptedViTStudent(
        tiny.encoder, 2).named_trainable_parameters()}
