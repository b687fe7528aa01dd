"""nolabels.methods.coder: knowledge, text bank, CODER*, few-shot CODER, ATG, CLI."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nolabels.methods import coder as C
from nolabels.methods.coder import few_shot


# ----------------------------------------------------------------------------- helpers
class HashEncoder:
    """Deterministic bag-of-words text encoder (no model): each word hashes to a fixed
    random vector; a text is the normalised sum. Counts what it encodes."""

    model_id = "test:hash-bow-64"

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls: list[list[str]] = []

    def _word(self, w: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(w.lower().encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode_text(self, texts):
        self.calls.append(list(texts))
        out = torch.stack([sum(self._word(w) for w in t.replace(",", " ").replace(".", " ").split())
                           for t in texts])
        return F.normalize(out, dim=1)


def make_encoder():  # --encoder test_coder_method:make_encoder
    return HashEncoder()


def failing_encoder():  # proves a cache hit: loading it fails the test
    raise AssertionError("the encoder should not be needed (cache hit expected)")


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- knowledge
def test_example_knowledge_loads_and_matches_cifar10():
    kn = C.load_example_knowledge("cifar10")
    assert kn.dataset == "cifar10"
    assert sorted(kn.classes) == CLASSES
    assert kn.unknown_classes(CLASSES) == []
    for name, e in kn.classes.items():
        assert len(e["attributes"]) >= 5 and len(e["analogous"]) >= 5 and e["synonyms"], name
    assert kn.ovo["cat"]["dog"] and kn.ovo["dog"]["cat"]


def test_knowledge_roundtrip_and_validation(tmp_path):
    kn = C.Knowledge.from_dict({"dataset": "x", "classes": {"sea_lion": {"attributes": [" a ", ""]}},
                                "ovo": {"a": {"b": ["c"]}}})
    assert kn.classes["sea lion"] == {"attributes": ["a"], "analogous": [], "synonyms": []}
    kn.save(tmp_path / "k.json")
    assert C.Knowledge.load(tmp_path / "k.json") == kn
    assert kn.unknown_classes(["sea lion", "a"]) == ["b"]
    for bad, match in [
        ([], "top level"),
        ({"classes": []}, "map class names"),
        ({"classes": {"a": {"attributes": "x"}}}, "list of strings"),
        ({"classes": {"a": {"colour": []}}}, "unknown keys"),
        ({"ovo": {"a": {"b": "x"}}}, "list of strings"),
    ]:
        with pytest.raises(ValueError, match=match):
            C.Knowledge.from_dict(bad)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        C.Knowledge.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- text bank
def small_knowledge():
    return C.Knowledge.from_dict({
        "classes": {
            "cat": {"attributes": ["whiskers", "pointed ears"], "analogous": ["tiger"], "synonyms": ["kitten"]},
            "dog": {"attributes": ["a snout"], "analogous": [], "synonyms": []},
        },
        "ovo": {"cat": {"dog": ["slit pupils"]}, "dog": {"cat": ["floppy ears"]}, "cat2": {"dog": ["x"]}},
    })


def test_textbank_order_kinds_and_templates():
    bank = C.TextBank.build(["cat", "dog", "frog"], small_knowledge())
    assert bank.texts[:5] == ["cat which has whiskers", "cat which has pointed ears",
                              "a cat similar to tiger.", "a photo of cat", "a photo of kitten"]
    assert bank.text_type[:5] == ["att", "att", "ana", "name", "syno"]
    assert bank.text_class.tolist() == [0] * 5 + [1] * 2 + [2]
    assert bank.text_kind.tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    assert bank.texts[-1] == "a photo of frog"  # no knowledge: the name only
    # ovo: 7 generic templates per attribute; pairs with unknown classes are skipped
    assert len(bank.ovo_texts) == 14 and bank.ovo_pair.tolist() == [[0, 1]] * 7 + [[1, 0]] * 7
    assert bank.ovo_texts[0] == "Because of slit pupils, cat is different from dog."

    eu = C.TextBank.build(["cat"], small_knowledge(), templates="eurosat", ovo=False)
    assert eu.texts[0] == "A satellite photo of cat which has whiskers."
    assert eu.texts[3] == "a photo of cat, satellite domain."
    food = C.TextBank.build(["cat"], small_knowledge(), templates="food-101")
    assert food.texts[0] == "A food photo of cat which has whiskers."
    dtd = C.TextBank.build(["cat", "dog"], small_knowledge(), templates="DTD")
    assert len(dtd.ovo_texts) == 8  # 4 templates each (the authors' missing comma fixed)
    assert dtd.texts[0] == "The texture of cat is characterized by its whiskers feature."
    dtd_fs = C.TextBank.build(["cat", "dog"], small_knowledge(), templates="dtd", task="few-shot",
                              types=("name", "att", "ana"))
    assert dtd_fs.texts[0] == "cat which has whiskers"  # generic templates in few-shot
    assert "syno" not in dtd_fs.text_type


def test_textbank_errors():
    with pytest.raises(ValueError, match="no texts"):
        C.TextBank.build(["cat", "frog"], small_knowledge(), types=("att",))
    with pytest.raises(ValueError, match="duplicate"):
        C.TextBank.build(["cat", "cat"])
    with pytest.raises(ValueError, match="unknown text types"):
        C.TextBank.build(["cat"], types=("name", "colour"))
    with pytest.raises(ValueError, match="encode"):
        C.zero_shot_scores(torch.randn(2, 8), C.TextBank.build(["cat"]))


def test_encode_batches_dedupes_and_caches(tmp_path):
    enc = HashEncoder()
    bank = C.TextBank.build(["cat", "dog"], small_knowledge())
    bank.texts.append(bank.texts[0])  # a duplicate string is encoded once
    bank.text_class = torch.cat([bank.text_class, bank.text_class[:1]])
    bank.text_type.append(bank.text_type[0])
    bank.encode(enc, cache_dir=tmp_path, batch_size=4)
    assert all(len(c) <= 4 for c in enc.calls)
    encoded = [t for c in enc.calls for t in c]
    assert len(encoded) == len(set(encoded)) == len(set(bank.texts + bank.ovo_texts))
    assert bank.emb.shape == (len(bank.texts), 64) and bank.ovo_emb.shape == (14, 64)
    torch.testing.assert_close(bank.emb[-1], bank.emb[0])
    torch.testing.assert_close(bank.emb.norm(dim=1), torch.ones(len(bank.texts)))
    path = bank.cache_path(tmp_path, enc.model_id)
    assert path.exists()
    # cache hit: no encoder needed, same embeddings
    again = C.TextBank.build(["cat", "dog"], small_knowledge())
    again.texts, again.text_class, again.text_type = bank.texts, bank.text_class, bank.text_type
    again.encode(None, model_id=enc.model_id, cache_dir=tmp_path)
    torch.testing.assert_close(again.emb, bank.emb)
    # another model or other texts -> another key, and no encoder -> a clear error
    assert bank.cache_path(tmp_path, "other") != path
    other = C.TextBank.build(["cat", "frog"], small_knowledge())
    with pytest.raises(ValueError, match="no cached embeddings"):
        other.encode(None, model_id=enc.model_id, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- zero-shot
def test_zero_shot_uses_mean_of_kind0_plus_max_of_kind1():
    bank = C.TextBank.build(["a", "b"], C.Knowledge.from_dict(
        {"classes": {"a": {"attributes": ["p", "q"], "synonyms": ["r"]}, "b": {}}}), ovo=False)
    # texts: a:[att p, att q, name a, syno r], b:[name b]
    e = torch.eye(5)[:, :4]
    e[4] = torch.tensor([0.6, 0.8, 0.0, 0.0])
    bank.emb = e
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    s = C.zero_shot_scores(x, bank, backend="torch")
    # a: mean(1, 0, max(0, 0)) = 1/3 ; b: mean(max(0.6)) = 0.6
    torch.testing.assert_close(s, torch.tensor([[100 / 3, 60.0]]))


# ----------------------------------------------------------------------------- CODER*
def brute_force_rerank(x, scores, pair_texts, tau, top=5):
    """The authors' modify_top_gap as loops (ovo texts per ordered pair), applied to every
    row with gap < tau (no labels)."""
    p = scores.softmax(1)
    out = scores.argmax(1).clone()
    xs = F.normalize(x.double(), dim=1)
    for i in range(x.shape[0]):
        t2 = p[i].topk(2).values
        if not (t2[0] - t2[1] < tau):
            continue
        cand = scores[i].topk(min(top, scores.shape[1])).indices.tolist()
        best, best_r = None, None
        for c in cand:
            terms = []
            for o in cand:
                if o == c:
                    continue
                if (c, o) in pair_texts and (o, c) in pair_texts:
                    terms.append(float((pair_texts[(c, o)].double() @ xs[i]).mean()
                                       - (pair_texts[(o, c)].double() @ xs[i]).mean()))
                else:
                    terms.append(0.0)
            r = sum(terms) / len(terms)
            if best_r is None or r > best_r:
                best, best_r = c, r
        out[i] = best
    return out


def test_rerank_constructed_case():
    d, c = 6, 6
    bank = C.TextBank.build([f"c{i}" for i in range(c)], ovo=False)
    bank.emb = torch.eye(c, d)
    # ovo pair (2, 0): text along e5 ; (0, 2): text along -e5 -> class 2 beats class 0
    bank.ovo_pair = torch.tensor([[2, 0], [0, 2], [2, 0]])
    bank.ovo_emb = torch.tensor([[0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, -1.0], [0, 0, 0, 0, 0, 1.0]])
    x = torch.tensor([
        [1.0, 0.0, 0.9, 0, 0, 1.0],  # gap small, top-2 = (0, 2) -> re-ranked to 2
        [1.0, 0.0, 0.0, 0, 0, 1.0],  # gap large -> untouched (class 0)
        [0.0, 1.0, 0.99, 0, 0, 0.0],  # gap small but no complete pair among (1, 2, ...) except (2,0)
    ])
    scores = torch.tensor([[10.0, 1, 9.9, 0, 0, 0], [10.0, 1, 2, 0, 0, 0], [1, 10.0, 9.95, 0, 0, 0.5]])
    res = C.ovo_rerank(x, scores, bank, tau=0.3)
    assert res.reranked.tolist() == [True, False, True]
    assert res.pred.tolist() == [2, 0, 1]
    assert res.changed.tolist() == [True, False, False]
    # the 1/(top-1) factor and missing-pair rule match the authors' loop
    want = brute_force_rerank(x, scores, {(2, 0): bank.ovo_emb[[0, 2]], (0, 2): bank.ovo_emb[[1]]}, 0.3)
    assert res.pred.tolist() == want.tolist()
    # tau = 0 re-ranks nothing
    assert C.ovo_rerank(x, scores, bank, tau=0.0).pred.tolist() == scores.argmax(1).tolist()


def test_rerank_matches_brute_force_on_random_banks(gen):
    c, d, n = 12, 16, 300
    bank = C.TextBank.build([f"c{i}" for i in range(c)], ovo=False)
    bank.emb = F.normalize(torch.randn(c, d, generator=gen), dim=1)
    pairs, embs, pair_texts = [], [], {}
    for a in range(c):
        for b in range(c):
            if a != b and torch.rand(1, generator=gen) < 0.5:
                k = int(torch.randint(1, 4, (1,), generator=gen))
                e = F.normalize(torch.randn(k, d, generator=gen), dim=1)
                pairs += [[a, b]] * k
                embs.append(e)
                pair_texts[(a, b)] = e
    bank.ovo_pair, bank.ovo_emb = torch.tensor(pairs), torch.cat(embs)
    x = torch.randn(n, d, generator=gen)
    scores = C.zero_shot_scores(x, bank, backend="torch") * 0.1
    res = C.ovo_rerank(x, scores, bank, tau=0.2, chunk=37)
    assert res.reranked.sum() > 20 and res.changed.sum() > 5  # the case is exercised
    want = brute_force_rerank(x, scores, pair_texts, 0.2)
    assert res.pred.tolist() == want.tolist()


def test_coder_zero_shot_end_to_end_with_encoder():
    enc = HashEncoder()
    kn = C.load_example_knowledge()
    bank = C.TextBank.build(CLASSES, kn).encode(enc)
    # "images" = the embedding of each class name's name text, plus noise
    x = enc.encode_text([f"a photo of {c}" for c in CLASSES]) + 0.01 * torch.randn(10, 64)
    scores, res = C.coder_zero_shot(x, bank, dataset="cifar10")
    assert scores.shape == (10, 10) and res.pred.shape == (10,)
    assert (res.pred == torch.arange(10)).float().mean() >= 0.8


def test_default_tau():
    assert C.default_tau("ImageNet") == 0.1 and C.default_tau("DTD") == 0.6
    assert C.default_tau("caltech-101") == 0.3 and C.default_tau("eurosat") == 0.3
    assert C.default_tau("cifar10") == C.DEFAULT_TAU and C.default_tau(None) == C.DEFAULT_TAU


# ----------------------------------------------------------------------------- few-shot
def synthetic_few_shot(gen, c=6, d=32, k=8, n_test=600, m=80):
    """Class clusters in image space; the zero-shot text classifier is badly biased
    (weights far from the cluster centres); a random text bank."""
    mu = F.normalize(torch.randn(c, d, generator=gen), dim=1)
    zs = F.normalize(mu + 1.2 * torch.randn(c, d, generator=gen), dim=1)
    bank = C.TextBank.build([f"c{i}" for i in range(c)], ovo=False)
    bank.emb = F.normalize(torch.randn(m, d, generator=gen), dim=1)
    bank.text_class = torch.arange(m) % c
    bank.text_type = ["att"] * (m - c) + ["name"] * c

    def sample(n):
        y = torch.randint(0, c, (n,), generator=gen)
        return mu[y] + 0.35 * torch.randn(n, d, generator=gen), y

    shots_y = torch.arange(c).repeat_interleave(k)
    shots_x = mu[shots_y] + 0.35 * torch.randn(c * k, d, generator=gen)
    test_x, test_y = sample(n_test)
    return bank, zs, shots_x, shots_y, test_x, test_y


def test_few_shot_beats_zero_shot_on_clusters(gen):
    bank, zs, sx, sy, tx, ty = synthetic_few_shot(gen)
    few = C.CoderFewShot(bank, zs, sx, sy)
    fit = few.fit(steps=(40, 20), rounds=2)
    assert fit.searched and fit.n_val == 12 and fit.n_cache == 36  # 2 of 8 shots per class held out
    zs_acc = C.accuracy((tx @ zs.T).argmax(1), ty)
    fs_acc = C.accuracy(few.predict(tx), ty)
    assert fs_acc > zs_acc + 0.15, (zs_acc, fs_acc)


def test_few_shot_affinity_computed_once_and_grid_is_exact(gen, monkeypatch):
    bank, zs, sx, sy, _, _ = synthetic_few_shot(gen, c=4, k=6, n_test=50)
    calls = []
    real = few_shot.ops.coder_affinity

    def counting(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(few_shot.ops, "coder_affinity", counting)  # the ops few_shot calls
    few = C.CoderFewShot(bank, zs, sx, sy)
    fit = few.fit(steps=(30, 12), rounds=1, val_fraction=0.34, seed=3)
    assert len(calls) == 1  # one affinity for the whole grid search

    # brute force over the same split (the library's) and grid with dense CODER vectors
    val, cache = C.stratified_split(sy, 0.34, 4, seed=3)
    assert fit.n_val == val.numel() and fit.n_cache == cache.numel()
    vx, vy, kx, ky = sx[val], sy[val], sx[cache], sy[cache]
    t = F.normalize(bank.emb.double(), dim=1)

    def coder_vec(z):
        return F.normalize(F.normalize(z.double(), dim=1) @ t.T, dim=1)

    a = coder_vec(vx) @ coder_vec(kx).T
    a = (a - a.min(1, keepdim=True).values) / (a.max(1, keepdim=True).values - a.min(1, keepdim=True).values)
    best = (-1.0, None, None)
    for b in C.grid(0.1, 200.0, 30).tolist():
        for al in C.grid(0.1, 20.0, 12).tolist():
            logits = 100 * F.normalize(vx.double(), dim=1) @ F.normalize(zs.double(), dim=1).T \
                + al * torch.exp(-b * (1 - a)) @ F.one_hot(ky, 4).double()
            acc = float((logits.argmax(1) == vy).double().mean())
            if acc > best[0]:
                best = (acc, b, al)
    assert fit.val_acc == pytest.approx(best[0])
    assert (fit.beta, fit.alpha) == (pytest.approx(best[1]), pytest.approx(best[2]))


def test_stratified_split_holds_out_per_class(gen):
    labels = torch.tensor([0] * 8 + [1] * 3 + [2] * 1 + [3] * 4)[torch.randperm(16, generator=gen)]
    val, cache = C.stratified_split(labels, 0.25, 5, seed=11)
    assert sorted(torch.cat([val, cache]).tolist()) == list(range(16))  # disjoint, complete
    # floor(0.25 K_c), at least 1; a one-shot class and an empty class keep everything
    assert torch.bincount(labels[val], minlength=5).tolist() == [2, 1, 0, 1, 0]
    assert labels[val].tolist() == sorted(labels[val].tolist())  # grouped by class
    again, _ = C.stratified_split(labels, 0.25, 5, seed=11)
    other = [C.stratified_split(labels, 0.25, 5, seed=s)[0] for s in range(12, 20)]
    assert torch.equal(val, again) and any(not torch.equal(val, o) for o in other)
    none, everything = C.stratified_split(labels, 0.0, 5)
    assert none.numel() == 0 and everything.numel() == 16


def test_few_shot_one_shot_uses_init_and_validates(gen):
    bank, zs, sx, sy, tx, _ = synthetic_few_shot(gen, c=3, k=1)
    few = C.CoderFewShot(bank, zs, sx, sy)
    fit = few.fit(dataset="DTD")
    assert not fit.searched and (fit.beta, fit.alpha) == (30.18, 2.57)
    assert few.logits(tx[:5]).shape == (5, 3)
    with pytest.raises(ValueError, match="shot_labels must be in"):
        C.CoderFewShot(bank, zs, sx, sy + 5)
    with pytest.raises(ValueError, match="zs_weights"):
        C.CoderFewShot(bank, zs[:2], sx, sy)
    with pytest.raises(ValueError, match="val_fraction"):
        few.fit(val_fraction=1.0)


def test_minmax_rows():
    a = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    torch.testing.assert_close(C.minmax_rows(a), torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]))


# ----------------------------------------------------------------------------- ATG server
class FakeLLM:
    """A chat endpoint on 127.0.0.1 that answers by prompt content and records requests."""

    def __init__(self, fail_first: int = 0, status: int = 500):
        self.requests: list[dict] = []
        self.fail_first, self.status = fail_first, status
        llm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                llm.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     "body": body})
                if len(llm.requests) <= llm.fail_first:
                    self.send_response(llm.status)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                text = llm.answer(body["messages"][0]["content"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer(prompt: str) -> str:
        last_q = prompt.rsplit("Q:", 1)[1]
        if "has already appeared" in last_q:
            return "Lynx\n_Ocelot\n"
        if "useful visual features" in last_q:
            return "whiskers\n_pointed ears\n_whiskers\n_ long tail \n"
        if "visually similar" in last_q:
            return "Dog\n_Tiger\n_Lion\n"
        if "synonyms" in last_q:
            return "Kitty\n_Cat\n_Feline\n"
        if "different visual features" in last_q:
            return "Slit pupils\n_Retractable claws\nFor Dog:\n_Round pupils\n_Floppy ears\n"
        return "?"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    server = FakeLLM()
    yield server
    server.close()


class WordEncoder(HashEncoder):
    """'a photo of X' embeddings equal for equal X: the rejection rule's cosine is 1."""


