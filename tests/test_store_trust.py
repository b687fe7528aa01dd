"""User files are never destroyed, and awkward inputs are handled (issue 11, part B):
foreign --out folders and files are refused untouched, --overwrite deletes only what a
manifest lists, non-UTF-8 names, symlink loops, 16-bit / palette / LA / CMYK images,
truncated shards (named, verified, re-embedded), file modes from the umask, and inputs
changed under the same names."""
from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from _pipeline_helpers import make_folder, tiny_spec

pytest.importorskip("pyarrow")
pytest.importorskip("PIL")

import pyarrow as pa  # noqa: E402 - after the importorskip
import pyarrow.parquet as pq  # noqa: E402
from nolabels.data import EmbeddingStore, open_source  # noqa: E402
from nolabels.data.outputs import (  # noqa: E402
    check_output_dir,
    claim_output_dir,
    claim_output_file,
    dir_kind,
    is_ours_file,
)
from nolabels.data.transforms import decode_image  # noqa: E402
from nolabels.errors import CorruptFileError, OutputExistsError  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = ["cat", "dog", "ship"]


def _embed(images, out, tiny, **kw):
    from nolabels.commands.embed import embed

    kw = {"shard_size": 4, "batch_size": 4, "workers": 0, "quiet": True, **kw}
    return embed(images, tiny, out, **kw)


