"""Streaming ``label``: Parquet-dataset output, resume, bounded selection, embeddings made
elsewhere (clip-retrieval, .npy, Parquet column), torchrun (2 processes, 2 "nodes")."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pds = pytest.importorskip("pyarrow.dataset")

from nolabels import ops  # noqa: E402
from nolabels.data.store import EmbeddingStore  # noqa: E402
from nolabels.errors import InputError, OutputExistsError, StoreMismatchError  # noqa: E402
from nolabels.pipeline.label import MANIFEST, SELECTED, label  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class HashTextEncoder:
    """A text tower without weights: each text maps to a fixed random unit vector."""

    has_text = True
    logit_scale = 30.0
    not_clip = None

    def __init__(self, dim: int, model_id: str = "test:hash-text") -> None:
        self.dim, self.model_id, self.spec = dim, model_id, model_id

    def to(self, device):
        return self

    def encode_text(self, texts):
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            out.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.nn.functional.normalize(torch.stack(out), dim=1)


CLASSES = [f"class{i}" for i in range(7)]


def make_store(root: Path, n: int = 230, dim: int = 24, shard: int = 37, seed: int = 0,
               model_id: str = "test:hash-text") -> tuple[Path, np.ndarray]:
    """A complete nolabels store written by the store's own writer (no image model):
    rows clustered around the class embeddings, so labels are meaningful; skewed so some
    classes are nobody's top-1 (the fallback ranks of the selection run)."""
    rng = np.random.default_rng(seed)
    enc = HashTextEncoder(dim, model_id)
    from nolabels.methods.zeroshot import class_embeddings

    cls = class_embeddings(enc, CLASSES).numpy()
    which = rng.choice(5, size=n, p=[0.4, 0.3, 0.15, 0.1, 0.05])  # classes 5, 6: never
    emb = cls[which] + 0.9 * rng.standard_normal((n, dim)).astype(np.float32)
    st = EmbeddingStore.create_or_resume(
        root, model={"model_id": model_id, "spec": model_id, "dim": dim},
        source={"kind": "list", "root": "synthetic", "num_items": n, "fingerprint": "x"},
        shard_size=shard)
    for i in range(st.num_shards):
        items = list(st.shard_items(i))
        e = st.write_shard(i, emb[items], items, [f"img/{j}.jpg" for j in items],
                           [CLASSES[which[j]] for j in items], [])
        st.commit(e)
    return root, emb


def reference(root: Path, k: int, scale: float = 30.0, topk: int = 3):
    """Labels of the whole store in memory (the old, non-streaming way)."""
    from nolabels.methods.zeroshot import class_embeddings

    st = EmbeddingStore(root)
    emb, meta = st.load()
    enc = HashTextEncoder(st.dim)
    w = class_embeddings(enc, CLASSES)
    pl = ops.pseudo_label(torch.from_numpy(emb.astype(np.float32)), w, logit_scale=scale,
                          topk=topk, backend="torch")
    sel = ops.select_per_class(pl, k, row_ids=torch.tensor(meta["item"]), num_classes=len(CLASSES))
    return pl, meta, sel, emb, w


def test_dir_output_is_one_table_equal_to_in_memory_labels(tmp_path):
    root, _ = make_store(tmp_path / "store")
    rep = label(root, CLASSES, tmp_path / "out", select_per_class=4, topk=3,
                encoder=HashTextEncoder(24), device="cpu", quiet=True)
    out = tmp_path / "out"
    st = EmbeddingStore(root)
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == [f"part-{i:05d}.parquet" for i in range(st.num_shards)]
    assert rep.rows == 230 and rep.parts == st.num_shards and rep.computed == st.num_shards
    t = pds.dataset(out).to_table()  # `_`-prefixed files are skipped: one table
    assert t.num_rows == 230 and t.column("item").to_pylist() == list(range(230))
    pl, meta, sel, emb, w = reference(root, 4)
    # argmax: the reference logit at our index equals the reference max (ties are legal)
    x = torch.nn.functional.normalize(torch.from_numpy(emb).double(), dim=1)
    logits = x @ w.double().T
    ours = torch.tensor(t.column("label").to_pylist())
    assert torch.allclose(logits.gather(1, ours[:, None])[:, 0], logits.max(1).values, atol=1e-6)
    np.testing.assert_allclose(t.column("confidence").to_numpy(), pl.probs[:, 0].numpy(),
                               atol=1e-5)
    assert t.column("path").to_pylist() == meta["path"]
    assert t.column("true_class").to_pylist() == meta["label"]
    s = pq.read_table(out / SELECTED)
    assert s.column("item").to_pylist() == sorted(sel.indices.tolist())
    by_id = dict(zip(sel.indices.tolist(), sel.labels.tolist()))
    assert s.column("selected_for").to_pylist() == [by_id[i] for i in s.column("item").to_pylist()]
    assert set(s.column("selected_for").to_pylist()) == set(range(7))  # fallback ranks used
    m = json.loads((out / MANIFEST).read_text())
    assert m["complete"] and m["classes"] == CLASSES and m["select_per_class"] == 4
    assert sum(p["rows"] for p in m["parts"].values()) == 230
    assert m["selected"]["rows"] == len(sel.indices)


