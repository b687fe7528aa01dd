"""Readers (folder, list file, webdataset tars), corrupt images, and the resumable
embedding store, including a job killed mid-run and resumed."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from _pipeline_helpers import make_folder, tiny_spec

pytest.importorskip("pyarrow")
pytest.importorskip("PIL")

from nolabels.data import EmbeddingStore, StoreMismatchError, open_source
from nolabels.data.readers import expand_braces

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- readers
def test_folder_reader_labels_and_order(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "loose.png").write_bytes((tmp_path / "imgs" / "cat" / "000.png").read_bytes())
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    nested = tmp_path / "imgs" / "dog" / "more"
    nested.mkdir()
    (nested / "x.png").write_bytes((tmp_path / "imgs" / "cat" / "000.png").read_bytes())
    src = open_source(tmp_path / "imgs")
    rel = [os.path.relpath(p, tmp_path / "imgs") for p in src.paths]
    assert rel == sorted(rel)
    assert rel == ["cat/000.png", "cat/001.png", "dog/000.png", "dog/001.png", "dog/more/x.png",
                   "loose.png", "ship/000.png", "ship/001.png"]
    assert src.labels == ["cat", "cat", "dog", "dog", "dog", None, "ship", "ship"]
    assert src.kind == "folder" and src.has_labels
    assert open_source(tmp_path / "imgs").fingerprint() == src.fingerprint()
    (tmp_path / "imgs" / "cat" / "002.png").write_bytes(b"x")
    assert open_source(tmp_path / "imgs").fingerprint() != src.fingerprint()
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        open_source(tmp_path / "empty")


def test_list_reader(tmp_path):
    make_folder(tmp_path / "imgs", per_class=1)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nimgs/cat/000.png\tfeline\n\n{tmp_path}/imgs/dog/000.png\n")
    src = open_source(lst)
    assert src.kind == "list"
    assert src.paths == [str(tmp_path / "imgs/cat/000.png"), str(tmp_path / "imgs/dog/000.png")]
    assert src.labels == ["feline", None]
    assert src.read_bytes(0) == (tmp_path / "imgs/cat/000.png").read_bytes()


def _write_shard(path: Path, samples: list[tuple[str, bytes, str | None]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, data, cls in samples:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", None if cls is None
                                                         else cls.encode())):
                if payload is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))


def test_webdataset_shards(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    data = [f.read_bytes() for f in files]
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "s-000.tar", [("a/0001", data[0], "cat"), ("a/0002", data[1], None)])
    _write_shard(shards / "s-001.tar", [("b/0003", data[2], "dog")])
    assert expand_braces("s-{000..001}.tar") == ["s-000.tar", "s-001.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    src = open_source(str(shards / "s-{000..001}.tar"))
    assert src.kind == "tar" and len(src) == 3
    assert src.paths[0].endswith("s-000.tar::a/0001.jpg")
    assert src.labels == ["cat", None, "dog"]
    assert [src.read_bytes(i) for i in range(3)] == data[:3]
    assert len(open_source(shards)) == 3  # a folder of .tar shards
    assert len(open_source(str(shards / "s-*.tar"))) == 3
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(b"")
    with pytest.raises(ValueError, match="decompress"):
        open_source(gz)
    with pytest.raises(FileNotFoundError):
        open_source(str(shards / "s-{000..003}.tar"))


def test_expand_braces_bash_rules(monkeypatch):
    """Shard lists as webdataset writes them (braceexpand): zero-padded ranges keep their
    width across a carry, alternatives nest, text without a list stays as it is."""
    assert expand_braces("s-{000..009}.tar") == [f"s-{i:03d}.tar" for i in range(10)]
    assert expand_braces("{098..101}") == ["098", "099", "100", "101"]
    assert expand_braces("x{8..11}") == ["x8", "x9", "x10", "x11"]
    assert expand_braces("{a,{b,c}}{0..1}") == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert expand_braces("dir{x}/s.tar") == ["dir{x}/s.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    import sys

    from nolabels.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "braceexpand", None)
    with pytest.raises(MissingDependencyError, match="braceexpand"):
        expand_braces("s-{0..1}.tar")


def test_corrupt_images_are_reported_not_fatal(tmp_path):
    from nolabels.data import ImageDataset, collate

    root = make_folder(tmp_path / "imgs", per_class=2)
    good = (root / "cat" / "000.png").read_bytes()
    (root / "cat" / "bad_text.png").write_text("this is not an image")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "ship" / "truncated.png").write_bytes(good[: len(good) // 2])
    src = open_source(root)
    import torchvision.transforms as T

    ds = ImageDataset(src, T.ToTensor())
    out = [ds[i] for i in range(len(ds))]
    bad = {os.path.basename(src.paths[i]): err for i, x, err in out if err is not None}
    assert set(bad) == {"bad_text.png", "empty.jpg", "truncated.png"}
    assert all(err and ":" in err for err in bad.values())
    assert "0x" not in "".join(bad.values())  # reproducible: no memory addresses
    b = collate(out)
    assert b.images.shape == (6, 3, 32, 32) and len(b.failed) == 3
    assert b.all_items() == list(range(9))


# --------------------------------------------------------------------------- store
def test_embed_store_layout(tmp_path, tiny):
    import torch
    from nolabels.commands.embed import embed

    root = make_folder(tmp_path / "imgs", per_class=5)
    (root / "dog" / "zz_corrupt.png").write_bytes(b"\x89PNG broken")
    rep = embed(root, tiny, tmp_path / "store", shard_size=4, batch_size=3, workers=0, quiet=True)
    assert rep.complete and rep.rows == 15 and rep.images_done == 16 and rep.shards_written == 4
    assert [f["path"] for f in rep.failed] == [str(root / "dog" / "zz_corrupt.png")]
    st = EmbeddingStore(tmp_path / "store")
    m = st.manifest
    assert m["model"]["model_id"] == tiny.model_id and m["dim"] == 32 and m["dtype"] == "float16"
    assert m["num_shards"] == 4 and [s["index"] for s in m["shards"]] == [0, 1, 2, 3]
    assert m["num_rows"] == 15 and len(m["failed"]) == 1 and m["failed"][0]["reason"]
    assert "Compose" in m["model"]["preprocessing"]
    assert sorted(p.name for p in st.root.iterdir()) == sorted(
        ["manifest.json"] + [f"emb_{i:05d}.npy" for i in range(4)]
        + [f"meta_{i:05d}.parquet" for i in range(4)])
    emb, meta = st.load()
    assert emb.dtype == np.float16 and emb.shape == (15, 32)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
    src = open_source(root)
    good = [i for i, p in enumerate(src.paths) if not p.endswith("zz_corrupt.png")]
    assert meta["item"] == good and meta["path"] == [src.paths[i] for i in good]
    assert meta["label"] == [src.labels[i] for i in good]
    # Same vectors as encoding directly.
    from nolabels.data.transforms import decode_image

    x = torch.stack([tiny.transform(decode_image(src.read_bytes(i))) for i in good])
    np.testing.assert_allclose(emb.astype(np.float32), tiny.encode_image(x).numpy(), atol=2e-3)
    # The failed image is in its shard's meta with row -1 and the reason.
    import pyarrow.parquet as pq

    bad_item = src.paths.index(str(root / "dog" / "zz_corrupt.png"))
    d = pq.read_table(st.meta_path(bad_item // 4)).to_pydict()
    j = d["item"].index(bad_item)
    assert d["row"][j] == -1 and d["error"][j]


def test_store_resume_noop_mismatch_overwrite(tmp_path, tiny, cfg):
    from nolabels.commands.embed import embed
    from nolabels.models import load_encoder

    root = make_folder(tmp_path / "imgs", per_class=3)
    embed(root, tiny, tmp_path / "s", shard_size=4, workers=0, quiet=True)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    rep = embed(root, tiny, tmp_path / "s", shard_size=4, workers=0, quiet=True)
    assert rep.shards_written == 0 and rep.images_done == 0 and rep.complete
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir() if p.name != "manifest.json"}
    assert all(before[k] == v for k, v in after.items())
    other = load_encoder(tiny_spec(cfg), seed=3)
    with pytest.raises(StoreMismatchError, match="model_id"):
        embed(root, other, tmp_path / "s", shard_size=4, workers=0, quiet=True)
    with pytest.raises(StoreMismatchError, match="shard_size"):
        embed(root, tiny, tmp_path / "s", shard_size=5, workers=0, quiet=True)
    (root / "cat" / "new.png").write_bytes((root / "cat" / "000.png").read_bytes())
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        embed(root, tiny, tmp_path / "s", shard_size=4, workers=0, quiet=True)
    rep = embed(root, other, tmp_path / "s", shard_size=4, workers=0, quiet=True, overwrite=True)
    assert rep.complete and rep.rows == 10
    assert EmbeddingStore(tmp_path / "s").model["model_id"] == other.model_id


def test_resume_after_lost_shard_and_temp_files(tmp_path, tiny):
    from nolabels.commands.embed import embed

    root = make_folder(tmp_path / "imgs", per_class=4)
    embed(root, tiny, tmp_path / "s", shard_size=5, workers=0, quiet=True)
    ref, ref_meta = EmbeddingStore(tmp_path / "s").load()
    st = EmbeddingStore(tmp_path / "s")
    st.meta_path(1).unlink()  # as if killed between the emb and meta writes of shard 1
    (tmp_path / "s" / ".emb_00002.npy.tmp-abc").write_bytes(b"partial")
    assert st.pending_shards() == [1]
    with pytest.raises(RuntimeError, match="re-run"):
        st.load()
    rep = embed(root, tiny, tmp_path / "s", shard_size=5, workers=0, quiet=True)
    assert rep.shards_written == 1 and rep.images_done == 5
    assert not list((tmp_path / "s").glob(".*tmp*"))
    emb, meta = EmbeddingStore(tmp_path / "s").load()
    np.testing.assert_array_equal(emb, ref)
    assert meta == ref_meta


KILL_SCRIPT = r"""
import sys, time
import nolabels.models.clip as c
orig = c.OpenCLIPEncoder._image_features
def slow(self, x):
    time.sleep(float(sys.argv[1]))
    return orig(self, x)
