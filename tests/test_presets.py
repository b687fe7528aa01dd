"""Per-dataset presets (``--dataset NAME``): every preset loads and cites the authors' file
for each value, the tables hold the authors' numbers, flags override a preset, an unknown
name lists the known ones, LaFTer's TEXT_STEPS reach the text-classifier trainer, few-shot
CODER uses the complete (β, α) table, and the cache-key augmentation passes are seeded."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from nolabels.errors import InputError
from nolabels.methods import coder as C
from nolabels.methods import presets as P
from nolabels.methods.lafter import TEXT_STEPS, LaFTerConfig
from nolabels.methods.latteclip import LatteCLIPConfig
from nolabels.methods.nola import NoLAConfig

AUTHORS = ("jmiemirza/LaFTer", "fazliimam/NoLA", "astra-vision/LatteCLIP",
           "YCaigogogo/CVPR24-CODER")
PAPER_SETS = ("imagenet", "caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101",
              "flowers102", "oxford_pets", "stanford_cars", "sun397", "ucf101", "cifar10",
              "cifar100")


# ----------------------------------------------------------------------------- the tables
def test_every_preset_loads_and_cites_the_authors_file_per_value():
    assert set(PAPER_SETS) <= set(P.known())
    assert set(P.LATTECLIP_DATASETS) <= set(P.known())
    for p in P.PRESETS.values():
        vals = p.values()
        assert vals, p.name
        for field in vals:
            src = p.source(field)
            assert src is not None, (p.name, field)
            repo, path = src.split(" ", 1)
            assert repo in AUTHORS and re.match(r"[\w./-]+\.(py|sh|yaml)", path), src
        for field in p.missing:  # looked for and not found: no value invented
            assert getattr(p, field) is None, (p.name, field)
        assert {s for s, _ in p.sources} <= set(vals), p.name  # no citation without a value
        for t in (*(p.lafter_templates or ()), *(p.nola_templates or ()),
                  *(p.tip_templates or ()), *([p.latteclip_template] if p.latteclip_template
                                             else [])):
            assert t.count("{}") == 1, (p.name, t)
        with pytest.raises(AttributeError):  # frozen
            p.lafter_text_steps = 1


def test_authors_numbers():
    # LaFTer text-classifier steps (text_cls_epochs) and template counts (ds_specific_templates)
    steps = {n: P.PRESETS[n].lafter_text_steps for n in PAPER_SETS}
    assert steps == {"imagenet": 500, "caltech101": 500, "dtd": 400, "eurosat": 400,
                     "fgvc_aircraft": 500, "food101": 400, "flowers102": 600,
                     "oxford_pets": None, "stanford_cars": None, "sun397": 500, "ucf101": 400,
                     "cifar10": 400, "cifar100": 400}
    n_lafter = {n: len(P.PRESETS[n].lafter_templates or ()) for n in PAPER_SETS}
    assert n_lafter == {"imagenet": 7, "caltech101": 7, "dtd": 8, "eurosat": 3,
                        "fgvc_aircraft": 0, "food101": 0, "flowers102": 1, "oxford_pets": 0,
                        "stanford_cars": 0, "sun397": 2, "ucf101": 48, "cifar10": 18,
                        "cifar100": 81}
    assert len(set(P.UCF48)) == 48 and len(set(P.CIFAR100_81)) == 81
    assert len(P.PRESETS["eurosat"].nola_templates) == 6
    assert len(P.PRESETS["stanford_cars"].nola_templates) == 9
    # LatteCLIP scripts: (epochs, warm-up steps)
    latte = {n: (P.PRESETS[n].latteclip_epochs, P.PRESETS[n].latteclip_warmup_steps)
             for n in P.LATTECLIP_DATASETS}
    assert latte == {"dtd": (100, 10), "oxford_pets": (100, 10), "caltech101": (50, 10),
                     "flowers102": (50, 12), "fgvc_aircraft": (50, 15), "stanford_cars": (50, 20),
                     "ucf101": (50, 20), "eurosat": (15, 40), "sun397": (15, 40),
                     "food101": (15, 140)}
    assert P.PRESETS["dtd"].latteclip_template == "{} texture."
    # CODER: the complete few-shot (beta, alpha) table, augment_epoch, Tip-Adapter templates
    init = {n: P.PRESETS[n].few_shot_init for n in PAPER_SETS[:11]}
    assert init == {"imagenet": (72.0, 1.66), "caltech101": (24.76, 100.0),
                    "dtd": (30.18, 2.57), "eurosat": (91.34, 1.73), "fgvc_aircraft": (96.0, 9.775),
                    "food101": (1.0, 1.0), "flowers102": (38.0, 4.37),
                    "oxford_pets": (26.0, 1.0), "stanford_cars": (23.5, 1.5),
                    "sun397": (43.57, 1.18), "ucf101": (49.51, 2.0)}
    passes = {n: P.PRESETS[n].augment_passes for n in PAPER_SETS[:11]}
    assert passes == {**dict.fromkeys(PAPER_SETS[:11], 20), "oxford_pets": 10, "imagenet": 1}
    assert P.PRESETS["dtd"].tip_templates == ("{} texture.",)
    assert len(P.PRESETS["imagenet"].tip_templates) == 7
    assert P.PRESETS["dtd"].coder_tau == 0.6 and P.PRESETS["flowers102"].coder_tau is None


def test_names_aliases_and_unknown():
    assert P.lookup("Flowers").name == "flowers102"
    assert P.lookup("oxford-pet").name == "oxford_pets"  # CODER's name
    assert P.lookup("DescribableTextures").name == "dtd"  # LaFTer's Dassl name
    assert P.lookup("CIFAR10_local").name == "cifar10"
    assert P.lookup("FGVC Aircraft").name == "fgvc_aircraft"
    assert P.lookup("nope") is None and P.lookup(None) is None
    with pytest.raises(InputError, match=r"unknown --dataset 'nope'; known: .*flowers102"):
        P.get_preset("nope")
    # no alias points at two presets
    for p in P.PRESETS.values():
        for a in (p.name, p.title, *p.aliases):
            assert P.lookup(a) is p, a


# ----------------------------------------------------------------------------- applying
def test_apply_to_config_sets_values_and_flags_override():
    cfg = LaFTerConfig()
    lines = P.apply_to_config(cfg, P.get_preset("flowers102"), "lafter")
    assert cfg.text_steps == 600 and cfg.templates == list(P.FLOWERS1) and cfg.amp == "off"
    assert "text_steps=600" in lines[0] and "utils/utils.py" in lines[0]
    cfg = LaFTerConfig()
    lines = P.apply_to_config(cfg, P.get_preset("flowers102"), "lafter", {"text_steps"})
    assert cfg.text_steps == LaFTerConfig().text_steps and "flag" in lines[0]
    cfg = LaFTerConfig()  # pets: no LaFTer values in the authors' code: the generic ones stay
    lines = P.apply_to_config(cfg, P.get_preset("pets"), "lafter")
    assert cfg.text_steps == 400 and cfg.templates == LaFTerConfig().templates
    assert "no templates, text_steps" in lines[-1]
    cfg = LatteCLIPConfig()
    P.apply_to_config(cfg, P.get_preset("caltech101"), "latteclip")
    assert (cfg.epochs, cfg.warmup_steps, cfg.weight_decay) == (50, 10, 1e-7)
    cfg = NoLAConfig()
    P.apply_to_config(cfg, P.get_preset("eurosat"), "nola")
    assert cfg.templates == list(P.NOLA_EUROSAT)
    cfg = LaFTerConfig()
    assert P.apply_to_config(cfg, None, "lafter") == ["no --dataset: generic defaults"]
    assert cfg == LaFTerConfig()
    assert P.tune_values(P.get_preset("oxford_pets"), "zeroshot") == {
        "templates": ["a photo of a {}, a type of pet."]}  # no LaFTer set: Tip-Adapter's
    assert P.coder_values(P.get_preset("dtd"))["zs_templates"] == ["{c} texture."]
    assert P.coder_values(None) == {}


def test_text_steps_table_is_the_one_wired():
    for name, steps in TEXT_STEPS.items():
        assert P.get_preset(name).lafter_text_steps == steps


# ----------------------------------------------------------------------------- CODER few-shot
def _one_shot(gen, c):
    bank = C.TextBank.build([f"c{i}" for i in range(c)], ovo=False)
    bank.emb = F.normalize(torch.randn(3 * c, 16, generator=gen), dim=1)
    bank.text_class = torch.arange(3 * c) % c
    bank.text_type = ["att"] * (2 * c) + ["name"] * c
    zs = F.normalize(torch.randn(c, 16, generator=gen), dim=1)
    return C.CoderFewShot(bank, zs, torch.randn(c, 16, generator=gen), torch.arange(c))


@pytest.mark.parametrize("name,want", [
    ("Aircraft", (96.0, 9.775)), ("oxford-pet", (26.0, 1.0)), ("oxford_flowers", (38.0, 4.37)),
    ("stanford_cars", (23.5, 1.5)), ("sun397", (43.57, 1.18)), ("ucf101", (49.51, 2.0)),
    ("caltech-101", (24.76, 100.0)), ("food-101", (1.0, 1.0))])
def test_few_shot_coder_uses_the_complete_init_table(gen, name, want):
    few = _one_shot(gen, 3)  # one shot per class: nothing held out, the init is used as is
    fit = few.fit(dataset=name)
    assert not fit.searched and (fit.beta, fit.alpha) == want


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("open_clip")
    pytest.importorskip("pyarrow")
    from _methods_helpers import tiny_setup

    d = tmp_path_factory.mktemp("presets")
    t = tiny_setup(d, per_class=3)
    (d / "classes.txt").write_text("cat\ndog\nship\n")
    return d, t


def _main(argv):
    from nolabels.cli import main

    return main(argv)


def test_text_steps_reach_the_trainer(env, caplog):
    d, t = env
    base = ["tune", "--method", "lafter", str(t.store), "--classes", str(d / "classes.txt"),
            "--num-prompts", "2", "--epochs", "1", "--batch-size", "4"]
    with caplog.at_level(logging.INFO):
        assert _main([*base, "--out", str(d / "fl"), "--dataset", "flowers102"]) == 0
    s = json.loads((d / "fl" / "summary.json").read_text())
    assert s["text_classifier"]["steps"] == 600 and s["dataset_preset"] == "flowers102"
    assert s["text_classifier"]["texts"] == 3  # 3 classes x LaFTer's one Flowers template
    assert "text_steps=600" in caplog.text
    cfg = json.loads((d / "fl" / "config.json").read_text())["hyper_parameters"]
    assert cfg["amp"] == "off" and cfg["templates"] == list(P.FLOWERS1)
    caplog.clear()
    with caplog.at_level(logging.INFO):  # an explicit flag wins; no --dataset: generic
        assert _main([*base, "--out", str(d / "fl7"), "--dataset", "flowers102",
                      "--text-steps", "7"]) == 0
        assert _main([*base, "--out", str(d / "gen"), "--text-steps", "7"]) == 0
    assert json.loads((d / "fl7" / "summary.json").read_text())["text_classifier"]["steps"] == 7
    assert json.loads((d / "gen" / "summary.json").read_text())["dataset_preset"] is None
    assert "no --dataset: generic defaults" in caplog.text


def test_unknown_dataset_lists_the_known_ones(env, capsys):
    d, t = env
    assert _main(["tune", "--method", "zeroshot", str(t.store), "--classes",
                  str(d / "classes.txt"), "--out", str(d / "bad"), "--dataset", "imagenett"]) == 2
    err = capsys.readouterr().err
    assert "unknown --dataset 'imagenett'" in err and "flowers102" in err
    assert not (d / "bad").exists()
    assert _main(["coder", str(t.store), "--classes", str(d / "classes.txt"), "--out",
                  str(d / "bad.csv"), "--dataset", "nope"]) == 2
    assert "known: " in capsys.readouterr().err and not (d / "bad.csv").exists()


def test_augmentation_passes_change_the_cache_keys_deterministically(env):
    from nolabels.data import EmbeddingStore
    from nolabels.methods.common import reopen_source

    d, t = env
    st = EmbeddingStore(t.store)
    stored, meta = st.load()
    src = reopen_source(st)
    a = C.augmented_embeddings(t.encoder, src, meta["item"], 3, seed=0, batch_size=4)
    b = C.augmented_embeddings(t.encoder, src, meta["item"], 3, seed=0, batch_size=5)
    torch.testing.assert_close(a, b)  # seeded per (seed, pass, item): batching is irrelevant
    assert a.shape == (len(meta["item"]), t.encoder.dim)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(a.shape[0]))
    c = C.augmented_embeddings(t.encoder, src, meta["item"], 3, seed=1)
    one = C.augmented_embeddings(t.encoder, src, meta["item"], 1, seed=0)
    s = torch.as_tensor(stored).float()
    assert not torch.allclose(a, c) and not torch.allclose(a, one)
    assert not torch.allclose(a, s, atol=1e-3)
    with pytest.raises(InputError, match="passes"):
        C.augmented_embeddings(t.encoder, src, meta["item"], 0)


def test_coder_dataset_preset_end_to_end(env, capsys):
    d, t = env
    common = ["coder", str(t.store), "--classes", str(d / "classes.txt"), "--shots",
              str(t.store), "--no-rerank", "--shot-val-fraction", "0",
              "--cache-dir", str(d / "cache")]
    assert _main([*common, "--out", str(d / "c1.csv"), "--dataset", "oxford_flowers"]) == 0
    out = capsys.readouterr()
    r1 = json.loads(out.out.strip().splitlines()[-1])
    assert r1["dataset"] == "flowers102" and r1["augment_passes"] == 20
    assert (r1["beta"], r1["alpha"]) == (38.0, 4.37)  # not searched: the preset's init
    assert "20 augmented views" in out.err
    assert _main([*common, "--out", str(d / "c2.csv"), "--dataset", "oxford_flowers"]) == 0
    capsys.readouterr()
    assert (d / "c1.csv").read_text() == (d / "c2.csv").read_text()  # deterministic
    assert _main([*common, "--out", str(d / "c3.csv"), "--dataset", "flowers102",
                  "--augment-passes", "0", "--zs-templates", "a photo of {c}."]) == 0
    r3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r3["augment_passes"] == 0 and (r3["beta"], r3["alpha"]) == (38.0, 4.37)
    assert _main([*common, "--out", str(d / "c4.csv")]) == 0
    out = capsys.readouterr()
    r4 = json.loads(out.out.strip().splitlines()[-1])
    assert r4["dataset"] is None and (r4["beta"], r4["alpha"]) == C.DEFAULT_FEW_SHOT_INIT
    assert "no --dataset: generic defaults" in out.err
