"""docs/differences.md: each flag that reproduces the authors' code does so, and the page
names only flags that exist."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nolabels.errors import InputError
from nolabels.methods import coder as C
from nolabels.methods import latteclip as lc

DOC = Path(__file__).resolve().parents[1] / "docs" / "differences.md"


# ----------------------------------------------------------------------------- the page
def test_the_page_names_only_real_flags_and_the_code_points_to_it():
    from nolabels.cli import build_parser

    text = DOC.read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    known = {o for p in sub.values() for a in p._actions for o in a.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))
    assert named - known == set()
    assert {"--reproduce-wcls-bug", "--reproduce-wcls-broadcast", "--nola-subset", "--amp",
            "--reproduce", "--heldout-fraction"} <= named
    for quirk in ("none-synonyms", "underscores", "dtd-ovo-comma"):
        assert f"--reproduce {quirk}" in text
    from nolabels.methods import nola, zeroshot

    for obj in (lc.mix_texts, lc, C.TextBank.build, C, nola, zeroshot.read_descriptions):
        assert "docs/differences.md" in obj.__doc__


# ----------------------------------------------------------------------------- LatteCLIP
def test_mix_texts_broadcasts_the_class_weight_as_train_py():
    g = torch.Generator().manual_seed(0)
    B = D = 4
    e_cls, e_img, e_grp = (torch.randn(B, D, generator=g) for _ in range(3))
    w_cls, w_img, w_grp = (torch.rand(B, generator=g) + 0.1 for _ in range(3))
    got = lc.mix_texts(w_cls, e_cls, w_img, e_img, w_grp, e_grp, broadcast_cls=True)
    # train.py: column j of the class texts is scaled by sample j's weight
    want = torch.empty(B, D)
    for i in range(B):
        for j in range(D):
            want[i, j] = (w_cls[j] * e_cls[i, j] + w_img[i] * e_img[i, j] + w_grp[i] * e_grp[i, j]) \
                / (w_cls[i] + w_img[i] + w_grp[i])
    torch.testing.assert_close(got, want)
    per_sample = lc.mix_texts(w_cls, e_cls, w_img, e_img, w_grp, e_grp)
    assert not torch.allclose(got, per_sample)
    with pytest.raises(InputError, match="embedding dim D = 5"):
        lc.mix_texts(w_cls, torch.randn(B, 5), w_img, torch.randn(B, 5), w_grp,
                     torch.randn(B, 5), broadcast_cls=True)


class _Towers(torch.nn.Module):
    """LatteCLIP's towers interface on a fixed text table and a linear image tower."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.lin = torch.nn.Linear(table.shape[1], table.shape[1])

    def image(self, x):
        return F.normalize(self.lin(x), dim=-1)

    def text(self, ids):
        return self.table[ids]

    def scale(self):
        return torch.tensor(100.0)


@pytest.mark.parametrize("bug", [False, True])
def test_module_targets_follow_the_authors_formula(bug):
    torch.manual_seed(0)
    B = D = 8
    Cn = 3
    table = F.normalize(torch.randn(Cn + 2 * B, D), dim=1)  # class texts, captions, groups
    towers = _Towers(table)
    protos = F.normalize(torch.randn(Cn, D), dim=1)
    zs = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    cfg = lc.LatteCLIPConfig(reproduce_wcls_broadcast=True, reproduce_wcls_bug=bug)
    m = lc.LatteCLIPModule(towers, protos, zs, cfg)
    batch = {"image": torch.randn(B, D), "index": torch.arange(B),
             "cap": torch.arange(Cn, Cn + B), "grp": torch.arange(Cn + B, Cn + 2 * B)}
    m(batch)
    z_ft, y_ft, z_zs, y_zs = m.last
    # by hand, as train.py: weights are prototype margins; (B,) * (B, D) broadcasts along D
    f = towers.image(batch["image"])
    P = F.normalize(protos, dim=1)
    assert torch.equal(y_ft, (f @ P.T).argmax(1))

    def w(e):
        top = (e @ P.T).topk(2, dim=1).values
        return top[:, 0] - top[:, 1] + 1e-6

    lab_ft, lab_zs = table[y_ft], table[zs]
    per_img, grp = table[batch["cap"]], table[batch["grp"]]
    w_ft, w_zs, w_img, w_grp = w(lab_ft), w(lab_zs), w(per_img), w(grp)
    t_ft = (w_ft * lab_ft + per_img * w_img.unsqueeze(1) + grp * w_grp.unsqueeze(1)) \
        / (w_ft + w_img + w_grp).unsqueeze(1)
    w_num = w_ft if bug else w_zs
    t_zs = (w_num * lab_zs + per_img * w_img.unsqueeze(1) + grp * w_grp.unsqueeze(1)) \
        / (w_zs + w_img + w_grp).unsqueeze(1)
    torch.testing.assert_close(z_ft, P[y_ft] + 0.01 * (t_ft - P[y_ft]))
    torch.testing.assert_close(z_zs, P[zs] + 0.01 * (t_zs - P[zs]))
    m.cfg = lc.LatteCLIPConfig(reproduce_wcls_bug=bug)  # per-sample weights: other targets
    m(batch)
    assert not torch.allclose(m.last[0], z_ft)


# ----------------------------------------------------------------------------- CODER
def knowledge():
    return C.Knowledge.from_dict({"classes": {
        "sea_lion": {"attributes": ["flippers"], "analogous": ["seal"], "synonyms": ["sea-lion", "eared seal"]},
        "tabby_cat": {"attributes": [], "analogous": [], "synonyms": []},
    }, "ovo": {"sea_lion": {"tabby_cat": ["wet skin"]}}})


