"""LatteCLIP: text weights, mixing (and the w_cls bug), targets, prototype update and
the CLIP loss by hand; caption files; the caption generator against a fake
OpenAI-compatible server on 127.0.0.1; the loss falling on a tiny random-init CLIP."""
from __future__ import annotations

import base64
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")
pytest.importorskip("pyarrow")

from _methods_helpers import tiny_setup
from nolabels.methods import latteclip as lc
from nolabels.methods.common import load_run, load_tune_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("latte"), per_class=6)


# --------------------------------------------------------------------------- by hand
P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])


def test_text_weight_is_prototype_margin():
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # s = e P^T: row0 [1, 0, .7071] -> 1 - .7071; row1 [.6, .8, .9899] -> .9899 - .8
    want = [1 - math.sqrt(0.5), 1.4 * math.sqrt(0.5) - 0.8, 1 - math.sqrt(0.5)]
    got = lc.text_weight(e, P)
    torch.testing.assert_close(got, torch.tensor(want) + 1e-6, atol=1e-6, rtol=0)


def test_mix_texts_and_the_wcls_bug():
    e_cls, e_img, e_grp = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.6, 0.8]])
    w_cls, w_img, w_grp = torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([0.25])
    t = lc.mix_texts(w_cls, e_cls, w_img, e_img, w_grp, e_grp)
    torch.testing.assert_close(t, torch.tensor([[0.5 + 0.15, 0.25 + 0.2]]))
    # the authors' t_zs: w_cls,ft in the numerator, w_cls,zs in the denominator
    w_ft = torch.tensor([1.5])
    bug = lc.mix_texts(w_cls, e_cls, w_img, e_img, w_grp, e_grp, w_cls_numerator=w_ft)
    torch.testing.assert_close(bug, torch.tensor([[(1.5 + 0.15) / 1.0, 0.45]]))
    # not a convex combination: the mix leaves the hull of the three texts
    assert bug[0, 0] > 1.0


def test_prototype_targets():
    y = torch.tensor([0, 2])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    z = lc.prototype_targets(P, y, t, 0.1)
    torch.testing.assert_close(z[0], torch.tensor([0.9, 0.1]))
    r = math.sqrt(0.5)
    torch.testing.assert_close(z[1], torch.tensor([r + 0.1 * (1 - r), 0.9 * r]))


def test_prototype_update_by_hand():
    prot = P.clone()
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 4.0]])
    y = torch.tensor([1, 1, 0, 1])
    lc.update_prototypes(prot, z, y)
    # class 1: mean of (2,0), (0,2), (3,4) = (5/3, 2) -> normalised; class 0: (1,1)
    m = torch.tensor([5 / 3, 2.0])
    torch.testing.assert_close(prot[1], m / m.norm())
    torch.testing.assert_close(prot[0], torch.tensor([math.sqrt(0.5)] * 2))
    torch.testing.assert_close(prot[2], P[2])  # absent class: unchanged


def test_clip_loss_by_hand():
    a = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=-1)
    b = F.normalize(torch.tensor([[1.0, 0.0], [0.5, 1.0]]), dim=-1)
    s = 10.0
    L = s * a @ b.T
    i2t = -(torch.log_softmax(L, 1).diagonal()).mean()
    t2i = -(torch.log_softmax(L.T, 1).diagonal()).mean()
    assert lc.clip_loss(a, b, torch.tensor(s)).item() == pytest.approx(0.5 * (i2t + t2i).item(), abs=1e-6)


# --------------------------------------------------------------------------- captions
def test_read_captions(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join([
        json.dumps({"image": "a/1.png", "caption": "a cat on a mat\nsecond line"}),
        json.dumps({"class": "cat", "caption": "furry animals"}),
        json.dumps({"class": "cat", "caption": "pets indoors"}),
        json.dumps({"image": "a/2.png", "group_caption": "boats"}),
        "",
    ]))
    c = lc.read_captions([f])
    assert c.image == {"a/1.png": "a cat on a mat\nsecond line"}
    assert c.group_by_class == {"cat": ["furry animals", "pets indoors"]}
    assert c.group_by_image == {"a/2.png": "boats"}
    assert lc.first_line(c.image["a/1.png"]) == "a cat on a mat"
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        lc.read_captions([tmp_path / "bad.jsonl"])


