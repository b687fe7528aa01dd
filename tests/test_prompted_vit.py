"""PromptedVisionTransformer on a tiny random-init open_clip ViT (width 64, 2 layers, 2 heads, patch 8, image 32).

Every comparison is against an independent re-implementation written here with
torch.cat / scaled_dot_product_attention and slicing, forward and gradients.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from nolabels.backends import triton_status  # noqa: E402
from nolabels.models import PromptedVisionTransformer  # noqa: E402
from nolabels.models.prompted_vit import PROMPT_INIT_BOUND  # noqa: E402

WIDTH, LAYERS, HEADS, PATCH, IMAGE, OUT_DIM = 64, 2, 2, 8, 32, 24

needs_interp = pytest.mark.skipif(
    triton_status() is not None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="triton interpreter not enabled",
)


def tiny_clip(seed: int = 0):
    """A tiny open_clip CLIP, random init; LayerNorms randomised so their gradients mean something."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=OUT_DIM,
        vision_cfg=CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS,
                                 patch_size=PATCH, image_size=IMAGE),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1),
    )
    with torch.no_grad():
        for m in model.visual.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
            if isinstance(m, torch.nn.MultiheadAttention):
                m.in_proj_bias.normal_(0, 0.1)
    return model.eval()


def images(gen, b=3):
    return torch.randn(b, 3, IMAGE, IMAGE, generator=gen)


def _embed_plain(v, x):
    x = v.conv1(x).flatten(2).transpose(1, 2)
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    return v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)


def shallow_by_cat(v, prompts, x):
    """LaFTer/NoLA: [CLS, prompts, patches] after ln_pre; ln_post(CLS) @ proj."""
    x = _embed_plain(v, x)
    p = prompts.expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
    for blk in v.transformer.resblocks:
        x = blk(x)
    return v.ln_post(x[:, 0]) @ v.proj


def deep_by_cat_sdpa(v, prompts, x):
    """VPT-deep written out: before each block cat that layer's prompts as tokens, run the
    block with SDPA, slice the prompts off again."""
    x = _embed_plain(v, x)
    b = x.shape[0]
    n_p = prompts.shape[1]
    for i, blk in enumerate(v.transformer.resblocks):
        xp = torch.cat([x[:, :1], prompts[i].expand(b, -1, -1), x[:, 1:]], dim=1)
        n = xp.shape[1]
        qkv = F.linear(blk.ln_1(xp), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        q, k, val = qkv.view(b, n, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, val).transpose(1, 2).reshape(b, n, WIDTH)
        xp = xp + blk.attn.out_proj(o)
        xp = xp + blk.mlp(blk.ln_2(xp))
        x = torch.cat([xp[:, :1], xp[:, 1 + n_p:]], dim=1)
    return v.ln_post(x[:, 0]) @ v.proj


def grads(model, out, cot):
    names, params = zip(*model.named_trainable_parameters())
    return dict(zip(names, torch.autograd.grad(out, params, cot)))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["shallow", "deep"])