def test_generator_parses_the_paper_formats(llm, monkeypatch):
    monkeypatch.setenv("NL_TEST_LLM_KEY", "sk-test")  # keys come from the environment only
    gen = C.KnowledgeGenerator(llm.url, "fake-model", api_key_env="NL_TEST_LLM_KEY")
    assert gen.attributes("cat") == ["whiskers", "pointed ears", "long tail"]
    assert gen.synonyms("cat") == ["Kitty", "Feline"]
    assert gen.ovo("cat", "dog") == (["Slit pupils", "Retractable claws"], ["Round pupils", "Floppy ears"])
    assert gen.analogous("cat") == ["Dog", "Tiger", "Lion"]  # no encoder: nothing rejected
    r = llm.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-test"
    assert r["body"]["model"] == "fake-model"
    assert "distinguishing a cat in a photo" in r["body"]["messages"][0]["content"]


def test_generator_rejection_and_fixed_reask_loop(llm):
    gen = C.KnowledgeGenerator(llm.url, "m", encoder=WordEncoder())
    got = gen.analogous("cat", ["cat", "dog", "frog"])
    # "Dog" is another class of the dataset -> rejected; one re-ask for 1 more, whose
    # answer is clean -> stop (the authors' loop would have asked 6 times).
    assert got == ["Tiger", "Lion", "Lynx", "Ocelot"]
    assert len(llm.requests) == 2
    reask = llm.requests[1]["body"]["messages"][0]["content"]
    assert "Q: Dog has already appeared in the class set. Please give 1 more" in reask