def test_other_readers_see_one_table(tmp_path):
    root, _ = make_store(tmp_path / "store", n=90)
    label(root, CLASSES, tmp_path / "out", encoder=HashTextEncoder(24), device="cpu", quiet=True)
    pd = pytest.importorskip("pandas")
    assert len(pd.read_parquet(tmp_path / "out")) == 90
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/out/part-*.parquet'").fetchall()[0][0]
    assert n == 90
    pl_ = pytest.importorskip("polars")
    assert pl_.scan_parquet(f"{tmp_path}/out/part-*.parquet").collect().height == 90


def test_resume_computes_only_missing_parts(tmp_path):
    root, _ = make_store(tmp_path / "store")
    out = tmp_path / "out"
    kw = dict(select_per_class=3, encoder=HashTextEncoder(24), device="cpu", quiet=True)
    label(root, CLASSES, out, **kw)
    first = pds.dataset(out).to_table()
    sel1 = pq.read_table(out / SELECTED)
    (out / "part-00002.parquet").unlink()  # killed before this part was committed
    p4 = out / "part-00004.parquet"
    p4.write_bytes(p4.read_bytes()[:100])  # a truncated part does not count as done
    stamp = (out / "part-00000.parquet").stat().st_mtime_ns
    rep = label(root, CLASSES, out, **kw)
    assert rep.computed == 2
    assert (out / "part-00000.parquet").stat().st_mtime_ns == stamp
    assert pds.dataset(out).to_table().equals(first)
    assert pq.read_table(out / SELECTED).equals(sel1)  # re-merged from the parts' columns
    assert label(root, CLASSES, out, **kw).computed == 0


def test_other_settings_refused_overwrite_replaces_only_ours(tmp_path):
    root, _ = make_store(tmp_path / "store", n=60)
    out = tmp_path / "out"
    kw = dict(encoder=HashTextEncoder(24), device="cpu", quiet=True)
    label(root, CLASSES, out, **kw)
    with pytest.raises(StoreMismatchError, match="logit_scale"):
        label(root, CLASSES, out, logit_scale=5.0, **kw)
    (out / "notes.txt").write_text("mine")
    rep = label(root, CLASSES, out, logit_scale=5.0, overwrite=True, **kw)
    assert rep.computed == rep.parts and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / MANIFEST).read_text())["logit_scale"] == 5.0

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-00000.parquet").write_bytes(b"user data")
    with pytest.raises(OutputExistsError, match="not empty"):
        label(root, CLASSES, foreign, overwrite=True, **kw)
    assert (foreign / "part-00000.parquet").read_bytes() == b"user data"
    user_file = tmp_path / "theirs.parquet"
    pq.write_table(pa.table({"x": [1]}), user_file)
    before = user_file.read_bytes()
    with pytest.raises(OutputExistsError):
        label(root, CLASSES, user_file, overwrite=True, **kw)
    assert user_file.read_bytes() == before


def test_single_file_equals_dataset_plus_selected(tmp_path):
    root, _ = make_store(tmp_path / "store")
    kw = dict(select_per_class=3, encoder=HashTextEncoder(24), device="cpu", quiet=True)
    label(root, CLASSES, tmp_path / "d", **kw)
    label(root, CLASSES, tmp_path / "f.parquet", **kw)
    f = pq.read_table(tmp_path / "f.parquet")
    d = pds.dataset(tmp_path / "d").to_table()
    assert [c for c in f.column_names if c != "selected"] == d.column_names
    for c in d.column_names:
        assert f.column(c).to_pylist() == d.column(c).to_pylist(), c
    sel = set(pq.read_table(tmp_path / "d" / SELECTED).column("item").to_pylist())
    assert [i for i, s in zip(f.column("item").to_pylist(), f.column("selected").to_pylist())
            if s] == sorted(sel)
    assert not list(tmp_path.glob(".f.parquet*"))  # the work folder is gone
    assert json.loads(f.schema.metadata[b"nolabels"])["classes"] == CLASSES
    # re-running over our own file replaces it
    label(root, CLASSES, tmp_path / "f.parquet", **kw)