def test_zero_prompts_equals_encode_image(gen, mode):
    clip = tiny_clip()
    model = PromptedVisionTransformer(clip.visual, 0, mode)
    x = images(gen)
    with torch.no_grad():
        want = clip.encode_image(x)
        got = model(x)
    assert got.shape == (3, OUT_DIM)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shallow_equals_cat_reimplementation(gen):
    clip = tiny_clip()
    model = PromptedVisionTransformer(clip.visual, 5, "shallow", generator=gen)
    assert model.prompts.shape == (1, 5, WIDTH)
    x = images(gen)
    cot = torch.randn(3, OUT_DIM, generator=gen)
    got = model(x)
    want = shallow_by_cat(clip.visual, model.prompts[0], x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_got = grads(model, got, cot)
    g_want = grads(model, want, cot)
    for name in g_got:
        torch.testing.assert_close(g_got[name], g_want[name], atol=1e-5, rtol=1e-4, msg=name)
    assert g_got["prompts"].abs().sum() > 0


@pytest.mark.parametrize(
    "impl,backend",
    [("fused", "torch"), ("naive", "auto"), pytest.param("fused", "triton", marks=needs_interp)],
)
def test_deep_equals_cat_sdpa_and_slicing(gen, impl, backend):
    clip = tiny_clip()
    model = PromptedVisionTransformer(clip.visual, 7, "deep", deep_impl=impl,
                                      attention_backend=backend, generator=gen)
    assert model.prompts.shape == (LAYERS, 7, WIDTH)
    x = images(gen, 2)
    cot = torch.randn(2, OUT_DIM, generator=gen)
    got = model(x)
    want = deep_by_cat_sdpa(clip.visual, model.prompts, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_got = grads(model, got, cot)
    g_want = grads(model, want, cot)
    for name in g_got:
        torch.testing.assert_close(g_got[name], g_want[name], atol=1e-5, rtol=1e-4, msg=name)
    assert g_got["prompts"][0].abs().sum() > 0 and g_got["prompts"][1].abs().sum() > 0


def test_deep_grad_checkpointing_and_bf16_autocast(gen):
    clip = tiny_clip()
    model = PromptedVisionTransformer(clip.visual, 4, "deep", generator=gen)
    x = images(gen, 2)
    ref = model(x)
    clip.visual.set_grad_checkpointing(True)
    try:
        torch.testing.assert_close(model(x), ref)
    finally:
        clip.visual.set_grad_checkpointing(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x)
        model.deep_impl = "naive"
        naive = model(x)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), naive.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(fused.float(), ref, atol=0.15, rtol=0.1)


@pytest.mark.parametrize("mode", ["shallow", "deep"])
def test_only_declared_parameters_get_gradients(gen, mode):
    clip = tiny_clip()
    model = PromptedVisionTransformer(clip.visual, 3, mode)
    names = {n for n, _ in model.named_trainable_parameters()}
    # prompts + (ln_pre, ln_1/ln_2 of every block, ln_post) x (weight, bias)
    assert len(names) == 1 + 2 * (2 + 2 * LAYERS)
    assert all(n == "prompts" or ".ln_" in n for n in names)
    assert len(model.trainable_parameters()) == len(names)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in names), n
    model(images(gen)).square().sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == names
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in names)


def test_prompt_init_and_bad_arguments(gen):
    assert abs(PROMPT_INIT_BOUND - 0.0625) < 1e-12
    clip = tiny_clip()
    model = PromptedVisionTransformer(clip.visual, 50, "shallow", generator=gen)
    p = model.prompts.detach()
    assert p.abs().max() <= PROMPT_INIT_BOUND and p.abs().max() > 0.9 * PROMPT_INIT_BOUND
    assert abs(p.mean().item()) < 0.005
    with pytest.raises(ValueError, match="mode"):
        PromptedVisionTransformer(clip.visual, 4, "middle")
    with pytest.raises(ValueError, match="num_prompts"):
        PromptedVisionTransformer(clip.visual, -1)
    with pytest.raises(ValueError, match="VisionTransformer"):
        PromptedVisionTransformer(torch.nn.Linear(3, 3), 4)
    with pytest.raises(ValueError, match="deep_impl"):
        PromptedVisionTransformer(clip.visual, 4, "deep", deep_impl="fast")
    from open_clip.transformer import VisionTransformer

    custom = VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=1, heads=HEADS,
                               mlp_ratio=4.0, qk_norm=True, output_dim=OUT_DIM)
    with pytest.raises(ValueError, match="ResidualAttentionBlock"):
        PromptedVisionTransformer(custom, 4, "deep")
    PromptedVisionTransformer(custom, 4, "shallow")  # shallow only needs the wrapped transformer


@pytest.mark.gpu
def test_gpu_deep_fused_triton_matches_cat_sdpa(gen):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("set NOLABELS_TEST_GPU=1 to compile Triton for the GPU")
    clip = tiny_clip().cuda()
    model = PromptedVisionTransformer(clip.visual, 16, "deep", attention_backend="triton", generator=gen)
    x = images(gen, 8).cuda()
    cot = torch.randn(8, OUT_DIM, generator=gen).cuda()
    got = model(x)
    want = deep_by_cat_sdpa(clip.visual, model.prompts, x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    g_got, g_want = grads(model, got, cot), grads(model, want, cot)
    for name in g_got:
        torch.testing.assert_close(g_got[name], g_want[name], atol=1e-4, rtol=1e-3, msg=name)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(x)
        model.deep_impl = "naive"
        naive = model(x)
    torch.testing.assert_close(fused.float(), naive.float(), atol=0.1, rtol=0.05)