def test_generator_retries_then_fails_cleanly():
    server = FakeLLM(fail_first=2, status=503)
    try:
        sleeps = []
        gen = C.KnowledgeGenerator(server.url, "m", retries=3, sleep=sleeps.append)
        assert gen.synonyms("cat") == ["Kitty", "Feline"]
        assert len(server.requests) == 3 and sleeps == [1.0, 2.0]
    finally:
        server.close()
    server = FakeLLM(fail_first=10, status=400)
    try:
        gen = C.KnowledgeGenerator(server.url, "m", retries=3, sleep=lambda s: None)
        with pytest.raises(C.ChatError, match="HTTP 400"):
            gen.synonyms("cat")
        assert len(server.requests) == 1  # a client error is not retried
    finally:
        server.close()
    gen = C.KnowledgeGenerator("http://127.0.0.1:9/v1", "m", retries=2, sleep=lambda s: None, timeout=2)
    with pytest.raises(C.ChatError, match="no answer after 2 attempts"):
        gen.synonyms("cat")


def test_generate_knowledge_end_to_end(llm, tmp_path):
    gen = C.KnowledgeGenerator(llm.url, "m")
    kn = gen.generate(["cat", "dog"], pairs=[("cat", "dog")], dataset="pets")
    assert kn.classes["dog"]["attributes"] == ["whiskers", "pointed ears", "long tail"]
    assert kn.ovo == {"cat": {"dog": ["Slit pupils", "Retractable claws"]},
                      "dog": {"cat": ["Round pupils", "Floppy ears"]}}
    kn.save(tmp_path / "k.json")
    bank = C.TextBank.build(["cat", "dog"], C.Knowledge.load(tmp_path / "k.json"))
    assert len(bank.ovo_texts) == 2 * 2 * 4  # 2 attributes per side x 4 pet templates
    pairs = C.confusing_pairs(torch.eye(3)[[0, 0, 1]] + 0.01, ["a", "b", "c"], per_class=1)
    assert ("a", "b") in pairs