def _foreign_layouts(root: Path, tmp: Path, emb: np.ndarray) -> dict[str, tuple[Path, dict]]:
    """The store's rows in the layouts other tools write: float32, not normalised."""
    st = EmbeddingStore(root)
    e, meta = st.load()
    rng = np.random.default_rng(5)
    raw = e.astype(np.float32) * rng.uniform(0.5, 20, size=(e.shape[0], 1)).astype(np.float32)
    paths = meta["path"]
    cr = tmp / "clipret"
    (cr / "img_emb").mkdir(parents=True)
    (cr / "metadata").mkdir()
    cut = [0, 100, 170, e.shape[0]]
    for i in range(3):
        np.save(cr / "img_emb" / f"img_emb_{i}.npy", raw[cut[i]:cut[i + 1]].astype(np.float16))
        pq.write_table(pa.table({"image_path": paths[cut[i]:cut[i + 1]],
                                 "caption": ["c"] * (cut[i + 1] - cut[i])}),
                       cr / "metadata" / f"metadata_{i}.parquet", row_group_size=16)
    npy = tmp / "emb.npy"
    np.save(npy, raw)
    pq.write_table(pa.table({"path": paths}), tmp / "emb.parquet")
    pqf = tmp / "embcol.parquet"
    pq.write_table(pa.table({"url": paths, "embedding": list(raw)}), pqf, row_group_size=50)
    return {"clip-retrieval": (cr, {}), "npy": (npy, {}), "parquet": (pqf, {})}


def test_embeddings_made_elsewhere_give_the_store_labels(tmp_path):
    root, emb = make_store(tmp_path / "store")
    enc = HashTextEncoder(24)
    label(root, CLASSES, tmp_path / "ref", encoder=enc, device="cpu", quiet=True)
    ref = pds.dataset(tmp_path / "ref").to_table()
    for name, (path, kw) in _foreign_layouts(root, tmp_path, emb).items():
        out = tmp_path / f"out-{name}"
        label(path, CLASSES, out, encoder=enc, device="cpu", quiet=True, **kw)
        t = pds.dataset(out).to_table()
        assert t.column("item").to_pylist() == list(range(230)), name
        assert t.column("path").to_pylist() == ref.column("path").to_pylist(), name
        # fp16 storage of unnormalised rows: compare labels where the margin is clear
        a, b = np.array(t.column("label")), np.array(ref.column("label"))
        tp = np.stack(ref.column("topk_probs").to_numpy(zero_copy_only=False))
        clear = (tp[:, 0] - tp[:, 1]) > 1e-2
        assert (a[clear] == b[clear]).all(), name
        np.testing.assert_allclose(t.column("confidence").to_numpy(),
                                   ref.column("confidence").to_numpy(), atol=2e-3)


def test_foreign_embeddings_need_a_model_with_their_dim(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(InputError, match="--model"):
        label(tmp_path / "x.npy", CLASSES, tmp_path / "o", device="cpu", quiet=True)
    with pytest.raises(InputError, match="D=8"):
        label(tmp_path / "x.npy", CLASSES, tmp_path / "o", encoder=HashTextEncoder(16),
              device="cpu", quiet=True)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_arguments_before_any_work(tmp_path):
    root, _ = make_store(tmp_path / "store", n=20)
    for kw in ({"select_per_class": 0}, {"topk": 0}, {"logit_scale": 0.0},
               {"logit_scale": float("nan")}):
        with pytest.raises(InputError):
            label(root, CLASSES, tmp_path / "o", encoder=HashTextEncoder(24), device="cpu",
                  quiet=True, **kw)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- torchrun
LABEL_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[3])
from test_label_stream import CLASSES, HashTextEncoder
from nolabels.pipeline.label import label
label(sys.argv[1], CLASSES, sys.argv[2], select_per_class=3, encoder=HashTextEncoder(24),
      device="cpu", quiet=True)
