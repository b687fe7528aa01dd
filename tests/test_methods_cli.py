"""``nolabels tune`` / ``nolabels predict`` end to end on a tiny random-init CLIP: every
method writes a run, predictions are readable by ``nolabels eval``, a re-run resumes,
and zero-shot predictions from a store equal ``nolabels label``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pq = pytest.importorskip("pyarrow.parquet")

from _methods_helpers import tiny_setup  # noqa: E402
from nolabels.cli import main  # noqa: E402
from nolabels.commands.evaluate import evaluate  # noqa: E402
from nolabels.methods.common import load_run  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("tunecli")
    t = tiny_setup(d, per_class=6)
    (d / "classes.txt").write_text("cat\ndog\nship\n")
    (d / "desc.json").write_text(json.dumps({"cat": ["a small furry pet"], "dog": ["a loyal pet"],
                                             "ship": ["a big boat"]}))
    caps = [json.dumps({"image": str(p), "caption": f"an image {i}"})
            for i, p in enumerate(sorted(t.images.rglob("*.png"))[:8])]
    (d / "caps.jsonl").write_text("\n".join(caps + [json.dumps({"class": "dog", "caption": "dogs"})]))
    return d, t


TRAIN = ["--epochs", "2", "--batch-size", "6", "-q"]
CASES = {
    "zeroshot": ["-q"],
    "cde": ["--descriptions", "DESC", "--templates", "cifar", "-q"],
    "lafter": ["--num-prompts", "2", "--text-steps", "10", *TRAIN],
    "nola": ["--num-prompts", "2", "--dino-model", "SPEC", "--descriptions", "DESC", *TRAIN],
    "latteclip": ["--lr", "1e-4", "--captions", "CAPS", *TRAIN],
}


@pytest.fixture(scope="module")
def tuned(env):
    """``tuned(method)``: the run directory of ``nolabels tune --method METHOD`` with the
    settings of :data:`CASES`, tuned by whichever test asks first (any order, any subset)."""
    d, t = env
    runs: dict = {}

    def get(method: str) -> Path:
        if method not in runs:
            extra = [a.replace("DESC", str(d / "desc.json")).replace("SPEC", t.spec)
                     .replace("CAPS", str(d / "caps.jsonl")) for a in CASES[method]]
            run = d / method
            assert main(["tune", "--method", method, str(t.store), "--classes",
                         str(d / "classes.txt"), "--out", str(run), *extra]) == 0
            runs[method] = run
        return runs[method]

    return get


@pytest.mark.parametrize("method", list(CASES))
def test_tune_predict_eval(env, tuned, method, capsys):
    d, t = env
    run = tuned(method)
    cfg = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert cfg["method"] == method and cfg["classes"] == ["cat", "dog", "ship"]
    assert cfg["encoder"]["model_id"].startswith("openclip:nl-tiny")
    if method in ("lafter", "nola", "latteclip"):
        assert summary["selected_epoch"] in (0, 1, 2)  # 0: the initial model
        log = (run / "logs" / f"{method}.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in log] == [0, 1, 2]
        assert "oracle_heldout_accuracy" in json.loads(log[0])
    preds = d / f"{method}.parquet"
    assert main(["predict", str(run), str(t.images), "--out", str(preds), "--workers", "0",
                 "-q"]) == 0
    res = evaluate(preds)
    assert res["rows"] == 18 and res["evaluated"] == 18
    # the accuracy is that of the written labels against the images' class folders
    rows = pq.read_table(preds, columns=["path", "label"]).to_pydict()
    names = ["cat", "dog", "ship"]
    hits = sum(names[y] == Path(p).parent.name for p, y in zip(rows["path"], rows["label"]))
    assert res["accuracy"] == pytest.approx(hits / 18)
    meta = json.loads(pq.read_table(preds).schema.metadata[b"nolabels"])
    assert meta["method"] == method
    capsys.readouterr()
    assert main(["eval", str(preds)]) == 0
    assert "accuracy:" in capsys.readouterr().out


def test_rerun_resumes_without_training(env, tuned):
    d, t = env
    run = tuned("lafter")
    before = load_run(run)[1]
    assert main(["tune", "--method", "lafter", str(t.store), "--classes", str(d / "classes.txt"),
                 "--out", str(run), "--num-prompts", "2", "--text-steps", "10", *TRAIN]) == 0
    after = load_run(run)[1]
    torch.testing.assert_close(before["head"]["weight"], after["head"]["weight"], atol=0, rtol=0)
    # different settings on the same run directory are refused
    assert main(["tune", "--method", "lafter", str(t.store), "--classes", str(d / "classes.txt"),
                 "--out", str(run), "--num-prompts", "2", "--text-steps", "10", "--epochs", "3",
                 "--batch-size", "4", "-q"]) == 2


def test_zeroshot_predict_from_store_equals_label(env):
    d, t = env
    run = d / "zs_store"
    assert main(["tune", "--method", "zeroshot", str(t.store), "--classes",
                 str(d / "classes.txt"), "--out", str(run), "-q"]) == 0
    assert main(["predict", str(run), str(t.store), "--out", str(d / "p.parquet"), "-q"]) == 0
    assert main(["label", str(t.store), "--classes", str(d / "classes.txt"), "--out",
                 str(d / "l.parquet"), "-q"]) == 0
    p, lab = pq.read_table(d / "p.parquet").to_pydict(), pq.read_table(d / "l.parquet").to_pydict()
    assert p["label"] == lab["label"] and p["path"] == lab["path"]
    torch.testing.assert_close(torch.tensor(p["confidence"]), torch.tensor(lab["confidence"]))
    # streamed into a labels directory: the same rows, one part per store shard, and
    # `eval` reads it
    import pyarrow.dataset as pds
    from nolabels.pipeline.evaluate import evaluate

    assert main(["predict", str(run), str(t.store), "--out", str(d / "pdir"), "-q"]) == 0
    pd_ = pds.dataset(d / "pdir").to_table().to_pydict()
    assert pd_["label"] == p["label"] and pd_["path"] == p["path"]
    assert evaluate(d / "pdir")["rows"] == len(p["label"])
    assert main(["predict", str(run), str(t.images), "--out", str(d / "pdir2"), "-q"]) == 2


def test_tune_from_images_and_errors(env, tmp_path, capsys):
    d, t = env
    assert main(["tune", "--method", "cde", str(t.images), "--classes", str(d / "classes.txt"),
                 "--model", t.spec, "--descriptions", str(d / "desc.json"), "--out",
                 str(tmp_path / "r"), "-q"]) == 0
    assert (tmp_path / "r" / "store" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["tune", "--method", "cde", str(t.store), "--classes", str(d / "classes.txt"),
                 "--out", str(tmp_path / "r2"), "-q"]) == 2
    assert "needs --descriptions" in capsys.readouterr().err
    assert main(["tune", "--method", "nola", str(t.store), "--classes", str(d / "classes.txt"),
                 "--out", str(tmp_path / "r3"), "-q"]) == 2
    assert "--dino-model" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nothing"), str(t.images), "--out",
                 str(tmp_path / "x.parquet"), "-q"]) == 2


def test_changed_hyper_parameters_are_refused(env, tmp_path):
    """A finished stage is reused only with the same settings (here: the learning rate)."""
    d, t = env
    base = ["tune", "--method", "nola", str(t.store), "--classes", str(d / "classes.txt"),
            "--out", str(tmp_path / "r"), "--num-prompts", "2", "--dino-model", t.spec, *TRAIN]
    assert main(base) == 0
    assert main(base) == 0  # same settings: resumes (nothing to do)
    assert main([*base, "--lr", "0.01"]) == 2


def test_tune_under_torchrun_equals_single_process(env, tmp_path):
    """LaFTer under torchrun (2 gloo processes, DDP, sharded held-out evaluation) gives
    the model of a single process with the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    d, t = env
    repo = Path(__file__).resolve().parents[1]
    args = ["tune", "--method", "lafter", str(t.store), "--classes", str(d / "classes.txt"),
            "--num-prompts", "2", "--text-steps", "10", "--device", "cpu", *TRAIN]
    env_ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "python"),
            "TORCHELASTIC_ERROR_FILE": str(tmp_path / "err.json")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "nolabels", *args, "--out",
                          str(tmp_path / "ddp")], env=env_, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    a = load_run(tmp_path / "ddp")[1]
    b = load_run(tmp_path / "one")[1]
    torch.testing.assert_close(a["head"]["weight"], b["head"]["weight"], atol=1e-5, rtol=1e-4)
    for k in b["student"]:
        torch.testing.assert_close(a["student"][k], b["student"][k], atol=1e-5, rtol=1e-4)
    sa = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    sb = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert sa["selected_epoch"] == sb["selected_epoch"]
    assert [h["heldout_agreement"] for h in sa["history"]] == [h["heldout_agreement"] for h in sb["history"]]