def test_coder_renders_as_the_authors_with_the_flags():
    names = ["sea_lion", "tabby_cat"]
    ours = C.TextBank.build(names, knowledge(), templates="oxford-pet")
    assert ours.texts == ["A pet photo of sea lion which has flippers.",
                          "A pet photo of a sea lion similar to seal.",
                          "a photo of a sea lion, a type of pet.",
                          "a photo of a sea-lion, a type of pet.",
                          "a photo of a eared seal, a type of pet.",
                          "a photo of a tabby cat, a type of pet."]
    theirs = C.TextBank.build(names, knowledge(), templates="oxford-pet", keep_underscores=True,
                              none_synonyms=True)
    assert theirs.texts == ["A pet photo of sea_lion which has flippers.",
                            "A pet photo of a sea_lion similar to seal.",
                            "a photo of a sea lion, a type of pet.",
                            "a photo of a None, a type of pet.",
                            "a photo of a None, a type of pet.",
                            "a photo of a tabby cat, a type of pet."]
    assert theirs.text_type == ours.text_type
    assert theirs.ovo_texts[1] == ("Because of wet skin, a sea_lion, a kind of pet, is different "
                                   "from a tabby_cat, a kind of pet.")
    assert ours.ovo_texts[1].startswith("Because of wet skin, a sea lion, a kind of pet")


def test_coder_dtd_fused_template():
    names = ["sea_lion", "tabby_cat"]
    ours = C.TextBank.build(names, knowledge(), templates="dtd")
    theirs = C.TextBank.build(names, knowledge(), templates="dtd", fused_dtd_ovo=True)
    assert len(ours.ovo_texts) == 4 and len(theirs.ovo_texts) == 3
    assert theirs.ovo_texts[0] == ("sea lion, a type of texture, exhibits a unique wet skin that "
                                   "sets it apart from tabby cat.Because of wet skin, sea lion is "
                                   "different from tabby cat.")
    assert theirs.ovo_texts[1:] == ours.ovo_texts[2:]
    # other data sets have no such quirk
    assert C.TextBank.build(names, knowledge(), fused_dtd_ovo=True).ovo_texts == \
        C.TextBank.build(names, knowledge()).ovo_texts


def test_reproduce_names():
    from nolabels.pipeline.coder import reproduce_flags

    assert reproduce_flags(["all"]) == {"none_synonyms": True, "keep_underscores": True,
                                        "fused_dtd_ovo": True}
    assert reproduce_flags(["underscores"]) == {"keep_underscores": True}
    with pytest.raises(InputError, match="unknown"):
        reproduce_flags(["colour"])


# ----------------------------------------------------------------------------- CLI runs
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("open_clip")
    from _methods_helpers import tiny_setup

    d = tmp_path_factory.mktemp("diffs")
    t = tiny_setup(d, per_class=12)  # 36 images, 32-d embeddings
    (d / "classes.txt").write_text("cat\ndog\nship\n")
    return d, t


def test_nola_subset_all_and_amp_off(env, monkeypatch):
    from nolabels.cli import main
    from nolabels.methods import nola, trainer

    d, t = env
    rows, amps = [], []
    real_subset, real_amp = nola.confident_subset, trainer.resolve_amp

    def subset(emb, *a, **k):
        rows.append(emb.shape[0])
        return real_subset(emb, *a, **k)

    def amp(mode, device):
        amps.append(mode)
        return real_amp(mode, device)

    monkeypatch.setattr(nola, "confident_subset", subset)
    monkeypatch.setattr(trainer, "resolve_amp", amp)
    common = ["tune", "--method", "nola", str(t.store), "--classes", str(d / "classes.txt"),
              "--dino-model", t.spec, "--num-prompts", "2", "--epochs", "1", "--batch-size", "12",
              "--heldout-fraction", "0.5", "-q"]
    assert main([*common, "--out", str(d / "nola_all"), "--nola-subset", "all", "--amp", "off"]) == 0
    assert amps[-1] == "off"  # the student's stage (the last one trained)
    assert main([*common, "--out", str(d / "nola_train")]) == 0
    assert amps[-1] == "auto"
    assert rows == [36, 18]  # all images vs the training split
    cfg = json.loads((d / "nola_all" / "config.json").read_text())
    assert cfg["hyper_parameters"]["amp"] == "off"
    assert cfg["hyper_parameters"]["subset_from"] == "all"
    s = json.loads((d / "nola_all" / "summary.json").read_text())
    assert s["subset_from"] == "all" and s["train_images"] == 18


def test_latteclip_broadcast_needs_batch_equal_to_dim(env, capsys):
    from nolabels.cli import main

    d, t = env
    common = ["tune", "--method", "latteclip", str(t.store), "--classes", str(d / "classes.txt"),
              "--epochs", "1", "--heldout-fraction", "0", "--reproduce-wcls-broadcast",
              "--reproduce-wcls-bug", "-q"]
    assert main([*common, "--out", str(d / "latte_bad"), "--batch-size", "6"]) == 2
    assert "needs batches of exactly D = 32" in capsys.readouterr().err
    assert main([*common, "--out", str(d / "latte_ok"), "--batch-size", "32"]) == 0
    s = json.loads((d / "latte_ok" / "summary.json").read_text())
    assert s["reproduce_wcls_broadcast"] and s["reproduce_wcls_bug"]
