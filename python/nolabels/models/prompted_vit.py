"""Visual prompt tuning of an open_clip ``VisionTransformer`` (LaFTer / NoLA).

``PromptedVisionTransformer(visual, num_prompts, mode)``:

* ``mode="shallow"`` (LaFTer and NoLA exactly, methods.md §1.2): one prompt set
  (1, P, width), inserted once, after ``ln_pre`` and right after the CLS
  token, with no positional embedding: ``[CLS, p_1..p_P, patch_1..patch_N]``.
  The tokens then run through the wrapped model's own transformer.
* ``mode="deep"``: one prompt set per layer (layers, P, width). In layer i the
  prompts enter only as keys and values: K/V = in_proj(ln_1(prompts_i)),
  computed once per layer (not once per image) and shared by the batch through
  ``nolabels.ops.prompt_attention``. No prompt queries, no attention output and
  no MLP work for prompts. This is exactly VPT-deep (prompts inserted as
  tokens at every layer and their outputs discarded), without the wasted work:
  ``deep_impl="naive"`` runs that cat-and-slice version through the wrapped
  model's unmodified blocks, for comparison.

``forward(images)`` returns the un-normalised projected CLS feature, like
LaFTer/NoLA (``ln_post`` on the pooled token, then ``@ proj``).
``trainable_parameters()`` is the prompts plus every visual LayerNorm
(methods.md §1.3); everything else is frozen.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nolabels.backends import BackendName
from nolabels.errors import InputError
from nolabels.ops.attention import prompt_attention

# LaFTer/NoLA: Uniform(-v, v), v = sqrt(6 / (3 * 16 * 16 + 768)) = 0.0625 (patch
# size 16x16 and width 768 hard-coded in both repos, even for ViT-B/32).
PROMPT_INIT_BOUND = math.sqrt(6.0 / (3 * 16 * 16 + 768))


def _check_visual(visual: Any) -> None:  # open_clip modules: duck-typed attributes
    need = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    missing = [a for a in need if not hasattr(visual, a)]
    if missing or not hasattr(visual.transformer, "resblocks"):
        raise InputError(
            "PromptedVisionTransformer: visual must be an open_clip VisionTransformer "
            f"(model.visual); missing {missing or ['transformer.resblocks']}"
        )


def _check_deep_block(i: int, blk: Any) -> None:
    attn = getattr(blk, "attn", None)
    ok = (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and all(hasattr(blk, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        and not hasattr(blk, "ln_1_kv")
    )
    if not ok:
        raise InputError(
            f"PromptedVisionTransformer: mode='deep' needs open_clip ResidualAttentionBlocks "
            f"(nn.MultiheadAttention self-attention); block {i} is {type(blk).__name__}"
        )
    if getattr(attn, "dropout", 0.0) != 0.0:
        raise InputError(f"PromptedVisionTransformer: mode='deep' needs attention dropout 0 (block {i})")


class PromptedVisionTransformer(nn.Module):
    """An open_clip vision tower with learnable visual prompts.

    Args:
        visual: an open_clip ``VisionTransformer`` (``model.visual``). It is
            wrapped, not copied: with ``freeze=True`` its parameters' ``requires_grad``
            is set in place.
        num_prompts: P >= 0 (LaFTer 50, NoLA 16).
        mode: "shallow" or "deep" (see the module docstring).
        init_bound: prompts ~ Uniform(-init_bound, init_bound); default
            :data:`PROMPT_INIT_BOUND` = 0.0625.
        deep_impl: "fused" (``ops.prompt_attention``, the default) or "naive"
            (concatenate the prompts as tokens before every block, run the
            wrapped block, slice them off).
        attention_backend: ``backend`` of ``ops.prompt_attention`` in deep mode.
        freeze: freeze everything but :meth:`trainable_parameters`.
        generator: optional ``torch.Generator`` for the prompt initialisation.

    Shapes: images (B, 3, H, W) -> features (B, output_dim), un-normalised.
    """

    def __init__(
        self,
        visual: nn.Module,
        num_prompts: int,
        mode: str = "shallow",  # "shallow" | "deep" (validated)
        *,
        init_bound: float | None = None,
        deep_impl: Literal["fused", "naive"] = "fused",
        attention_backend: BackendName = "auto",
        freeze: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        vis: Any = visual  # open_clip's attributes (transformer, conv1, ...) are duck-typed
        _check_visual(vis)
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 0:
            raise InputError(f"PromptedVisionTransformer: num_prompts must be an int >= 0, got {num_prompts!r}")
        if mode not in ("shallow", "deep"):
            raise InputError(f"PromptedVisionTransformer: mode must be 'shallow' or 'deep', got {mode!r}")
        if deep_impl not in ("fused", "naive"):
            raise InputError(f"PromptedVisionTransformer: deep_impl must be 'fused' or 'naive', got {deep_impl!r}")
        blocks = vis.transformer.resblocks
        if mode == "deep":
            for i, blk in enumerate(blocks):
                _check_deep_block(i, blk)
        self.visual: Any = vis
        self.num_prompts = num_prompts
        self.mode = mode
        self.deep_impl = deep_impl
        self.attention_backend = attention_backend
        self.width = vis.class_embedding.shape[-1]
        self.layers = len(blocks)
        ref = vis.class_embedding
        n_sets = 1 if mode == "shallow" else self.layers
        self.prompts = nn.Parameter(
            torch.empty(n_sets, num_prompts, self.width, device=ref.device, dtype=ref.dtype)
        )
        bound = PROMPT_INIT_BOUND if init_bound is None else float(init_bound)
        with torch.no_grad():
            nn.init.uniform_(self.prompts, -bound, bound, generator=generator)
        self._trainable = {"prompts"} | {
            f"visual.{mname}.{pname}"
            for mname, mod in visual.named_modules()
            if isinstance(mod, nn.LayerNorm)
            for pname, _ in mod.named_parameters(recurse=False)
        }
        if freeze:
            for name, p in self.named_parameters():
                p.requires_grad_(name in self._trainable)

    # ------------------------------------------------------------------ parameters
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the prompts and every visual LayerNorm weight and bias."""
        for name, p in self.named_parameters():
            if name in self._trainable:
                yield name, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The prompts and every visual LayerNorm weight and bias (methods.md §1.3)."""
        return [p for _, p in self.named_trainable_parameters()]

    # ------------------------------------------------------------------ forward
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """conv1 -> CLS + patches -> + positional embedding -> patch dropout -> ln_pre."""
        v = self.visual
        if hasattr(v, "_embeds"):
            return v._embeds(images)
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if hasattr(v, "_pool"):
            pooled, _ = v._pool(x)
        else:
            x = v.ln_post(x)
            pooled = x[:, 1:].mean(dim=1) if getattr(v, "pool_type", "tok") == "avg" else x[:, 0]
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled

    def _insert(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """[CLS, prompts, rest]: prompts (P, W) expanded over the batch."""
        p = prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], p, x[:, 1:]], dim=1)

    def _remove(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], x[:, 1 + self.num_prompts:]], dim=1)

    def _run_block(self, blk: Any, x: torch.Tensor) -> torch.Tensor:
        # the wrapped block, in the layout its transformer uses
        if getattr(self.visual.transformer, "batch_first", True):
            return blk(x)
        return blk(x.transpose(0, 1)).transpose(0, 1)

    def _deep_block_fused(self, blk: Any, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        attn = blk.attn
        b, n, w = x.shape
        heads = attn.num_heads
        d = w // heads
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, d)
        q, k, v = qkv.unbind(2)
        pk = pv = None
        if self.num_prompts:
            # prompt keys/values once per layer, shared by the whole batch
            bias = None if attn.in_proj_bias is None else attn.in_proj_bias[w:]
            pkv = F.linear(blk.ln_1(prompts.to(x.dtype)), attn.in_proj_weight[w:], bias)
            pk, pv = pkv.view(self.num_prompts, 2, heads, d).unbind(1)
        o = prompt_attention(q, k, v, pk, pv, backend=self.attention_backend)
        x = x + blk.ls_1(attn.out_proj(o.reshape(b, n, w)))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _deep_block_naive(self, blk: Any, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        if not self.num_prompts:
            return self._run_block(blk, x)
        return self._remove(self._run_block(blk, self._insert(x, prompts)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._embed(images)
        if self.mode == "shallow":
            if self.num_prompts:
                x = self._insert(x, self.prompts[0])
            x = self.visual.transformer(x)
            if self.num_prompts:
                x = self._remove(x)
        else:
            block_fn = self._deep_block_fused if self.deep_impl == "fused" else self._deep_block_naive
            ckpt = getattr(self.visual.transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
            for i, blk in enumerate(self.visual.transformer.resblocks):
                if ckpt:
                    x = checkpoint(block_fn, blk, x, self.prompts[i], use_reentrant=False)
                else:
                    x = block_fn(blk, x, self.prompts[i])
        return self._pool(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_prompts={self.num_prompts}, width={self.width}, layers={self.layers}"