"""


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "python"),
            "TORCHELASTIC_ERROR_FILE": str(tmp_path / "torchelastic_error.json")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_output(a: Path, b: Path) -> None:
    pa_ = sorted(p.name for p in a.glob("part-*"))
    assert pa_ == sorted(p.name for p in b.glob("part-*"))
    for name in pa_:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    assert pq.read_table(a / SELECTED).equals(pq.read_table(b / SELECTED))
    ma, mb = json.loads((a / MANIFEST).read_text()), json.loads((b / MANIFEST).read_text())
    assert {k: v for k, v in ma.items() if k != "parts"} == \
        {k: v for k, v in mb.items() if k != "parts"}


def _single_process_run(tmp_path: Path) -> tuple[Path, Path]:
    """A store, the torchrun script, and the single-process labels in ``tmp_path/one``
    (one thread, as each torchrun process has)."""
    root, _ = make_store(tmp_path / "store")
    script = tmp_path / "lab.py"
    script.write_text(LABEL_SCRIPT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        label(root, CLASSES, tmp_path / "one", select_per_class=3, encoder=HashTextEncoder(24),
              device="cpu", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root, script


def test_torchrun_two_processes_write_the_same_parts(tmp_path):
    root, script = _single_process_run(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(script), str(root), str(tmp_path / "two"), str(REPO / "tests")]
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_output(tmp_path / "one", tmp_path / "two")


def test_torchrun_two_nodes_on_one_machine(tmp_path):
    """``--nnodes 2`` with a c10d rendezvous on localhost: multi-node is exercised."""
    root, script = _single_process_run(tmp_path)
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
               str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-id", "nolabels-test", str(script), str(root),
               str(tmp_path / "nodes"), str(REPO / "tests")]
        procs.append(subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    _same_output(tmp_path / "one", tmp_path / "nodes")


@pytest.mark.parametrize("flush_rows", [1, 50, 10_000])
def test_bounded_selection_equals_global_selection(flush_rows, gen):
    """Rows fed in shards, re-selected whenever the buffer passes ``flush_rows``: the same
    subset as ``ops.select_per_class`` over all rows, with at most C·K rows kept."""
    from nolabels.pipeline.label import _Candidates

    n, c, k = 1500, 11, 4
    logits = torch.randn(n, c, generator=gen) * 3
    logits[:, 8:] -= 12  # rare classes: the rank-2/3 fallback decides them
    full = ops.pseudo_label(logits, torch.eye(c), logit_scale=1.0, topk=3, normalize=False)
    ids = torch.randperm(n, generator=gen) * 3 + 7  # sparse, shuffled global ids
    cand = _Candidates(k, c, flush_rows=flush_rows)
    for a in range(0, n, 97):
        cand.add(ids[a:a + 97], full.classes[a:a + 97], full.probs[a:a + 97])
        assert cand.ids.numel() <= c * k
    got_ids, got_for = cand.selection()
    ref = ops.select_per_class(full, k, row_ids=ids, num_classes=c)
    o = torch.argsort(ref.indices)
    assert torch.equal(got_ids, ref.indices[o]) and torch.equal(got_for, ref.labels[o])
    assert int((torch.bincount(full.labels, minlength=c) == 0).sum()) >= 1


@pytest.mark.parametrize("quantum", [None, 0.05])
def test_prefilter_is_exact_and_drops_rows(quantum, gen):
    """The candidates drop rows that can never be selected before buffering them: the
    selection (and the kept paths) still equal ``ops.select_per_class`` over all rows,
    with ties in probability (quantised) and classes decided by the rank-2/3 fallback,
    while most rows of a long stream never reach the buffer."""
    from nolabels.pipeline.label import _Candidates

    n, c, k = 6000, 13, 5
    logits = torch.randn(n, c, generator=gen) * 3
    logits[:, 9:] -= 12  # rare classes: the rank-2/3 fallback decides them
    full = ops.pseudo_label(logits, torch.eye(c), logit_scale=1.0, topk=3, normalize=False)
    probs = full.probs if quantum is None else torch.round(full.probs / quantum) * quantum
    full = full._replace(probs=probs)
    ids = torch.randperm(n, generator=gen) * 5 + 1
    paths = [f"img/{int(i)}.jpg" for i in ids]
    cand = _Candidates(k, c, flush_rows=200)
    for a in range(0, n, 250):
        cand.add(ids[a:a + 250], full.classes[a:a + 250], full.probs[a:a + 250],
                 paths[a:a + 250])
    got_ids, got_for = cand.selection()
    ref = ops.select_per_class(full, k, row_ids=ids, num_classes=c)
    o = torch.argsort(ref.indices)
    assert torch.equal(got_ids, ref.indices[o]) and torch.equal(got_for, ref.labels[o])
    assert cand.paths.to_pylist() == [f"img/{i}.jpg" for i in cand.ids.tolist()]
    assert cand._need is not None and cand.dropped > n // 2


def test_killed_run_is_recognised_and_resumed(tmp_path, monkeypatch):
    """A run that dies after some parts leaves a folder ``label`` recognises as its own
    (manifest written up front) and finishes without recomputing the committed parts."""
    import nolabels.pipeline.label as lab

    root, _ = make_store(tmp_path / "store")
    out = tmp_path / "out"
    calls = {"n": 0}
    real_put = lab._Writer.put

    def dying_put(self, path, table):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real_put(self, path, table)

    monkeypatch.setattr(lab._Writer, "put", dying_put)
    kw = dict(select_per_class=3, encoder=HashTextEncoder(24), device="cpu", quiet=True)
    with pytest.raises(KeyboardInterrupt):
        label(root, CLASSES, out, **kw)
    monkeypatch.setattr(lab._Writer, "put", real_put)
    assert len(list(out.glob("part-*.parquet"))) == 2
    assert not json.loads((out / MANIFEST).read_text())["complete"]
    rep = label(root, CLASSES, out, **kw)
    assert rep.computed == rep.parts - 2
    label(root, CLASSES, tmp_path / "fresh", **kw)
    _same_output(out, tmp_path / "fresh")


def test_eval_reads_a_dataset_like_the_file(tmp_path):
    """``evaluate`` streams a labels directory and gives the file's numbers."""
    from nolabels.pipeline.evaluate import evaluate

    root, _ = make_store(tmp_path / "store")
    kw = dict(select_per_class=3, encoder=HashTextEncoder(24), device="cpu", quiet=True)
    label(root, CLASSES, tmp_path / "d", **kw)
    label(root, CLASSES, tmp_path / "f.parquet", **kw)
    a, b = evaluate(tmp_path / "d"), evaluate(tmp_path / "f.parquet")
    a.pop("labels"), b.pop("labels")
    assert a == b
    t = pds.dataset(tmp_path / "d").to_table()
    truth = [CLASSES.index(c) for c in t.column("true_class").to_pylist()]
    pred = t.column("label").to_pylist()
    assert a["accuracy"] == sum(p == y for p, y in zip(pred, truth)) / len(pred)
    assert a["selected"]["rows"] == pq.read_table(tmp_path / "d" / SELECTED).num_rows
    assert sum(map(sum, a["confusion"])) == 230