# ----------------------------------------------------------------------------- CLI
def cli(argv):
    from nolabels.commands import coder as cmd

    p = argparse.ArgumentParser(prog="nolabels")
    sub = p.add_subparsers(dest="command", required=True)
    cmd.register(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_coder_zero_and_few_shot(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    enc = HashEncoder()
    g = torch.Generator().manual_seed(0)
    cls = CLASSES[:4]
    names = enc.encode_text([f"a photo of {c}" for c in cls])
    y = torch.arange(4).repeat_interleave(10)
    x = names[y] + 0.05 * torch.randn(40, 64, generator=g)
    paths = [f"imgs/{cls[i]}/{j:03d}.jpg" for j, i in enumerate(y.tolist())]
    torch.save({"emb": x, "paths": paths, "model_id": enc.model_id}, tmp_path / "store.pt")
    (tmp_path / "classes.txt").write_text("\n".join(cls) + "\n")
    kn = C.load_example_knowledge()
    kn.classes = {k: v for k, v in kn.classes.items() if k in cls}
    kn.ovo = {}
    kn.save(tmp_path / "k.json")
    sy = torch.arange(4).repeat_interleave(4)
    torch.save({"emb": names[sy] + 0.05 * torch.randn(16, 64, generator=g), "labels": [cls[i] for i in sy]},
               tmp_path / "shots.pt")
    common = [str(tmp_path / "store.pt"), "--classes", str(tmp_path / "classes.txt"),
              "--knowledge", str(tmp_path / "k.json"), "--cache-dir", str(tmp_path / "cache")]
    assert cli(["coder", *common, "--out", str(tmp_path / "p.parquet"), "--eval",
                "--encoder", "test_coder_method:make_encoder"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert table["path"] == paths and len(table["pred"]) == 40
    assert set(table["label"]) <= set(cls)
    assert report["accuracy_coder_star"] >= 0.9 and report["evaluated_rows"] == 40
    # few-shot, and the text cache makes the encoder unnecessary for the zero-shot bank
    assert cli(["coder", *common, "--out", str(tmp_path / "p2.csv"), "--shots", str(tmp_path / "shots.pt"),
                "--encoder", "test_coder_method:make_encoder", "--eval"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["shots_val"] == 4 and report["accuracy_few_shot"] >= 0.9
    assert (tmp_path / "p2.csv").read_text().splitlines()[0].startswith("path,zs_pred")
    # cache hit: no encoder given, the store's model id keys the cache (an --encoder would
    # be loaded: the cache is keyed by the model that embeds the texts)
    assert cli(["coder", *common, "--out", str(tmp_path / "p3.parquet")]) == 0


def test_cli_reads_an_embedding_store_directory(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    enc = HashEncoder()
    x = enc.encode_text(["a photo of cat", "a photo of dog", "a photo of cat"]).numpy().astype(np.float16)
    store = tmp_path / "store"
    store.mkdir()
    np.save(store / "emb_00000.npy", x[:2])
    np.save(store / "emb_00001.npy", x[2:])
    pq.write_table(pa.table({"path": ["a/cat/1.jpg", "a/dog/2.jpg"], "row": [0, 1]}), store / "meta_00000.parquet")
    pq.write_table(pa.table({"path": ["a/cat/3.jpg"], "row": [0]}), store / "meta_00001.parquet")
    (store / "manifest.json").write_text(json.dumps({"model_id": enc.model_id, "dim": 64}))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert cli(["coder", str(store), "--classes", str(tmp_path / "classes.txt"), "--out",
                str(tmp_path / "p.parquet"), "--encoder", "test_coder_method:make_encoder",
                "--cache-dir", str(tmp_path / "c"), "--eval"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 3 and report["accuracy_zero_shot"] == 1.0
    assert pq.read_table(tmp_path / "p.parquet").to_pydict()["label"] == ["cat", "dog", "cat"]


def test_cli_coder_knowledge_against_fake_server(llm, tmp_path, monkeypatch, capsys):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "pairs.tsv").write_text("cat\tdog\n")
    monkeypatch.setenv("NOLABELS_LLM_BASE_URL", llm.url)
    monkeypatch.setenv("MY_KEY", "sk-env")
    assert cli(["coder-knowledge", "--classes", str(tmp_path / "classes.txt"), "--out",
                str(tmp_path / "k.json"), "--llm-model", "m", "--api-key-env", "MY_KEY",
                "--pairs", str(tmp_path / "pairs.tsv"), "--dataset", "pets"]) == 0
    kn = C.Knowledge.load(tmp_path / "k.json")
    assert set(kn.classes) == {"cat", "dog"} and kn.ovo["dog"]["cat"] == ["Round pupils", "Floppy ears"]
    assert all(r["auth"] == "Bearer sk-env" for r in llm.requests)
    assert json.loads(capsys.readouterr().out)["requests"] == len(llm.requests) == 2 * 3 + 1
    with pytest.raises(ValueError, match="base-url"):
        monkeypatch.delenv("NOLABELS_LLM_BASE_URL")
        cli(["coder-knowledge", "--classes", str(tmp_path / "classes.txt"), "--out", str(tmp_path / "x.json"),
             "--llm-model", "m"])


def test_cli_with_the_project_embedding_store(tmp_path, capsys):
    """Images and shots from nolabels.data.store.EmbeddingStore (a failed image is skipped;
    shot labels come from the store's class-folder labels; the model id from its manifest)."""
    pytest.importorskip("pyarrow")
    store_mod = pytest.importorskip("nolabels.data.store")
    enc = HashEncoder()

    def make(root, names):
        x = enc.encode_text([f"a photo of {c}" for c in names]).numpy()
        st = store_mod.EmbeddingStore.create_or_resume(
            root, model={"model_id": enc.model_id, "dim": 64, "spec": None},
            source={"kind": "test", "num_items": len(names) + 1, "fingerprint": "f"}, shard_size=64)
        items = list(range(len(names)))
        entry = st.write_shard(0, x, items, [f"d/{c}/{i}.jpg" for i, c in enumerate(names)], names,
                               [(len(names), "d/cat/broken.jpg", "cat", "truncated file")])
        st.commit(entry)
        return root

    imgs = make(tmp_path / "imgs", ["cat", "dog", "dog", "cat"])
    shots = make(tmp_path / "shots", ["cat", "dog", "cat", "dog"])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert cli(["coder", str(imgs), "--classes", str(tmp_path / "classes.txt"), "--shots", str(shots),
                "--out", str(tmp_path / "p.csv"), "--encoder", "test_coder_method:make_encoder",
                "--cache-dir", str(tmp_path / "c"), "--eval", "--shot-val-fraction", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 4 and report["accuracy_zero_shot"] == 1.0
    assert report["shots_val"] == 2 and report["accuracy_few_shot"] == 1.0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 5 and "broken" not in "".join(lines)
    # the text cache is keyed by the store's model id
    assert any(enc.model_id.replace(":", "_") in p.name for p in (tmp_path / "c").iterdir())