def _logged(caplog) -> str:
    """The nolabels log lines (stdlib logging; pytest captures them) so far, then clear."""
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("nolabels"))
    caplog.clear()
    return text


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- --out folders
def test_embed_refuses_a_foreign_folder_and_touches_nothing(tmp_path, tiny, cfg, capsys):
    from nolabels.cli import main

    root = make_folder(tmp_path / "imgs", per_class=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "emb_00000.npy").write_bytes(b"my own array, not a store's")
    (mine / "meta_00000.parquet").write_bytes(b"mine too")
    (mine / "manifest.json").write_text('{"my": "project"}')  # not a nolabels manifest
    (mine / "notes.txt").write_text("precious")
    before = _snapshot(mine)
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not a nolabels store"):
            _embed(root, mine, tiny, overwrite=overwrite)
        assert _snapshot(mine) == before
    assert main(["embed", str(root), "--model", tiny_spec(cfg), "--out", str(mine),
                 "--overwrite", "--workers", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nolabels embed: error: ") and str(mine) in err
    assert _snapshot(mine) == before
    # a file where the store folder should be
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        _embed(root, tmp_path / "afile", tiny)
    # an empty folder, or one holding only our temporary files, is fine
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".manifest.json.tmp-1234").write_text("{")
    assert _embed(root, tmp_path / "empty", tiny).complete


def test_overwrite_deletes_only_the_files_the_manifest_lists(tmp_path, tiny, cfg):
    from nolabels.models import load_encoder

    root = make_folder(tmp_path / "imgs", per_class=2)  # 6 images, 2 shards of 4
    out = tmp_path / "s"
    _embed(root, out, tiny)
    assert dir_kind(out) == "store"
    user = {"emb_00005.npy": b"user array", "meta_00009.parquet": b"user table",
            "notes.txt": b"notes"}
    for name, data in user.items():
        (out / name).write_bytes(data)
    (out / ".emb_00001.npy.tmp-dead").write_bytes(b"ours, left by a killed run")
    other = load_encoder(tiny_spec(cfg), seed=3)
    rep = _embed(root, out, other, overwrite=True)
    assert rep.complete and rep.shards_written == 2
    assert EmbeddingStore(out).model["model_id"] == other.model_id
    for name, data in user.items():  # not listed by the manifest: untouched
        assert (out / name).read_bytes() == data
    assert not list(out.glob(".*.tmp-*"))
    # A new layout (6 shards) whose emb_00005.npy would replace the user's: refused
    # before anything is deleted.
    before = _snapshot(out)
    with pytest.raises(OutputExistsError, match="emb_00005.npy"):
        _embed(root, out, tiny, shard_size=1, overwrite=True)
    assert _snapshot(out) == before


def test_output_dir_kinds_and_markers(tmp_path):
    run = claim_output_dir(tmp_path / "run", "run")
    assert dir_kind(run) == "run" and check_output_dir(run, "run") == "ours"
    (run / "model.pt").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="holds a nolabels run, not a store"):
        check_output_dir(run, "store")
    # a run directory written before markers existed is recognised by its config.json
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"method": "zeroshot", "encoder": {},
                                                    "classes": ["a"]}))
    assert check_output_dir(legacy, "run") == "ours"
    claim_output_dir(legacy, "run")
    assert json.loads((legacy / "_nolabels.json").read_text())["nolabels"]["kind"] == "run"
    # --overwrite of a marked directory deletes only the files its marker lists
    from nolabels.data.outputs import mark_output_dir

    d = claim_output_dir(tmp_path / "ds", "dataset")
    (d / "part-00000.parquet").write_bytes(b"ours")
    (d / "mine.txt").write_bytes(b"user")
    mark_output_dir(d, "dataset", ["part-00000.parquet", "../outside.txt"])
    (tmp_path / "outside.txt").write_text("never listed for deletion")
    claim_output_dir(d, "dataset", overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["_nolabels.json", "mine.txt"]
    assert (tmp_path / "outside.txt").exists()


# --------------------------------------------------------------------------- --out files
def test_output_files_are_replaced_only_when_ours(tmp_path):
    foreign = tmp_path / "theirs.parquet"
    pq.write_table(pa.table({"path": ["a"], "label": [1]}), foreign)
    ours = tmp_path / "ours.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({"nolabels": "{}"}), ours)
    assert not is_ours_file(foreign) and is_ours_file(ours)
    assert claim_output_file(ours) == ours
    with pytest.raises(OutputExistsError, match="was not written by nolabels"):
        claim_output_file(foreign)
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        claim_output_file(ours, overwrite=False)
    (tmp_path / "k.json").write_text(json.dumps({"version": 1, "dataset": None,
                                                 "classes": {}, "ovo": {}}))
    (tmp_path / "other.json").write_text(json.dumps({"classes": {}, "mine": 1}))
    (tmp_path / "p.csv").write_text("path,zs_pred,pred,label\na.png,0,0,cat\n")
    (tmp_path / "q.csv").write_text("path,label\na.png,cat\n")
    assert is_ours_file(tmp_path / "k.json") and is_ours_file(tmp_path / "p.csv")
    assert not is_ours_file(tmp_path / "other.json") and not is_ours_file(tmp_path / "q.csv")
    with pytest.raises(OutputExistsError, match="is a directory"):
        claim_output_file(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("trust")
    root = make_folder(d / "imgs", per_class=2)
    _embed(root, d / "store", tiny)
    return d / "store"


def test_commands_refuse_a_foreign_out_file(tmp_path, store, tiny, capsys):
    from nolabels.cli import main
    from nolabels.commands.label import label
    from nolabels.commands.predict import predict
    from nolabels.commands.tune import tune

    theirs = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"path": ["x"], "label": [0]}), theirs)
    text = tmp_path / "notes.csv"
    text.write_text("path,label\nx,0\n")
    before = {theirs.name: theirs.read_bytes(), text.name: text.read_bytes()}
    for out in (theirs, text):
        with pytest.raises(OutputExistsError, match="not written by nolabels"):
            label(store, CLASSES, out, encoder=tiny, device="cpu", quiet=True)
    # predict refuses before it reads the run (which does not even exist here)
    with pytest.raises(OutputExistsError):
        predict(tmp_path / "no-run", store, theirs, quiet=True)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    assert main(["coder", str(store), "--classes", str(classes), "--out", str(text)]) == 2
    assert "not written by nolabels" in capsys.readouterr().err
    kn = tmp_path / "knowledge.json"
    kn.write_text('{"mine": true}')
    assert main(["coder-knowledge", "--classes", str(classes), "--out", str(kn),
                 "--base-url", "http://127.0.0.1:9", "--llm-model", "m"]) == 2
    assert "not written by nolabels" in capsys.readouterr().err
    assert kn.read_text() == '{"mine": true}'
    assert {p.name: p.read_bytes() for p in (theirs, text)} == before
    # tune: a foreign folder, a file, or a store as the run directory
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"my": "config"}')
    for out, msg in ((foreign, "not a nolabels run"), (theirs, "not a directory"),
                     (store, "holds a nolabels store")):
        with pytest.raises(OutputExistsError, match=msg):
            tune("zeroshot", store, CLASSES, out, device="cpu", quiet=True)
    assert (foreign / "config.json").read_text() == '{"my": "config"}'
    # our own output is replaced
    ours = tmp_path / "ours.parquet"
    label(store, CLASSES, ours, encoder=tiny, device="cpu", quiet=True)
    label(store, CLASSES, ours, encoder=tiny, device="cpu", quiet=True, topk=2)
    assert json.loads(pq.read_schema(ours).metadata[b"nolabels"])["topk"] == 2


