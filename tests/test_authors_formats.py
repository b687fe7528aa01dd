"""The authors' text formats: LaFTer/NoLA description files and CODER's knowledge bundle,
written here in the authors' layouts (made-up content), and the texts that reach the
text encoder."""
from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from nolabels.cli import main as cli
from nolabels.errors import CorruptFileError, InputError
from nolabels.methods import coder as C
from nolabels.methods.lafter import text_dataset
from nolabels.methods.zeroshot import cde_embeddings, compact_name, read_descriptions

#: every text any RecordingEncoder was asked to encode (CLI runs build their own)
SEEN: list[str] = []


class RecordingEncoder:
    """A text encoder that records its inputs; each text maps to a fixed random vector."""

    model_id = "test:recording-32"

    def encode_text(self, texts):
        SEEN.extend(texts)
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            rows.append(torch.randn(32, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(rows), dim=1)


def make_encoder():  # --encoder test_authors_formats:make_encoder
    return RecordingEncoder()


# ----------------------------------------------------------------------------- descriptions
def write_nola_style(tmp_path):
    """``descriptions/generic/<Dataset>.json`` as LaFTer/NoLA ship them: keys are the
    data set's folder names (CamelCase, run together, or plain), sentences as the LLM
    wrote them (leading newline or space, a lone '.')."""
    d = tmp_path / "descriptions" / "generic"
    d.mkdir(parents=True)
    f = d / "AID.json"
    f.write_text(json.dumps({
        "BareLand": ["\nA bare land is open ground.", " It has  no trees."],
        "denseresidential": ["Houses packed close together."],
        "Airport": ["A long runway.", "."],
        "Forest": ["Trees."],  # a class the user does not ask for: ignored
    }, indent=4))
    return f


def test_lafter_text_set_from_an_authors_file(tmp_path):
    f = write_nola_style(tmp_path)
    classes = ["bare land", "dense_residential", "airport"]
    desc = read_descriptions(f, classes)
    assert desc == {"bare land": ["A bare land is open ground.", "It has no trees."],
                    "dense_residential": ["Houses packed close together."],
                    "airport": ["A long runway.", "."]}
    SEEN.clear()
    emb, labels, texts = text_dataset(RecordingEncoder(), classes, ["a photo of a {}."], desc)
    assert texts == ["a photo of a bare land.", "A bare land is open ground.", "It has no trees.",
                     "a photo of a dense residential.", "Houses packed close together.",
                     "a photo of a airport.", "A long runway.", "."]
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert sorted(SEEN) == sorted(set(texts))  # each distinct text encoded once, as written
    assert emb.shape == (8, 32)


def test_nola_cde_from_an_authors_file(tmp_path):
    f = write_nola_style(tmp_path)
    classes = ["airport", "BareLand"]
    SEEN.clear()
    enc = RecordingEncoder()
    got = cde_embeddings(enc, classes, f, templates=["a {}.", "the {}."])
    per_class = [["a airport.", "the airport.", "A long runway.", "."],
                 ["a BareLand.", "the BareLand.", "A bare land is open ground.", "It has no trees."]]
    assert sorted(SEEN) == sorted(t for ts in per_class for t in ts)
    want = torch.stack([F.normalize(enc.encode_text(ts), dim=1).mean(0) for ts in per_class])
    torch.testing.assert_close(got, F.normalize(want, dim=1))


def test_a_class_missing_from_the_file_is_an_error_naming_it(tmp_path):
    f = write_nola_style(tmp_path)
    with pytest.raises(InputError, match=r"no descriptions for 2 of the 3 classes: 'harbor', "
                                         r"'golf course'"):
        read_descriptions(f, ["airport", "harbor", "golf course"])
    (tmp_path / "two.json").write_text(json.dumps({"BareLand": ["x"], "bareland": ["y"]}))
    with pytest.raises(InputError, match="could each describe the class 'bare land'"):
        read_descriptions(tmp_path / "two.json", ["bare land"])
    (tmp_path / "empty.json").write_text(json.dumps({"airport": []}))
    with pytest.raises(InputError, match="non-empty list"):
        read_descriptions(tmp_path / "empty.json", ["airport"])
    assert compact_name("Dense_Residential-2") == "denseresidential2"


# ----------------------------------------------------------------------------- CODER bundle
CLASSES = ["sea_lion", "golden_retriever", "cat"]


def write_bundle(root, dataset="caltech-101", classes=CLASSES, protocol=4):
    """``expert_knowledge/`` as the authors' README's download lays it out."""
    ek = root / "expert_knowledge"
    for d in ("attribute", "simile_class", "synonym", "ovo_attribute"):
        (ek / d).mkdir(parents=True, exist_ok=True)
    att = [["flippers", "whiskers"], ["golden fur"], []][:len(classes)]
    ana = [["seal"], ["labrador"], ["tiger", "lynx"]][:len(classes)]
    (ek / "attribute" / f"{dataset}.pkl").write_bytes(pickle.dumps(att, protocol=protocol))
    (ek / "simile_class" / f"{dataset}.pkl").write_bytes(pickle.dumps(ana, protocol=protocol))
    (ek / "synonym" / f"{dataset}.json").write_text(json.dumps(
        [{"syno": ["sea-lion"]}, {"syno": ["golden_retriever_dog"]}, {"syno": []}][:len(classes)]))
    (ek / "ovo_attribute" / f"{dataset}.json").write_text(json.dumps(
        {"sea_lion": {"cat": ["wet skin"]}, "cat": {"sea_lion": ["pointed ears"]}}))
    return ek


@pytest.mark.parametrize("protocol", [2, 4])
def test_read_the_authors_bundle(tmp_path, protocol):
    write_bundle(tmp_path, protocol=protocol)
    kn = C.read_authors_knowledge(tmp_path, "caltech-101", CLASSES)  # the folder above works
    assert kn.dataset == "caltech-101"
    assert kn.entry("sea_lion") == {"attributes": ["flippers", "whiskers"], "analogous": ["seal"],
                                    "synonyms": ["sea-lion"]}
    assert kn.entry("cat") == {"attributes": [], "analogous": ["tiger", "lynx"], "synonyms": []}
    assert kn.ovo == {"sea lion": {"cat": ["wet skin"]}, "cat": {"sea lion": ["pointed ears"]}}
    # the data-set name is matched ignoring case and punctuation; one data set: no --dataset
    assert C.read_authors_knowledge(tmp_path / "expert_knowledge", "Caltech101", CLASSES).classes \
        == kn.classes
    assert C.load_knowledge(tmp_path, CLASSES).classes == kn.classes
    bank = C.TextBank.build(CLASSES, kn)
    assert bank.texts[:7] == ["sea lion which has flippers", "sea lion which has whiskers",
                              "a sea lion similar to seal.", "a photo of sea lion",
                              "a photo of sea-lion", "golden retriever which has golden fur",
                              "a golden retriever similar to labrador."]
    assert "a photo of golden retriever dog" in bank.texts  # a WordNet lemma's "_" is a space
    assert "a photo of sea-lion" in bank.texts
    assert bank.ovo_texts[0] == "Because of wet skin, sea lion is different from cat."


def test_bundle_errors(tmp_path):
    write_bundle(tmp_path)
    with pytest.raises(InputError, match=r"3 entries, but 2 classes"):
        C.read_authors_knowledge(tmp_path, "caltech-101", CLASSES[:2])
    with pytest.raises(InputError, match=r"no knowledge for the data set 'DTD' \(present: caltech-101\)"):
        C.read_authors_knowledge(tmp_path, "DTD", CLASSES)
    with pytest.raises(InputError, match="pass --classes"):
        C.load_knowledge(tmp_path)
    write_bundle(tmp_path, dataset="DTD")
    with pytest.raises(InputError, match="pass --dataset"):
        C.load_knowledge(tmp_path, CLASSES)


class _Trap:
    ran = False

    def __reduce__(self):
        return (_spring, ())


def _spring():
    _Trap.ran = True
    return []


def test_a_pickle_that_names_code_is_refused_unrun(tmp_path):
    ek = write_bundle(tmp_path)
    (ek / "attribute" / "caltech-101.pkl").write_bytes(pickle.dumps([_Trap(), [], []]))
    with pytest.raises(CorruptFileError, match=r"attribute/caltech-101.pkl.*_spring.*nothing in "
                                               r"the file is executed"):
        C.read_authors_knowledge(tmp_path, "caltech-101", CLASSES)
    assert not _Trap.ran


def test_cli_coder_runs_on_the_authors_bundle(tmp_path, capsys):
    pytest.importorskip("pyarrow.parquet")
    write_bundle(tmp_path)
    enc = RecordingEncoder()
    x = enc.encode_text(["a photo of sea lion", "a photo of cat"])
    torch.save({"emb": x, "paths": ["i/sea_lion/0.jpg", "i/cat/1.jpg"], "model_id": enc.model_id},
               tmp_path / "store.pt")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    SEEN.clear()
    assert cli(["coder", str(tmp_path / "store.pt"), "--classes", str(tmp_path / "classes.txt"),
                "--knowledge", str(tmp_path / "expert_knowledge"), "--dataset", "caltech-101",
                "--out", str(tmp_path / "p.parquet"), "--encoder",
                "test_authors_formats:make_encoder", "--cache-dir", str(tmp_path / "c"),
                "--reproduce", "all"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 2 and report["ovo_texts"] == 14
    # the authors' rendering: '_' kept in attribute / analogous / ovo texts, synonyms "None"
    assert "sea_lion which has flippers" in SEEN and "a sea_lion similar to seal." in SEEN
    assert "a photo of sea lion" in SEEN and "a photo of None" in SEEN
    assert "Because of wet skin, sea_lion is different from cat." in SEEN
    assert not any("sea-lion" in t or "retriever dog" in t for t in SEEN)


def test_descriptions_given_in_memory_must_cover_every_class():
    enc = RecordingEncoder()
    with pytest.raises(InputError, match=r"none for 1 of the 2 classes: 'harbor'"):
        cde_embeddings(enc, ["airport", "harbor"], {"airport": ["A long runway."]})
    with pytest.raises(InputError, match=r"none for 1 of the 2 classes: 'harbor'"):
        text_dataset(enc, ["airport", "harbor"], ["a {}."], {"Airport": ["A long runway."]})
    _, labels, texts = text_dataset(enc, ["sea_lion"], ["a {}."], {"Sea Lion": ["Flippers."]})
    assert texts == ["a sea lion.", "Flippers."] and labels.tolist() == [0, 0]
