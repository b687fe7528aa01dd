"""No file nolabels reads can execute code, and caches are keyed by what made them.

A pickle whose ``__reduce__`` creates a marker file is planted at every path a command
loads (run directory, trainer checkpoints, coder STORE / --shots / text cache, store
shards, model checkpoints); the real code paths must refuse it with a one-line error
naming the file (exit status 2 on the command line), and the marker never appears.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nolabels.cli import main
from nolabels.data.safe_io import (
    atomic_write,
    load_npy,
    load_torch_file,
    load_tree,
    save_tree,
)
from nolabels.errors import CorruptFileError, InputError
from nolabels.methods import coder as C
from nolabels.methods.trainer import (
    TrainConfig,
    TrainingInterrupted,
    TrainTask,
    checkpoint_path,
    fit,
)
from torch import nn


# ----------------------------------------------------------------------------- payloads
class Payload:
    """Unpickling this creates the file ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path_factory):
    """The marker path; every test using it checks it never appeared."""
    m = tmp_path_factory.mktemp("marker") / "CODE-WAS-EXECUTED"
    yield m
    assert not m.exists(), "a file nolabels read executed code"


def pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_pickle(path: Path, marker: Path) -> Path:
    torch.save({"emb": torch.zeros(2, 2), "x": Payload(marker)}, path)
    return path