c.OpenCLIPEncoder._image_features = slow
from nolabels.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _embed_cmd(root, spec, out, delay):
    return [sys.executable, "-c", KILL_SCRIPT, str(delay), "embed", str(root), "--model", spec,
            "--out", str(out), "--shard-size", "4", "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--quiet"]


def test_kill_and_resume_subprocess(tmp_path, cfg):
    """SIGKILL an embed job after some shards are committed; re-running loses nothing and
    duplicates nothing: the store equals an uninterrupted run's, byte for byte."""
    root = make_folder(tmp_path / "imgs", per_class=8)  # 24 images, 6 shards, 12 batches
    (root / "cat" / "zz_bad.png").write_bytes(b"garbage")  # 25 items, 7 shards
    spec = tiny_spec(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "python")}
    ref = subprocess.run(_embed_cmd(root, spec, tmp_path / "ref", 0), env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_embed_cmd(root, spec, out, 0.4), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while len(list(out.glob("meta_*.parquet"))) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no shard committed in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    st = EmbeddingStore(out)
    done = [i for i in range(st.num_shards) if st.shard_done(i)]
    assert 2 <= len(done) < st.num_shards, done
    assert not st.complete

    res = subprocess.run(_embed_cmd(root, spec, out, 0), env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    a, b = EmbeddingStore(out), EmbeddingStore(tmp_path / "ref")
    assert a.complete and a.manifest["num_rows"] == 24
    assert a.manifest["failed"] == b.manifest["failed"] and len(a.failed) == 1
    ea, ma = a.load()
    eb, mb = b.load()
    assert ma["item"] == sorted(set(ma["item"]))  # no duplicates
    assert ma == mb
    np.testing.assert_array_equal(ea, eb)
    for i in done:  # committed shards were not recomputed
        assert a.meta_path(i).stat().st_mtime_ns < a.meta_path(a.num_shards - 1).stat().st_mtime_ns
    assert not list(out.glob(".*tmp*"))


def test_atomic_json_and_manifest_roundtrip(tmp_path):
    from nolabels.data.store import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    with pytest.raises(FileNotFoundError, match="not an embedding store"):
        EmbeddingStore(tmp_path)
