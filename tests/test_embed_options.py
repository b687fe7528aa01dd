"""``embed``'s device options: autocast choice, and bf16 autocast giving the same store
(up to bf16 rounding) as float32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _pipeline_helpers import make_folder, tiny_config, tiny_spec
from nolabels.errors import InputError
from nolabels.pipeline.embed import embed, embed_amp_dtype


def test_amp_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert embed_amp_dtype("auto", cpu) is None  # no autocast on the CPU by default
    assert embed_amp_dtype("off", cuda) is None
    assert embed_amp_dtype("fp16", cpu) is torch.float16
    assert embed_amp_dtype("bf16", cuda) is torch.bfloat16


def test_bf16_autocast_embeds_close_to_float32(tmp_path):
    pytest.importorskip("open_clip")
    from nolabels.data import EmbeddingStore

    spec = tiny_spec(tiny_config(tmp_path))
    imgs = make_folder(tmp_path / "imgs", per_class=3)
    kw = dict(workers=0, device="cpu", quiet=True, batch_size=4)
    embed(imgs, spec, tmp_path / "f32", amp="off", **kw)
    embed(imgs, spec, tmp_path / "bf16", amp="bf16", **kw)
    a, _ = EmbeddingStore(tmp_path / "f32").load()
    b, _ = EmbeddingStore(tmp_path / "bf16").load()
    cos = (a.astype(np.float32) * b.astype(np.float32)).sum(1)
    assert cos.min() > 0.98 and not np.array_equal(a, b)  # autocast really ran
    with pytest.raises(InputError, match="amp"):
        embed(imgs, spec, tmp_path / "x", amp="fp8", **kw)