def pickled_npy(path: Path, marker: Path) -> Path:
    np.save(path, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    return path


def test_the_payloads_are_live(tmp_path):
    """Loaded unsafely, each payload runs (so the tests below are not vacuous)."""
    for i, load in enumerate([
        lambda m: pickle.loads(pickle_bytes(m)),
        lambda m: torch.load(torch_pickle(tmp_path / "p.pt", m), weights_only=False),
        lambda m: np.load(pickled_npy(tmp_path / "p.npy", m), allow_pickle=True),
    ]):
        m = tmp_path / f"marker{i}"
        load(m)
        assert m.exists()


def one_line_error(capsys, command: str, path: Path) -> str:
    """The error is one line, the last, naming ``path``; no traceback. Lines before it may
    only be the command's own log lines (e.g. which defaults it uses)."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert all(ln.startswith(f"{command}: ") for ln in lines[:-1]), err
    last = lines[-1]
    assert last.startswith(f"nolabels {command}: error: ") and str(path) in last, err
    return last


# ----------------------------------------------------------------------------- safe_io
def test_tree_roundtrip_with_optimizer_state(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 4)

    def setup():
        m = nn.Linear(4, 3)
        opt = torch.optim.AdamW(m.parameters(), lr=0.1, betas=(0.8, 0.9))
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def step(m, opt, sch):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
        sch.step()

    m, opt, sch = setup()
    step(m, opt, sch)
    step(m, opt, sch)
    tree = {"model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": sch.state_dict(),
            "history": [{"loss": 0.25, "nan": float("nan"), "inf": -math.inf, "none": None}],
            "pair": (1, "a", True), "by_int": {0: "zero", 7: [1.5]}, "$odd": {"$x": 1},
            "half": torch.arange(6, dtype=torch.bfloat16).view(2, 3).t(),  # non-contiguous
            "view": m.weight.view(-1)}  # shares storage with model.weight
    p = tmp_path / "ck.safetensors"
    save_tree(p, tree, kind="test.checkpoint")
    back = load_tree(p, kind="test.checkpoint")
    assert back["pair"] == (1, "a", True) and back["by_int"] == {0: "zero", 7: [1.5]}
    assert back["$odd"] == {"$x": 1}
    h = back["history"][0]
    assert h["loss"] == 0.25 and math.isnan(h["nan"]) and h["inf"] == -math.inf and h["none"] is None
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert set(back["optimizer"]["state"]) == {0, 1}
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], tree["half"])
    assert torch.equal(back["view"], m.weight.detach().view(-1))
    assert back["scheduler"] == sch.state_dict()
    # objects resumed from the file take exactly the step the originals take
    m2, opt2, sch2 = setup()
    m2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    sch2.load_state_dict(back["scheduler"])
    step(m, opt, sch)
    step(m2, opt2, sch2)
    assert torch.equal(m.weight, m2.weight) and torch.equal(m.bias, m2.bias)
    # it is a plain safetensors file: tensors + JSON metadata, no pickle
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        md = f.metadata()
        assert '{"$tuple":[1,"a",true]}' in md["nolabels.tree"]
        json.loads(md["nolabels.tree"])
        assert "optimizer/state/0/exp_avg" in set(f.keys())


def test_tree_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_tree(tmp_path / "a.safetensors", {"x": torch.ones(1)}, kind="t")
        atomic_write(tmp_path / "b.bin", b"x")
        os.umask(0o077)
        save_tree(tmp_path / "c.safetensors", {"x": torch.ones(1)}, kind="t")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.bin", "c.safetensors"]


def test_tree_refuses_what_it_did_not_write(tmp_path, marker):
    good = tmp_path / "good.safetensors"
    save_tree(good, {"w": torch.randn(8, 8)}, kind="test.a")
    data = good.read_bytes()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    bad = {
        "truncated": data[:-7], "garbage": os.urandom(64), "empty": b"",
        "pickle": pickle_bytes(marker),
        "torch-pickle": torch_pickle(tmp_path / "tp.pt", marker).read_bytes(),
    }
    for name, blob in bad.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(CorruptFileError) as ei:
            load_tree(p)
        assert str(p) in str(ei.value) and "\n" not in str(ei.value), name
    with pytest.raises(CorruptFileError, match="not one nolabels wrote"):
        load_tree(tmp_path / "foreign.safetensors")
    with pytest.raises(CorruptFileError, match="not a 'test.b'"):
        load_tree(good, kind="test.b")
    with pytest.raises(FileNotFoundError):
        load_tree(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="set"):
        save_tree(tmp_path / "x.safetensors", {"a": {1, 2}}, kind="t")


def test_foreign_torch_and_npy_files(tmp_path, marker):
    with pytest.raises(CorruptFileError, match="pickled Python objects") as ei:
        load_torch_file(torch_pickle(tmp_path / "x.pt", marker))
    assert "\n" not in str(ei.value)
    (tmp_path / "raw.pt").write_bytes(pickle_bytes(marker))
    with pytest.raises(CorruptFileError, match="raw.pt"):
        load_torch_file(tmp_path / "raw.pt")
    with pytest.raises(CorruptFileError, match="p.npy"):
        load_npy(pickled_npy(tmp_path / "p.npy", marker))
    np.save(tmp_path / "ok.npy", np.arange(6.0))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="trunc.npy"):
        load_npy(tmp_path / "trunc.npy")
    assert load_npy(tmp_path / "ok.npy").tolist() == list(np.arange(6.0))


# ----------------------------------------------------------------------------- trainer
class _Rows(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        return self.x[key[1]]


class _Module(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x).pow(2).mean(), {}


class TinyTask(TrainTask):
    name = "tiny"
    criterion = "score"

    def __init__(self):
        torch.manual_seed(0)
        self.module = _Module()
        self.train_ds = _Rows(torch.randn(8, 3))

    def make_optimizer(self):
        return torch.optim.AdamW(self.module.parameters(), lr=0.01)

    def evaluate(self, epoch):
        return {"score": -float(self.module.lin.weight.norm())}


@pytest.mark.parametrize("which", ["resume", "best", "final"])
def test_trainer_never_unpickles_a_checkpoint(tmp_path, marker, which):
    cfg = dict(epochs=3, batch_size=4, seed=0, quiet=True)
    if which == "final":
        fit(TinyTask(), TrainConfig(**cfg), tmp_path)
    else:  # killed in epoch 2: a resume checkpoint and the best epoch so far
        with pytest.raises(TrainingInterrupted):
            fit(TinyTask(), TrainConfig(**cfg, stop_after_steps=3), tmp_path)
    p = checkpoint_path(tmp_path, "tiny", which)
    assert p.is_file()
    torch_pickle(p, marker)
    with pytest.raises(CorruptFileError) as ei:
        fit(TinyTask(), TrainConfig(**cfg), tmp_path)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_trainer_ignores_old_pickled_checkpoints(tmp_path, marker):
    (tmp_path / "checkpoints").mkdir()
    for name in ("tiny.pt", "tiny.final.pt"):
        torch_pickle(tmp_path / "checkpoints" / name, marker)
    lines = []
    r = fit(TinyTask(), TrainConfig(epochs=1, batch_size=4), tmp_path, log=lines.append)
    assert r.resumed_from is None and r.steps == 2
    assert any("never loaded" in ln and "tiny.final.pt" in ln for ln in lines)


# ----------------------------------------------------------------------------- tune / predict
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("open_clip")
    pytest.importorskip("pyarrow")
    from _methods_helpers import tiny_setup

    d = tmp_path_factory.mktemp("trust")
    t = tiny_setup(d, per_class=3)
    (d / "classes.txt").write_text("cat\ndog\nship\n")
    return d, t


def test_predict_never_unpickles_a_run(env, tmp_path, marker, capsys):
    d, t = env
    run = tmp_path / "run"
    assert main(["tune", "--method", "zeroshot", str(t.store), "--classes", str(d / "classes.txt"),
                 "--out", str(run), "-q"]) == 0
    predict = ["predict", str(run), str(t.store), "--workers", "0", "-q", "--out"]
    assert main([*predict, str(tmp_path / "ok.parquet")]) == 0
    model = run / "model.safetensors"
    good = model.read_bytes()
    for i, blob in enumerate([pickle_bytes(marker), torch_pickle(tmp_path / "x.pt", marker).read_bytes(),
                              good[: len(good) // 2]]):
        model.write_bytes(blob)
        capsys.readouterr()
        assert main([*predict, str(tmp_path / f"p{i}.parquet")]) == 2
        one_line_error(capsys, "predict", model)
    # a run directory of an older nolabels: its pickled model.pt is never loaded
    model.unlink()
    torch_pickle(run / "model.pt", marker)
    assert main([*predict, str(tmp_path / "old.parquet")]) == 2
    assert "re-run `nolabels tune`" in one_line_error(capsys, "predict", run / "model.pt")
    model.write_bytes(good)
    (run / "config.json").write_bytes(pickle_bytes(marker))
    assert main([*predict, str(tmp_path / "cfg.parquet")]) == 2
    one_line_error(capsys, "predict", run / "config.json")


def test_tune_never_unpickles_its_checkpoints(env, tmp_path, marker, capsys):
    d, t = env
    run = tmp_path / "run"
    args = ["tune", "--method", "lafter", str(t.store), "--classes", str(d / "classes.txt"),
            "--out", str(run), "--num-prompts", "2", "--text-steps", "4", "--epochs", "1",
            "--batch-size", "6", "-q"]
    assert main(args) == 0
    finals = sorted((run / "checkpoints").glob("*.final.safetensors"))
    assert [p.name for p in finals] == ["lafter.final.safetensors", "lafter_text.final.safetensors"]
    assert not list(run.rglob("*.pt"))
    for p in finals:  # a re-run loads the finished stages
        good = p.read_bytes()
        torch_pickle(p, marker)
        capsys.readouterr()
        assert main(args) == 2
        one_line_error(capsys, "tune", p)
        p.write_bytes(good)
    assert main(args) == 0


# ----------------------------------------------------------------------------- models
def test_model_checkpoints_are_weights_only(env, tmp_path, marker, capsys):
    from _pipeline_helpers import tiny_config
    from nolabels.models import load_encoder

    d, t = env
    ck = torch_pickle(tmp_path / "weights.pt", marker)
    cfg = tiny_config(tmp_path)
    capsys.readouterr()
    assert main(["embed", str(t.images), "--model", f"openclip:{cfg}", "--checkpoint", str(ck),
                 "--out", str(tmp_path / "store"), "-q"]) == 2
    one_line_error(capsys, "embed", ck)
    pytest.importorskip("timm")
    with pytest.raises(CorruptFileError, match="weights.pt"):
        load_encoder("timm:test_vit", checkpoint=ck)
    from nolabels.models.surrogate import load_efficientnet_lite0

    with pytest.raises(CorruptFileError, match="weights.pt"):
        load_efficientnet_lite0(checkpoint=ck)


# ----------------------------------------------------------------------------- coder
class BowEncoder:
    """Deterministic bag-of-words text encoder; ``salt`` makes another model."""

    def __init__(self, salt: str, dim: int = 32):
        self.salt, self.dim = salt, dim
        self.model_id = f"test:bow-{salt}"

    def encode_text(self, texts):
        def word(w):
            h = hashlib.sha256(f"{self.salt}:{w.lower()}".encode()).digest()[:8]
            return torch.randn(self.dim, generator=torch.Generator().manual_seed(
                int.from_bytes(h, "little")))
        return F.normalize(torch.stack([sum(word(w) for w in t.replace(".", " ").split())
                                        for t in texts]), dim=1)


def make_a():  # --encoder test_trust_files:make_a
    return BowEncoder("a")


def make_b():  # --encoder test_trust_files:make_b
    return BowEncoder("b")


CLASSES = ["cat", "dog", "ship", "frog"]


@pytest.fixture
def coder_inputs(tmp_path):
    """Images embedded by model A (their text directions + noise) as a .pt STORE."""
    g = torch.Generator().manual_seed(0)
    names = make_a().encode_text([f"a photo of a {c}." for c in CLASSES])
    y = torch.arange(4).repeat_interleave(5)
    x = names[y] + 0.4 * torch.randn(20, 32, generator=g)
    paths = [f"imgs/{CLASSES[i]}/{j}.jpg" for j, i in enumerate(y.tolist())]
    torch.save({"emb": x, "paths": paths, "model_id": "test:bow-a"}, tmp_path / "store.pt")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return tmp_path


def _coder(tmp: Path, store: str, out: str, *extra: str) -> int:
    return main(["coder", store, "--classes", str(tmp / "classes.txt"), "--out", str(tmp / out),
                 "--templates", "default", "--cache-dir", str(tmp / "cache"), *extra])


def _preds(path: Path) -> list[int]:
    lines = path.read_text().splitlines()
    col = lines[0].split(",").index("pred")
    return [int(ln.split(",")[col]) for ln in lines[1:]]


def test_coder_text_cache_is_keyed_by_the_encoder_that_made_it(coder_inputs, capsys):
    tmp = coder_inputs
    store = str(tmp / "store.pt")
    assert _coder(tmp, store, "a.csv", "--encoder", "test_trust_files:make_a") == 0
    assert len(list((tmp / "cache").iterdir())) == 1  # warm with A
    # B on the warm cache of A gives B's predictions (those of B on a cold cache)
    assert _coder(tmp, store, "b.csv", "--encoder", "test_trust_files:make_b") == 0
    assert "texts are embedded by test:bow-b but the images by test:bow-a" in capsys.readouterr().err
    assert main(["coder", store, "--classes", str(tmp / "classes.txt"), "--out", str(tmp / "b0.csv"),
                 "--templates", "default", "--cache-dir", str(tmp / "cold"),
                 "--encoder", "test_trust_files:make_b"]) == 0
    assert _preds(tmp / "b.csv") == _preds(tmp / "b0.csv") != _preds(tmp / "a.csv")
    names = sorted(p.name for p in (tmp / "cache").iterdir())
    assert len(names) == 2 and any("test_bow-a" in n for n in names) and any("test_bow-b" in n for n in names)
    # without an encoder the store's model (A) keys the lookup: a hit, no encoder needed
    assert _coder(tmp, store, "a2.csv") == 0
    assert _preds(tmp / "a2.csv") == _preds(tmp / "a.csv")


def test_text_bank_cache_hit_needs_the_same_producer(tmp_path):
    a, b = make_a(), make_b()
    bank = C.TextBank.build(["cat", "dog"]).encode(a, cache_dir=tmp_path)
    with pytest.raises(InputError, match="not the encoder's"):
        C.TextBank.build(["cat", "dog"]).encode(b, model_id=a.model_id, cache_dir=tmp_path)
    # an entry stored under B's name but produced by A is not used for B
    fresh = C.TextBank.build(["cat", "dog"])
    save_tree(fresh.cache_path(tmp_path, b.model_id),
              {"producer": a.model_id, "texts_hash": fresh.texts_hash(), "emb": bank.emb,
               "ovo_emb": bank.ovo_emb, "texts": bank.texts, "ovo_texts": bank.ovo_texts},
              kind=C.TEXT_CACHE_KIND)
    assert not fresh.load_cached(tmp_path, b.model_id)
    fresh.encode(b, cache_dir=tmp_path)
    torch.testing.assert_close(fresh.emb, C.TextBank.build(["cat", "dog"]).encode(b).emb)
    assert load_tree(fresh.cache_path(tmp_path, b.model_id))["producer"] == b.model_id


def test_coder_never_unpickles_its_inputs(coder_inputs, marker, capsys):
    tmp = coder_inputs
    store = str(tmp / "store.pt")
    enc = ["--encoder", "test_trust_files:make_a"]
    bad_pt = torch_pickle(tmp / "bad.pt", marker)
    raw = tmp / "raw.safetensors"
    raw.write_bytes(pickle_bytes(marker))
    npy = pickled_npy(tmp / "obj.npy", marker)
    for i, p in enumerate([bad_pt, raw, npy]):
        capsys.readouterr()
        assert _coder(tmp, str(p), f"s{i}.csv", *enc) == 2
        one_line_error(capsys, "coder", p)
        assert _coder(tmp, store, f"f{i}.csv", "--shots", str(p), *enc) == 2
        one_line_error(capsys, "coder", p)
    # the text cache
    assert _coder(tmp, store, "warm.csv", *enc) == 0
    (cache,) = (tmp / "cache").iterdir()
    assert cache.suffix == ".safetensors"
    cache.write_bytes(pickle_bytes(marker))
    for extra in ([], enc):
        capsys.readouterr()
        assert _coder(tmp, store, "c.csv", *extra) == 2
        one_line_error(capsys, "coder", cache)


def test_coder_reads_safe_embedding_files(coder_inputs, capsys):
    tmp = coder_inputs
    d = torch.load(tmp / "store.pt", weights_only=True)
    from safetensors.torch import save_file

    save_file({"emb": d["emb"]}, str(tmp / "s.safetensors"),
              metadata={"paths": json.dumps(d["paths"]), "model_id": d["model_id"]})
    np.save(tmp / "s.npy", d["emb"].numpy())
    (tmp / "paths.txt").write_text("\n".join(d["paths"]) + "\n")
    enc = ["--encoder", "test_trust_files:make_a"]
    assert _coder(tmp, str(tmp / "store.pt"), "pt.csv", *enc) == 0
    assert _coder(tmp, str(tmp / "s.safetensors"), "st.csv", *enc) == 0
    assert _coder(tmp, str(tmp / "s.npy"), "np.csv", "--paths", str(tmp / "paths.txt"), *enc) == 0
    assert _preds(tmp / "pt.csv") == _preds(tmp / "st.csv") == _preds(tmp / "np.csv")


def _store(root: Path, x: np.ndarray, names: list[str], model_id: str) -> Path:
    from nolabels.data.store import EmbeddingStore

    st = EmbeddingStore.create_or_resume(
        root, model={"model_id": model_id, "dim": x.shape[1], "spec": None},
        source={"kind": "test", "num_items": len(names), "fingerprint": "f"}, shard_size=64)
    st.commit(st.write_shard(0, x, list(range(len(names))),
                             [f"d/{c}/{i}.jpg" for i, c in enumerate(names)], names, []))
    return root


def test_coder_never_unpickles_store_shards(tmp_path, marker, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    x = make_a().encode_text(["a photo of a cat.", "a photo of a dog."]).numpy()
    # the project's store layout
    store = _store(tmp_path / "store", x.astype(np.float16), ["cat", "dog"], "test:bow-a")
    pickled_npy(store / "emb_00000.npy", marker)
    capsys.readouterr()
    assert main(["coder", str(store), "--classes", str(tmp_path / "classes.txt"),
                 "--out", str(tmp_path / "p.csv"), "--encoder", "test_trust_files:make_a"]) == 2
    one_line_error(capsys, "coder", store / "emb_00000.npy")
    # a minimal store of the same layout (no format_version in the manifest)
    plain = tmp_path / "plain"
    plain.mkdir()
    pickled_npy(plain / "emb_00000.npy", marker)
    pq.write_table(pa.table({"path": ["a/cat/1.jpg"], "row": [0]}), plain / "meta_00000.parquet")
    (plain / "manifest.json").write_text(json.dumps({"model_id": "test:bow-a"}))
    assert main(["coder", str(plain), "--classes", str(tmp_path / "classes.txt"),
                 "--out", str(tmp_path / "q.csv"), "--encoder", "test_trust_files:make_a"]) == 2
    one_line_error(capsys, "coder", plain / "emb_00000.npy")