def test_demo_refuses_a_foreign_folder(tmp_path):
    from nolabels.commands.demo import demo

    (tmp_path / "photos.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a nolabels demo"):
        demo(tmp_path, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["photos.txt"]


# --------------------------------------------------------------------------- awkward names
def test_non_utf8_file_name_is_embedded_and_round_trips(tmp_path, tiny):
    from nolabels.commands.label import label

    root = make_folder(tmp_path / "imgs", per_class=1)
    raw = os.fsencode(str(root / "cat")) + b"/caf\xe9-\xff.png"
    try:
        with open(raw, "wb") as f:
            f.write((root / "cat" / "000.png").read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    src = open_source(root)
    name = os.fsdecode(raw)
    assert name in src.paths
    rep = _embed(root, tmp_path / "s", tiny)
    assert rep.complete and not rep.failed and rep.rows == 4
    st = EmbeddingStore(tmp_path / "s")
    emb, meta = st.load()
    assert meta["path"] == src.paths  # exact strings back
    j = meta["path"].index(name)
    with open(meta["path"][j], "rb") as f:  # reopens the very file
        assert f.read() == (root / "cat" / "000.png").read_bytes()
    np.testing.assert_array_equal(emb[j], emb[meta["path"].index(str(root / "cat" / "000.png"))])
    d = pq.read_table(st.meta_path(0)).to_pydict()
    k = d["path_bytes"].index(raw)
    assert d["path"][k].endswith("caf\\xe9-\\xff.png")  # display text, valid UTF-8
    assert sum(b is not None for b in d["path_bytes"]) == 1
    # label writes it too: display text plus the exact bytes
    label(tmp_path / "s", CLASSES, tmp_path / "l.parquet", encoder=tiny, device="cpu", quiet=True)
    t = pq.read_table(tmp_path / "l.parquet").to_pydict()
    assert raw in t["path_bytes"] and any(p.endswith("caf\\xe9-\\xff.png") for p in t["path"])


def test_symlink_loop_lists_each_image_once(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=1)
    (root / "cat" / "loop").symlink_to(root)  # cat/loop -> the root: a loop
    (root / "dog" / "again").symlink_to(root / "dog")  # a folder linking to itself
    (root / "alias").symlink_to(root / "ship")  # two names for one folder
    outside = make_folder(tmp_path / "elsewhere", per_class=1, classes=("boat",))
    (root / "linked").symlink_to(outside / "boat")  # a symlinked folder is followed
    src = open_source(root)
    rel = [os.path.relpath(p, root) for p in src.paths]
    assert rel == ["alias/000.png", "cat/000.png", "dog/000.png", "linked/000.png"]
    assert len({os.path.realpath(p) for p in src.paths}) == len(src.paths)


# --------------------------------------------------------------------------- image modes
def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG of ``a`` (H, W) grey, (H, W, 2) grey+alpha, (H, W, 3) RGB, (H, W, 4)."""
    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def test_16bit_images_match_their_8bit_equivalent():
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (16, 16)).astype(np.uint16)
    a16 = np.minimum(a8 * 257 + rng.integers(0, 129, a8.shape), 65535).astype(np.uint16)
    ref = np.asarray(decode_image(_encode(Image.fromarray(a8.astype(np.uint8)))))
    for data in (_png16(a16),                                   # Pillow: I;16
                 _encode(Image.fromarray(a16), "TIFF"),         # I;16
                 _encode(Image.fromarray(a16), "PPM")):         # 16-bit PGM: I
        got = np.asarray(decode_image(data))
        assert got.shape == (16, 16, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
        assert got.min() < 50 and got.max() > 200  # not all white
    rgb8 = rng.integers(0, 256, (8, 8, 3)).astype(np.uint16)
    got = np.asarray(decode_image(_png16(rgb8 * 257)))
    assert np.abs(got.astype(int) - rgb8).max() <= 1
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(decode_image(_encode(f, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


def test_palette_alpha_cmyk_and_bilevel_modes_convert_correctly():
    p = Image.new("P", (3, 1))
    p.putpalette([200, 10, 20, 0, 255, 0, 5, 6, 7] + [0] * 759)
    for x in range(3):
        p.putpixel((x, 0), x)
    got = np.asarray(decode_image(_encode(p)))
    assert got[0].tolist() == [[200, 10, 20], [0, 255, 0], [5, 6, 7]]
    # palette entry 1 transparent: composited over white, not its palette colour
    got = np.asarray(decode_image(_encode(p, transparency=1)))
    assert got[0].tolist() == [[200, 10, 20], [255, 255, 255], [5, 6, 7]]
    la = Image.new("LA", (1, 1), (100, 128))
    v = round((100 * 128 + 255 * 127) / 255)
    assert np.abs(np.asarray(decode_image(_encode(la)))[0, 0].astype(int) - v).max() <= 1
    rgba = Image.new("RGBA", (1, 1), (10, 20, 30, 0))  # fully transparent
    assert np.asarray(decode_image(_encode(rgba)))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (1, 1), (100, 50, 0, 100))
    want = [round((255 - c) * (255 - 100) / 255) for c in (100, 50, 0)]
    got = np.asarray(decode_image(_encode(cmyk, "TIFF")))[0, 0].astype(int)
    assert np.abs(got - want).max() <= 1
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert np.asarray(decode_image(_encode(one)))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


# --------------------------------------------------------------------------- shard integrity
def test_truncated_shard_is_named_then_reembedded(tmp_path, tiny, capsys, caplog):
    from nolabels.cli import main
    from nolabels.commands.label import label

    root = make_folder(tmp_path / "imgs", per_class=4)  # 12 images, 3 shards
    out = tmp_path / "s"
    _embed(root, out, tiny)
    st = EmbeddingStore(out)
    ref, ref_meta = st.load()
    entry = st.manifest["shards"][1]
    assert entry["emb_bytes"] == st.emb_path(1).stat().st_size and entry["rows"] == 4
    assert len(entry["emb_blake2b"]) == 32 and entry["meta_bytes"] > 0
    data = st.emb_path(1).read_bytes()
    st.emb_path(1).write_bytes(data[:-10])
    with pytest.raises(CorruptFileError, match="emb_00001.npy.*truncated") as e:
        EmbeddingStore(out).load()
    assert e.value.path == str(st.emb_path(1))
    with pytest.raises(CorruptFileError, match="emb_00001.npy"):
        label(out, CLASSES, tmp_path / "l.parquet", encoder=tiny, device="cpu", quiet=True)
    assert main(["label", str(out), "--classes", str(_classes(tmp_path)), "--out",
                 str(tmp_path / "l.parquet"), "-q"]) == 2
    assert "emb_00001.npy" in capsys.readouterr().err
    assert EmbeddingStore(out).verify_shard(1) is not None
    caplog.set_level(logging.INFO, logger="nolabels")
    caplog.clear()
    rep = _embed(root, out, tiny, quiet=False)
    assert "shard 1 (emb_00001.npy): " in _logged(caplog)
    assert rep.shards_written == 1 and rep.images_done == 4 and rep.complete
    assert [s for s, _ in rep.extra["reembedded"]] == [1]
    emb, meta = EmbeddingStore(out).load()
    np.testing.assert_array_equal(emb, ref)
    assert meta == ref_meta
    # Same size, one flipped byte: the cheap checks pass; the resume's checksum does not.
    data = bytearray(st.emb_path(2).read_bytes())
    data[-1] ^= 0xFF
    st.emb_path(2).write_bytes(bytes(data))
    assert "checksum" in EmbeddingStore(out).verify_shard(2)
    assert EmbeddingStore(out).verify_shard(2, checksum=False) is None
    rep = _embed(root, out, tiny)
    assert [s for s, _ in rep.extra["reembedded"]] == [2] and rep.shards_written == 1
    np.testing.assert_array_equal(EmbeddingStore(out).load()[0], ref)


def _classes(d: Path) -> Path:
    p = d / "classes.txt"
    p.write_text("\n".join(CLASSES) + "\n")
    return p


def test_readers_name_the_file(tmp_path, tiny):
    root = make_folder(tmp_path / "imgs", per_class=2)
    out = tmp_path / "s"
    _embed(root, out, tiny)
    st = EmbeddingStore(out)
    st.meta_path(0).write_bytes(b"PAR1 garbage")
    with pytest.raises(CorruptFileError, match="meta_00000.parquet.*not a readable Parquet"):
        EmbeddingStore(out).load()
    with pytest.raises(CorruptFileError, match="meta_00000.parquet"):
        EmbeddingStore(out).load_meta()
    assert "meta_00000.parquet" in EmbeddingStore(out).verify_shard(0)
    # a pickled object array in place of the embeddings is refused, not unpickled
    _embed(root, out, tiny)  # the resume redoes shard 0
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}] * 2, dtype=object), allow_pickle=True)
    st.emb_path(1).write_bytes(buf.getvalue())
    with pytest.raises(CorruptFileError, match="emb_00001.npy.*pickle"):
        EmbeddingStore(out).load()
    (out / "manifest.json").write_text('{"format_version": 1, "mod')
    with pytest.raises(CorruptFileError, match="manifest.json.*not valid JSON"):
        EmbeddingStore(out)


def test_store_without_the_new_records_stays_readable(tmp_path, tiny):
    """A store written before the per-shard records (sizes, checksums, path_bytes)."""
    root = make_folder(tmp_path / "imgs", per_class=2)
    out = tmp_path / "s"
    _embed(root, out, tiny)
    st = EmbeddingStore(out)
    ref, ref_meta = st.load()
    m = json.loads((out / "manifest.json").read_text())
    del m["nolabels"]
    m["shards"] = [{"index": s["index"], "rows": s["rows"], "failed": s["failed"]}
                   for s in m["shards"]]
    (out / "manifest.json").write_text(json.dumps(m))
    for i in range(st.num_shards):
        t = pq.read_table(st.meta_path(i)).drop_columns(["path_bytes"])
        pq.write_table(t.replace_schema_metadata(None), st.meta_path(i))
    old = EmbeddingStore(out)
    assert dir_kind(out) == "store"
    emb, meta = old.load()
    np.testing.assert_array_equal(emb, ref)
    assert meta == ref_meta
    assert all(old.verify_shard(i) is None for i in range(old.num_shards))
    st.emb_path(0).write_bytes(st.emb_path(0).read_bytes()[:-4])  # the header still checks
    assert "truncated" in EmbeddingStore(out).verify_shard(0)
    rep = _embed(root, out, tiny)
    assert [s for s, _ in rep.extra["reembedded"]] == [0] and rep.complete
    np.testing.assert_array_equal(EmbeddingStore(out).load()[0], ref)


# --------------------------------------------------------------------------- modes, changes
def test_files_are_created_with_the_umask_mode(tmp_path, tiny):
    from nolabels.commands.label import label

    root = make_folder(tmp_path / "imgs", per_class=1)
    old = os.umask(0o022)
    try:
        _embed(root, tmp_path / "s", tiny)
        label(tmp_path / "s", CLASSES, tmp_path / "l.parquet", encoder=tiny, device="cpu",
              quiet=True)
        os.umask(0o027)
        _embed(root, tmp_path / "t", tiny)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "s").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert (tmp_path / "l.parquet").stat().st_mode & 0o777 == 0o644
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "t").iterdir()} == {0o640}


def test_a_changed_image_under_the_same_name_is_reembedded(tmp_path, tiny, capsys, caplog):
    caplog.set_level(logging.INFO, logger="nolabels")
    root = make_folder(tmp_path / "imgs", per_class=4)  # 12 images, 3 shards of 4
    out = tmp_path / "s"
    _embed(root, out, tiny)
    ref, _ = EmbeddingStore(out).load()
    capsys.readouterr()
    caplog.clear()
    rep = _embed(root, out, tiny, quiet=False)  # unchanged: nothing to do
    logged, err = _logged(caplog), capsys.readouterr().err
    assert rep.shards_written == 0 and "nothing to do" in logged
    assert "img/s" not in logged + err  # no "embedded 0 images (0.0 img/s)", no empty bar
    target = root / "dog" / "001.png"  # item 5: shard 1
    src = open_source(root)
    assert src.paths.index(str(target)) // 4 == 1
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    # --fingerprint paths notices only added / removed / renamed files
    rep = _embed(root, out, tiny, fingerprint="paths")
    assert rep.shards_written == 0
    caplog.clear()
    rep = _embed(root, out, tiny, quiet=False)
    logged = _logged(caplog)
    assert "shard 1" in logged and "changed" in logged and "img/s" in logged
    assert [s for s, _ in rep.extra["reembedded"]] == [1] and rep.shards_written == 1
    emb, _ = EmbeddingStore(out).load()
    changed = np.flatnonzero(np.any(emb != ref, axis=1)).tolist()
    assert changed == [5]
    assert EmbeddingStore(out).manifest["source"]["fingerprint_mode"] == "stat"


def test_shards_of_other_ranks_carry_their_records(tmp_path):
    """Under torchrun a rank writes shards that only rank 0's refresh_manifest lists: the
    records (sizes, checksum) travel in the meta file and verify before and after."""
    st = EmbeddingStore.create_or_resume(
        tmp_path / "s", model={"model_id": "m", "dim": 8},
        source={"num_items": 5, "fingerprint": "f"}, shard_size=3)
    rng = np.random.default_rng(0)
    e0 = st.write_shard(0, rng.normal(size=(3, 8)), [0, 1, 2], ["a", "b", "c"], [None] * 3, [],
                        stat_fingerprint="s0")
    st.write_shard(1, rng.normal(size=(1, 8)), [3], ["d"], [None], [(4, "e", None, "bad")])
    assert st.manifest["shards"] == []  # not committed to the manifest by this "rank"
    assert st.shard_record(0)["emb_blake2b"] == e0["emb_blake2b"]
    assert st.shard_record(0)["stat_fingerprint"] == "s0"
    data = bytearray(st.emb_path(0).read_bytes())
    data[-1] ^= 1
    st.emb_path(0).write_bytes(bytes(data))
    assert "checksum" in st.verify_shard(0)
    assert st.verify_committed() == [
        (0, "emb_00000.npy: checksum mismatch (the file changed after it was written)")]
    assert not st.shard_done(0)
    st.write_shard(0, rng.normal(size=(3, 8)), [0, 1, 2], ["a", "b", "c"], [None] * 3, [])
    m = st.refresh_manifest()
    assert m["complete"] and m["num_rows"] == 4 and [f["path"] for f in m["failed"]] == ["e"]
    for s in m["shards"]:
        assert s["emb_bytes"] == st.emb_path(s["index"]).stat().st_size
        assert s["meta_bytes"] == st.meta_path(s["index"]).stat().st_size
        assert st.verify_shard(s["index"]) is None