class _Fake(BaseHTTPRequestHandler):
    requests: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body,
                                    "auth": self.headers.get("Authorization")})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        parts = body["messages"][0]["content"]
        n_img = sum(p["type"] == "image_url" for p in parts)
        text = parts[0]["text"]
        answer = f"{'group' if 'common' in text else 'single'} of {n_img}\nignored second line"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_server():
    _Fake.requests = []
    _Fake.fail_first = 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_generator_against_fake_server(tiny, tmp_path, fake_server, monkeypatch):
    from PIL import Image

    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.0)
    zs = [0] * 10 + [1] * 8  # class 2 has no image: no group caption for it
    monkeypatch.setenv("NL_TEST_CAPTION_KEY", "k123")  # keys come from the environment only
    client = lc.VisionChatClient(fake_server, "llava-test", api_key_env="NL_TEST_CAPTION_KEY",
                                 retries=2, sleep=lambda s: None)
    _Fake.fail_first = 1  # one transient 503: retried
    out = lc.generate_captions(data.source, data.items, data.paths, zs, tiny.classes,
                               tmp_path / "caps.jsonl", client, noun="texture",
                               groups_per_class=2, seed=0)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    singles = [x for x in lines if "image" in x]
    groups = [x for x in lines if "class" in x]
    assert len(singles) == data.n and all(x["caption"] == "single of 1" for x in singles)
    assert [g["class"] for g in groups] == ["cat", "cat", "dog", "dog"]
    assert all(g["caption"] == "group of 1" and len(g["images"]) == 4 for g in groups)
    # the groups are drawn from the pseudo-class
    assert all(data.paths.index(p) < 10 for g in groups[:2] for p in g["images"])
    req = _Fake.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k123"
    assert req["body"]["model"] == "llava-test" and req["body"]["temperature"] == 0
    assert req["body"]["max_tokens"] == 77
    assert "common visual attributes of the objects" in req["body"]["messages"][0]["content"][0]["text"]
    first = _Fake.requests[1]["body"]["messages"][0]["content"]
    assert first[0]["text"] == "Describe the texture in the photo concisely, less than 20 words."
    url = first[1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    import io

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (32, 32)
    grid = _Fake.requests[-1]["body"]["messages"][0]["content"][1]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(grid.split(",", 1)[1]))).size == (672, 672)
    # resumable: a second call asks nothing
    n = len(_Fake.requests)
    lc.generate_captions(data.source, data.items, data.paths, zs, tiny.classes,
                         tmp_path / "caps.jsonl", client, groups_per_class=2)
    assert len(_Fake.requests) == n
    # and the file feeds training
    caps = lc.read_captions([out])
    assert len(caps.image) == data.n and set(caps.group_by_class) == {"cat", "dog"}


def test_generator_client_errors(fake_server):
    c = lc.VisionChatClient("http://127.0.0.1:9/v1", "m", retries=0, timeout=2)
    with pytest.raises(RuntimeError, match="no answer"):
        c.describe([], "hi")
    _Fake.fail_first = 5
    c = lc.VisionChatClient(fake_server, "m", retries=1, sleep=lambda s: None)
    with pytest.raises(RuntimeError):
        c.describe([], "hi")


def test_group_grid_layout():
    from PIL import Image

    imgs = [Image.new("RGB", (100, 50), (255, 0, 0))] * 4
    g = lc.group_grid(imgs)
    assert g.size == (672, 672)
    assert g.getpixel((5, 5)) == (0, 0, 0)  # gap
    assert g.getpixel((20 + 316 // 2, 20 + 316 // 2)) == (255, 0, 0)  # cell centre
    assert g.getpixel((20 + 316 // 2, 25)) == (0, 0, 0)  # letterbox: aspect kept


# --------------------------------------------------------------------------- training
def _captions(tiny, data):
    return lc.Captions({p: f"a picture number {i}" for i, p in enumerate(data.paths[:12])},
                       {"cat": ["furry animals"], "ship": ["boats at sea", "grey hulls"]}, {})


@pytest.mark.parametrize("bug", [False, True])
def test_latteclip_loss_falls_and_prototypes_move(tiny, tmp_path, bug):
    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.2, seed=0)
    # select="last": the saved prototypes are the trained ones (epoch 0, the zero-shot
    # prototypes, may win the label-free selection on this random tiny model)
    cfg = lc.LatteCLIPConfig(epochs=5, batch_size=8, lr=3e-4, warmup_steps=2,
                             reproduce_wcls_bug=bug, seed=0, select="last")
    s = lc.tune(tiny.encoder, data, tiny.classes, tmp_path / "run", captions=_captions(tiny, data),
                config=cfg, quiet=True)
    losses = [h["loss"] for h in s["history"] if h["epoch"] >= 1]  # 0: the initial model
    assert losses[-1] < losses[0] - 0.05, losses
    assert s["captions"] == 12 and s["group_caption_classes"] == 2
    assert s["selection"].startswith("heldout_agreement")
    model = load_run(tmp_path / "run")[1]
    P0 = lc.zero_shot_labels(tiny.encoder, data.emb, tiny.classes, cfg.template)[0]
    Pt = model["head"]["weight"]
    assert not torch.allclose(Pt, P0, atol=1e-4)  # moved by the EMA rule
    torch.testing.assert_close(Pt.norm(dim=1), torch.ones(3))
    assert model["head"]["scale"] == 100.0 and model["head"]["normalize"]


def test_wcls_bug_changes_only_zero_shot_targets(tiny):
    """Same batch, bug on/off: t_ft identical; t_zs differs exactly where ŷ_ft != ŷ_zs."""
    data = load_tune_data(tiny.store, tiny.classes, heldout_fraction=0.0)
    torch.manual_seed(0)
    towers = lc._OpenCLIPTowers(tiny.encoder, [f"a photo of a {c}." for c in tiny.classes]
                                + ["a caption", "a group"])
    cls = lc.zero_shot_labels(tiny.encoder, data.emb, tiny.classes, "a photo of a {}.")[0]
    zs = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch = {"image": x, "index": torch.arange(6), "cap": torch.tensor([3, -1, 3, 3, -1, 3]),
             "grp": torch.tensor([4, 4, -1, 4, 4, -1])}
    outs = []
    for bug in (False, True):
        m = lc.LatteCLIPModule(towers, cls, zs, lc.LatteCLIPConfig(reproduce_wcls_bug=bug))
        with torch.no_grad():
            m(batch)
        outs.append(m.last)
    (zf0, yf0, zz0, _), (zf1, yf1, zz1, _) = outs
    assert torch.equal(yf0, yf1) and torch.equal(zf0, zf1)
    same = yf0 == zs
    torch.testing.assert_close(zz0[same], zz1[same])
    assert (~same).any() and not torch.allclose(zz0[~same], zz1[~same])
