"""torchrun scale-out on 2 CPU processes (gloo): collectives, the merged per-class
selection, and ``torchrun -m nolabels embed|label`` equal to the single-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _pipeline_helpers import make_folder, tiny_config, tiny_spec

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "python"),
           "TORCHELASTIC_ERROR_FILE": str(tmp_path / "torchelastic_error.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=tmp_path, check=False)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    return res


COLLECTIVES = r"""
import json, sys, torch
from nolabels import dist
with dist.dist_session("cpu") as ctx:
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    # all_gather_variable: uneven sizes, one rank empty in the second call
    x = torch.arange(3 * (ctx.rank + 1) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * ctx.rank
    g = dist.all_gather_variable(x)
    e = dist.all_gather_variable(torch.ones(ctx.rank, 4, dtype=torch.int64))
    s = dist.all_gather_strings(["a", None, "\u00e9t\u00e9"] if ctx.rank == 0 else ["b"])
    out = {"g": g.tolist(), "e": e.tolist(), "s": s, "obj": dist.all_gather_object(ctx.rank * 10)}
    if ctx.rank == 0:
        json.dump(out, open(sys.argv[1], "w"))
"""

# ``label``'s selection under torchrun: each rank labels its shards and keeps bounded
# candidates (groups of CHUNK_ROWS rows: several adds, flushes and prefilter passes per
# rank), the candidates are gathered and merged on every rank, rank 0 writes them.
SELECTION = r"""
import sys, torch
from nolabels import dist
from nolabels.data.sources import NpySource
from nolabels.pipeline import label as lab
npy, out, k, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lab.CHUNK_ROWS = rows
with dist.dist_session("cpu"):
    src = NpySource(npy, max_rows=rows // 2)
    c = src.dim
    info = {"classes": [f"c{i}" for i in range(c)], "model_id": "test-logits"}
    rep = lab.label_source(src, torch.eye(c), out, info, scale=1.0, topk=3, normalize=False,
                           select_per_class=k, quiet=True)
    assert rep.selected is not None and rep.rows == src.num_rows
"""


def test_collectives(tmp_path):
    script = tmp_path / "coll.py"
    script.write_text(COLLECTIVES)
    _torchrun([str(script), str(tmp_path / "out.json")], tmp_path)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["g"] == ([[float(2 * i), float(2 * i + 1)] for i in range(3)]
                        + [[100.0 + 2 * i, 101.0 + 2 * i] for i in range(6)])
    assert out["e"] == [[1, 1, 1, 1]]
    assert out["s"] == ["a", None, "\u00e9t\u00e9", "b"]
    assert out["obj"] == [0, 10]


def test_label_selection_merged_across_ranks_equals_global_selection(tmp_path):
    """``label_source``'s per-class selection on 2 ranks (interleaved shards, candidates
    merged through the collectives) is ``ops.select_per_class`` over all rows."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from nolabels import ops

    gen = torch.Generator().manual_seed(7)
    n, c, k, rows = 24_000, 9, 5, 1_000
    logits = torch.randn(n, c, generator=gen) * 3
    logits[:, 7:] -= 14  # classes 7, 8 never top-1: the fallback ranks decide them
    np.save(tmp_path / "x.npy", logits.numpy())
    paths = [f"img/{i:05d}.jpg" for i in range(n)]
    pq.write_table(pa.table({"path": paths}), tmp_path / "x.parquet")  # NpySource's sidecar
    script = tmp_path / "sel.py"
    script.write_text(SELECTION)
    _torchrun([str(script), str(tmp_path / "x.npy"), str(tmp_path / "out"), str(k), str(rows)],
              tmp_path)

    full = ops.pseudo_label(logits, torch.eye(c), logit_scale=1.0, topk=3, normalize=False)
    ref = ops.select_per_class(full, k, num_classes=c)
    o = torch.argsort(ref.indices)
    assert int((torch.bincount(full.labels, minlength=c) == 0).sum()) >= 1  # fallback used
    got = pq.read_table(tmp_path / "out" / "_selected.parquet").to_pydict()
    assert got["item"] == ref.indices[o].tolist()
    assert got["selected_for"] == ref.labels[o].tolist()
    assert got["path"] == [paths[i] for i in got["item"]]  # carried through the gather
    manifest = json.loads((tmp_path / "out" / "_nolabels.json").read_text())
    assert manifest["num_parts"] == 2 * n // rows and manifest["complete"]
    assert manifest["selected"]["rows"] == len(got["item"])


def test_dist_helpers_single_process():
    from nolabels import dist

    with dist.dist_session("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
        t = torch.arange(3)
        assert dist.all_gather_variable(t) is t
        assert dist.broadcast_object({"a": 1}) == {"a": 1}
        assert dist.all_gather_object(5) == [5]
        dist.barrier()


def test_torchrun_embed_label_equals_single_process(tmp_path):
    pytest.importorskip("open_clip")
    pq = pytest.importorskip("pyarrow.parquet")
    from nolabels.cli import main
    from nolabels.data import EmbeddingStore

    cfg = tiny_config(tmp_path)
    spec = tiny_spec(cfg)
    root = make_folder(tmp_path / "imgs", per_class=6)
    (root / "dog" / "zz_bad.png").write_bytes(b"broken")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nship\nairplane\nfrog\n")
    common = ["--shard-size", "3", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    label_args = ["--classes", str(classes), "--select-per-class", "2", "--topk", "3",
                  "--device", "cpu"]

    # Distributed: 2 ranks, gloo.
    _torchrun(["-m", "nolabels", "embed", str(root), "--model", spec, "--out",
               str(tmp_path / "s2"), *common, "-q"], tmp_path)
    _torchrun(["-m", "nolabels", "label", str(tmp_path / "s2"), *label_args, "--out",
               str(tmp_path / "l2.parquet"), "-q"], tmp_path)

    # Single process, same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["embed", str(root), "--model", spec, "--out", str(tmp_path / "s1"),
                     *common, "-q"]) == 0
        assert main(["label", str(tmp_path / "s1"), *label_args, "--out",
                     str(tmp_path / "l1.parquet"), "-q"]) == 0
    finally:
        torch.set_num_threads(threads)

    a, b = EmbeddingStore(tmp_path / "s1"), EmbeddingStore(tmp_path / "s2")
    assert b.complete and b.num_shards == 7
    for key in ("shards", "num_rows", "failed", "model", "source"):
        assert a.manifest[key] == b.manifest[key], key
    ea, ma = a.load()
    eb, mb = b.load()
    assert ma == mb
    np.testing.assert_array_equal(ea, eb)

    t1, t2 = pq.read_table(tmp_path / "l1.parquet"), pq.read_table(tmp_path / "l2.parquet")
    c1, c2 = t1.to_pydict(), t2.to_pydict()
    assert c1.keys() == c2.keys() and "selected" in c1
    for k in c1:
        assert c1[k] == c2[k], k  # row for row, exactly
    assert sum(c1["selected"]) >= 3
    m1 = json.loads(t1.schema.metadata[b"nolabels"])
    m2 = json.loads(t2.schema.metadata[b"nolabels"])
    m1.pop("input"), m2.pop("input")
    assert m1 == m2


def test_cuda_kernels_refused_on_an_old_driver_or_gpu(monkeypatch):
    """A driver older than the static CUDA runtime, or a GPU below the built SMs, makes the
    cuda backend unavailable with the reason (auto falls back) instead of failing at launch."""
    from nolabels import backends

    info = {"cuda_compiler_version": "13.0.88", "cuda_archs": "80-real;90"}
    monkeypatch.setattr(backends, "_driver_cuda_version", lambda: 12040)
    why = backends.cuda_runtime_problem(info, device=0)
    assert "driver supports CUDA 12.4 < 13.0" in why
    monkeypatch.setattr(backends, "_driver_cuda_version", lambda: 13000)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    why = backends.cuda_runtime_problem(info, device=0)
    assert "compute capability 7.5 < 8.0" in why and "T4" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert backends.cuda_runtime_problem(info, device=0) is None
    assert backends._min_arch("90;80-real;100") == (8, 0)