def test_the_api_imports_on_its_own():
    """The public API is importable by itself (which floor may import what, including that
    nothing below the command line imports nolabels.commands: tests/test_architecture.py)."""
    from nolabels import api

    assert callable(api.label) and callable(api.tune) and callable(api.coder)


def test_grouped_kernel_calls_split_back_into_parts(tmp_path, monkeypatch):
    """Shards are labelled in groups of about CHUNK_ROWS rows, kernel chunks crossing shard
    boundaries; the parts are the same as labelling each shard alone."""
    import nolabels.pipeline.label as lab

    root, _ = make_store(tmp_path / "store")  # 37-row shards
    kw = dict(select_per_class=3, encoder=HashTextEncoder(24), device="cpu", quiet=True)
    label(root, CLASSES, tmp_path / "big", **kw)
    monkeypatch.setattr(lab, "CHUNK_ROWS", 50)  # groups of 2 shards, chunks of 50 rows
    label(root, CLASSES, tmp_path / "small", **kw)
    a, b = pds.dataset(tmp_path / "big").to_table(), pds.dataset(tmp_path / "small").to_table()
    for c in a.column_names:
        if c in ("confidence", "entropy", "topk_probs"):
            np.testing.assert_allclose(np.array(a.column(c).to_pylist(), dtype=float),
                                       np.array(b.column(c).to_pylist(), dtype=float), atol=1e-6)
        else:
            assert a.column(c).to_pylist() == b.column(c).to_pylist(), c
    assert len(list((tmp_path / "small").glob("part-*.parquet"))) == EmbeddingStore(root).num_shards
