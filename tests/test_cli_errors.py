"""The CLI checks every argument before any work, and reports the user's mistakes in one
line: bad numeric options are usage errors (exit 2) before a model loads; unreadable,
missing or misplaced files, malformed JSON, non-UTF-8 text and incomplete descriptions
are ``nolabels CMD: error: ...`` (exit 2, no traceback, file and line named); an
internal error keeps its traceback (the exception leaves ``cli.main``)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _pipeline_helpers import make_folder, tiny_config, tiny_spec
from nolabels.cli import build_parser, main


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command loads a model."""
    import nolabels.models
    import nolabels.models.base

    def forbidden(*a, **k):
        raise AssertionError(f"a model was loaded: {a}")

    monkeypatch.setattr(nolabels.models, "load_encoder", forbidden)
    monkeypatch.setattr(nolabels.models.base, "load_encoder", forbidden)


def one_line_error(err: str, cmd: str) -> str:
    """The stderr of a user error: exactly one line ``nolabels CMD: error: ...``."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"nolabels {cmd}: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- numeric options
BAD_OPTIONS = {
    "embed": (["embed", "IMGS", "--model", "surrogate:effnet-lite0+minilm", "--out", "OUT"], [
        ("--batch-size", "-5"), ("--batch-size", "0"), ("--limit", "-45"), ("--limit", "0"),
        ("--shard-size", "0"), ("--workers", "-1"), ("--workers", "two"),
        ("--device", "gpu"), ("--device", "cuda:x")]),
    "label": (["label", "STORE", "--classes", "C", "--out", "OUT"], [
        ("--select-per-class", "0"), ("--topk", "0"), ("--topk", "-1"), ("--logit-scale", "0"),
        ("--logit-scale", "-1"), ("--logit-scale", "nan"), ("--logit-scale", "inf"),
        ("--backend", "fast")]),
    "predict": (["predict", "RUN", "IMGS", "--out", "OUT"], [
        ("--topk", "0"), ("--batch-size", "0"), ("--workers", "-2")]),
    "demo": (["demo"], [
        ("--per-class", "0"), ("--per-class", "101"), ("--select-per-class", "0"),
        ("--batch-size", "-1"), ("--workers", "x"), ("--device", "tpu")]),
    "tune": (["tune", "IMGS", "--method", "lafter", "--classes", "C", "--out", "OUT"], [
        ("--epochs", "0"), ("--batch-size", "0"), ("--lr", "0"), ("--lr", "-1e-3"),
        ("--seed", "-1"), ("--num-prompts", "0"), ("--text-steps", "0"),
        ("--warmup-steps", "-1"), ("--k-max", "0"), ("--heldout-fraction", "1"),
        ("--heldout-fraction", "-0.1"), ("--grad-accum", "0"), ("--cache-views", "-1"),
        ("--checkpoint-every", "-1"), ("--workers", "-1"), ("--embed-workers", "-1"),
        ("--epochs", "1.5")]),
    "coder": (["coder", "STORE", "--out", "OUT"], [
        ("--tau", "-0.1"), ("--shot-val-fraction", "1"), ("--batch-size", "0"),
        ("--seed", "-1"), ("--zs-templates", "a photo of a {}."), ("--backend", "x")]),
    "coder-knowledge": (["coder-knowledge", "--classes", "C", "--out", "OUT"], [
        ("--retries", "0"), ("--pairs", "auto:0"), ("--pairs", "auto:x")]),
}
BAD_CASES = [(cmd, opt, val) for cmd, (_, bad) in BAD_OPTIONS.items() for opt, val in bad]


@pytest.mark.parametrize(("cmd", "opt", "value"), BAD_CASES,
                         ids=[f"{c}{o}={v}" for c, o, v in BAD_CASES])
def test_bad_numeric_option_is_a_usage_error(cmd, opt, value, no_model, capsys):
    base = BAD_OPTIONS[cmd][0]
    with pytest.raises(SystemExit) as e:
        main([*base, f"{opt}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: nolabels {cmd}" in err and f"argument {opt}" in err
    assert repr(value) in err or "invalid choice" in err  # the bad value is quoted


def test_meaningful_zeros_and_boundaries_parse():
    """Values that mean something stay accepted (and arrive typed)."""
    p = build_parser()
    a = p.parse_args(["embed", "I", "--model", "m", "--out", "o", "--workers", "0",
                      "--limit", "1", "--device", "cuda:1"])
    assert (a.workers, a.limit, a.device) == (0, 1, "cuda:1")
    a = p.parse_args(["tune", "I", "--method", "lafter", "--classes", "c", "--out", "o",
                      "--heldout-fraction", "0", "--warmup-steps", "0", "--cache-views", "0",
                      "--checkpoint-every", "0", "--seed", "0", "--workers", "0",
                      "--lr", "1e-5", "--embed-workers", "auto"])
    assert (a.heldout_fraction, a.warmup_steps, a.cache_views, a.lr, a.embed_workers) == (
        0.0, 0, 0, 1e-5, "auto")
    a = p.parse_args(["coder", "s", "--out", "o", "--tau", "0", "--shot-val-fraction", "0"])
    assert (a.tau, a.shot_val_fraction) == (0.0, 0.0)
    a = p.parse_args(["demo", "--per-class", "100", "--select-per-class", "1"])
    assert (a.per_class, a.select_per_class) == (100, 1)
    a = p.parse_args(["label", "s", "--classes", "c", "--out", "o", "--logit-scale", "0.5"])
    assert a.logit_scale == 0.5 and a.topk is None


# --------------------------------------------------------------------------- files: label
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    pytest.importorskip("open_clip")
    pytest.importorskip("pyarrow")
    d = tmp_path_factory.mktemp("errs")
    root = make_folder(d / "imgs", per_class=1)
    assert main(["embed", str(root), "--model", tiny_spec(tiny_config(d)), "--out",
                 str(d / "store"), "--workers", "0", "-q"]) == 0
    (d / "classes.txt").write_text("cat\ndog\nship\n")
    return d


def _label(store, classes, tmp_path, *extra):
    return main(["label", str(store / "store"), "--classes", str(classes), "--out",
                 str(tmp_path / "l.parquet"), "-q", *extra])


def test_topk_above_classes_before_model(store, tmp_path, no_model, capsys):
    assert _label(store, store / "classes.txt", tmp_path, "--topk", "4") == 2
    line = one_line_error(capsys.readouterr().err, "label")
    assert "--topk 4" in line and "3 classes" in line and "classes.txt" in line


def test_descriptions_must_cover_every_class(store, tmp_path, no_model, capsys):
    d = tmp_path / "desc.json"
    d.write_text(json.dumps({"cat": ["a small pet."], "ship": ["a boat."], "car": ["x"]}))
    assert _label(store, store / "classes.txt", tmp_path, "--descriptions", str(d)) == 2
    line = one_line_error(capsys.readouterr().err, "label")
    assert str(d) in line and "'dog'" in line and "1 of the 3 classes" in line
    d.write_text(json.dumps({"cat": ["ok"], "dog": [], "ship": ["ok"]}))
    assert _label(store, store / "classes.txt", tmp_path, "--descriptions", str(d)) == 2
    assert "'dog' must map to a non-empty list" in one_line_error(capsys.readouterr().err,
                                                                  "label")
    d.write_text(json.dumps({"cat": "a pet", "dog": ["x"], "ship": ["y"]}))
    assert _label(store, store / "classes.txt", tmp_path, "--descriptions", str(d)) == 2
    assert "'cat' must map" in one_line_error(capsys.readouterr().err, "label")


def test_malformed_descriptions_json_names_file_and_line(store, tmp_path, no_model, capsys):
    d = tmp_path / "desc.json"
    d.write_text('{\n  "cat": ["a pet"],\n  "dog": ["a dog",]\n}\n')
    assert _label(store, store / "classes.txt", tmp_path, "--descriptions", str(d)) == 2
    line = one_line_error(capsys.readouterr().err, "label")
    assert f"{d}:3:" in line and "not valid JSON" in line


def test_classes_file_not_utf8_names_line(store, tmp_path, no_model, capsys):
    c = tmp_path / "c.txt"
    c.write_bytes(b"cat\ndog\n" + "caf\u00e9\n".encode("latin-1"))
    assert _label(store, c, tmp_path) == 2
    line = one_line_error(capsys.readouterr().err, "label")
    assert f"{c}:3:4: not UTF-8" in line


def test_classes_file_with_bom_and_crlf(store, tmp_path, no_model):
    from nolabels.methods.zeroshot import read_classes

    c = tmp_path / "c.txt"
    c.write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\nship\r\n")
    assert read_classes(c) == ["cat", "dog", "ship"]


def test_duplicate_class_names(store, tmp_path, no_model, capsys):
    c = tmp_path / "c.txt"
    c.write_text("sea_lion\ncat\nSea Lion\n")
    assert _label(store, c, tmp_path) == 2
    line = one_line_error(capsys.readouterr().err, "label")
    assert "duplicate" in line and "line 3 'Sea Lion' repeats line 1 'sea_lion'" in line


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable"])
def test_os_errors_are_one_line(store, tmp_path, no_model, capsys, kind):
    c = tmp_path / "c.txt"
    if kind == "directory":
        c.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads a chmod 000 file")
        c.write_text("cat\n")
        c.chmod(0)
    assert _label(store, c, tmp_path) == 2
    line = one_line_error(capsys.readouterr().err, "label")
    want = {"missing": "No such file", "directory": "Is a directory",
            "unreadable": "Permission denied"}[kind]
    assert str(c) in line and want in line


def test_internal_error_keeps_its_traceback(store, tmp_path, monkeypatch):
    from nolabels import ops

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ops, "pseudo_label", broken)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        _label(store, store / "classes.txt", tmp_path)
    assert not (tmp_path / "l.parquet").exists()


# --------------------------------------------------------------------------- other commands
def test_demo_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    assert main(["demo", "--out", str(f), "--no-plot", "-q"]) == 2
    line = one_line_error(capsys.readouterr().err, "demo")
    assert str(f) in line and "exists" in line.lower()


def test_predict_topk_above_run_classes(tmp_path, no_model, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "zeroshot", "classes": ["a", "b"]}))
    assert main(["predict", str(run), str(tmp_path), "--out", str(tmp_path / "p.parquet"),
                 "--topk", "3", "-q"]) == 2
    line = one_line_error(capsys.readouterr().err, "predict")
    assert "--topk 3" in line and "2 classes" in line


def test_tune_checks_inputs_before_work(tmp_path, no_model, capsys):
    (tmp_path / "c.txt").write_text("cat\ndog\n")
    base = ["tune", str(tmp_path / "imgs"), "--classes", str(tmp_path / "c.txt"),
            "--out", str(tmp_path / "run"), "--model", "surrogate:effnet-lite0+minilm", "-q"]
    (tmp_path / "d.json").write_text(json.dumps({"cat": ["a pet"]}))
    assert main([*base, "--method", "cde", "--descriptions", str(tmp_path / "d.json")]) == 2
    assert "'dog'" in one_line_error(capsys.readouterr().err, "tune")
    assert main([*base, "--method", "zeroshot", "--templates", "nonexistent"]) == 2
    assert "unknown template set" in one_line_error(capsys.readouterr().err, "tune")
    (tmp_path / "t.txt").write_text("a photo of a {}.\na {0} and {1}\n")
    assert main([*base, "--method", "zeroshot", "--templates", str(tmp_path / "t.txt")]) == 2
    assert "a {0} and {1}" in one_line_error(capsys.readouterr().err, "tune")
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": \n')
    assert main([*base, "--method", "latteclip", "--captions", str(caps)]) == 2
    assert f"{caps}:2:" in one_line_error(capsys.readouterr().err, "tune")
    assert not (tmp_path / "run").exists()


def test_coder_knowledge_and_classes_files(tmp_path, no_model, capsys):
    np.save(tmp_path / "e.npy", np.eye(2, 4, dtype=np.float32))
    k = tmp_path / "k.json"
    k.write_text('{"classes": {\n  "cat": {"attributes": ["fur"]}\n  "dog": {}\n}}\n')
    base = ["coder", str(tmp_path / "e.npy"), "--out", str(tmp_path / "p.csv")]
    assert main([*base, "--knowledge", str(k)]) == 2
    line = one_line_error(capsys.readouterr().err, "coder")
    assert f"{k}:3:" in line and "not valid JSON" in line
    k.write_text(json.dumps({"classes": {"cat": {"attributes": "fur"}}}))
    assert main([*base, "--knowledge", str(k)]) == 2
    line = one_line_error(capsys.readouterr().err, "coder")
    assert str(k) in line and "list of strings" in line
    c = tmp_path / "c.txt"
    c.write_bytes(b"cat\n\xff\xfedog\n")
    assert main([*base, "--classes", str(c)]) == 2
    assert f"{c}:2:1: not UTF-8" in one_line_error(capsys.readouterr().err, "coder")
