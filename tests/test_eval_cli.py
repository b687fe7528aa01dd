"""benchmarks/eval_cli.py's data preparation and command plumbing (no model is run)."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_cli  # noqa: E402


def test_digit_image_is_ink_dark_on_white_rgb_upscaled():
    px = np.zeros((8, 8))
    px[2:6, 3:5] = 16.0  # a full-ink bar in the middle
    img = eval_cli.digit_image(px, size=64)
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (64, 64, 3)
    assert (a[0, 0] == 255).all()  # background (0 ink) is white
    assert a[32, 32].max() < 40  # inside the bar: dark
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # gray


def test_digits_split_is_seeded_disjoint_and_bounded():
    tr, te = eval_cli.digits_split(1300, 497, seed=0)
    assert len(tr) == 1300 and len(te) == 497
    assert not set(tr) & set(te) and set(tr) | set(te) == set(range(eval_cli.DIGITS_TOTAL))
    assert eval_cli.digits_split(1300, 497, seed=0) == (tr, te)
    assert eval_cli.digits_split(1300, 497, seed=1)[0] != tr
    with pytest.raises(ValueError):
        eval_cli.digits_split(1300, 498)


def test_write_digits_folders_are_the_digit_words_of_the_true_targets(tmp_path):
    from sklearn.datasets import load_digits

    train, test = eval_cli.write_digits(tmp_path / "d", 30, 12, seed=3, size=16)
    target = load_digits().target
    tr, te = eval_cli.digits_split(30, 12, seed=3)
    for folder, idx in ((train, tr), (test, te)):
        files = sorted(folder.glob("*/*.png"))
        assert len(files) == len(idx)
        assert {int(f.stem) for f in files} == set(idx)
        for f in files:
            assert f.parent.name == eval_cli.DIGIT_WORDS[target[int(f.stem)]]
    mtime = next(train.glob("*/*.png")).stat().st_mtime_ns
    eval_cli.write_digits(tmp_path / "d", 30, 12, seed=3, size=16)  # reused, not rewritten
    assert next(train.glob("*/*.png")).stat().st_mtime_ns == mtime


def _tiny_tar(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for cls in ("cat", "dog"):
            for i in range(10):
                data = f"{cls}{i}".encode()
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_extract_cifar_subset_is_seeded(tmp_path):
    _tiny_tar(tmp_path / "t.tar.gz")
    classes = eval_cli.extract_cifar_subset(tmp_path / "t.tar.gz", tmp_path / "a", 7, seed=0)
    eval_cli.extract_cifar_subset(tmp_path / "t.tar.gz", tmp_path / "b", 7, seed=0)
    eval_cli.extract_cifar_subset(tmp_path / "t.tar.gz", tmp_path / "c", 7, seed=1)

    def names(d):
        return sorted(str(p.relative_to(d)) for p in d.glob("*/*.jpg"))

    assert len(names(tmp_path / "a")) == 7
    assert names(tmp_path / "a") == names(tmp_path / "b") != names(tmp_path / "c")
    assert set(classes) <= {"cat", "dog"}
    for p in (tmp_path / "a").glob("*/*.jpg"):  # each file kept its class folder
        assert p.read_bytes().decode().startswith(p.parent.name)


def test_parse_json_output_skips_log_lines():
    text = "[nolabels 0.1s] reading\n" + json.dumps({"accuracy": 0.5, "rows": 2}, indent=2)
    assert eval_cli.parse_json_output(text) == {"accuracy": 0.5, "rows": 2}
    with pytest.raises(ValueError):
        eval_cli.parse_json_output("no json here")


def test_runner_records_failures_and_reuses_only_successes(tmp_path):
    r = eval_cli.Runner(tmp_path / "w")
    bad = r.run("bad", ["eval", tmp_path / "missing.parquet", "--json"])
    assert bad["rc"] != 0 and bad["error_tail"] and not bad["reused"]
    assert bad["command"].startswith("nolabels eval ")
    again = r.run("bad", ["eval", tmp_path / "missing.parquet", "--json"])
    assert not again["reused"]  # a failed step runs again
    stale = tmp_path / "stale"
    stale.mkdir()
    ok = r.run("ok", ["--help"], outputs=[stale])
    assert ok["rc"] == 0 and not ok["reused"] and not stale.exists()
    assert ok["cpu_seconds"] > 0 and ok["seconds"] > 0  # the child's own cpu time
    assert r.run("ok", ["--help"])["reused"]


def test_run_summary_reads_selection_and_curves(tmp_path):
    hist = [{"epoch": 0, "heldout_agreement": 0.5, "oracle_heldout_accuracy": 0.4},
            {"epoch": 1, "heldout_agreement": 0.7, "oracle_heldout_accuracy": 0.45}]
    (tmp_path / "summary.json").write_text(json.dumps({
        "selection": "heldout_agreement: student vs labeller", "selected_epoch": 1,
        "criterion_value": 0.7, "k": 16, "history": hist, "seconds": 5.0,
        "total_seconds": 9.0}))
    s = eval_cli.run_summary(tmp_path)
    assert s["criterion"] == "heldout_agreement" and s["selected_epoch"] == 1 and s["k"] == 16
    assert s["criterion_curve"] == [0.5, 0.7] and s["oracle_heldout_curve"] == [0.4, 0.45]
    # the run's clocks never shadow the row's command wall time ("seconds")
    assert "seconds" not in s and s["run_method_seconds"] == 5.0 and s["run_total_seconds"] == 9.0
    assert eval_cli.run_summary(tmp_path / "none") == {}
