"""Benchmark ops.prompt_attention and a prompted-ViT deep-mode training step.

Attention (forward, and forward+backward of all five inputs), at ViT-B/32
training shapes: B images of L = 50 tokens, H = 12 heads, d = 64, P prompts
(P in {16, 50}), shared by the batch. Candidates, same inputs, same process:

  reference            the op's torch backend: expand + cat the prompt K/V, then
                       scaled_dot_product_attention (default SDPA dispatch)
  triton               nolabels.ops.prompt_attention(backend="triton"): fused, prompts
                       read at batch stride 0, prompt gradients reduced in-kernel
  sdpa_<backend>       expand + cat + SDPA pinned to one SDPA backend (flash,
                       efficient, cudnn, math); same work as ours, cat included
  sdpa_<backend>_precat  SDPA alone on K/V concatenated beforehand (not timed): a
                       lower bound for any cat-based method; its "prompt gradient" is
                       the un-reduced (B, P, H, d) slice, so it does less work than ours
  xformers             xformers.ops.memory_efficient_attention on the concatenated
                       K/V (cat included), when xformers is installed
  compiled_reference   torch.compile of the reference (inductor)

Model step: a random-init prompted ViT-B/32 (open_clip VisionTransformer, width
768, 12 layers, 224 px) in deep mode, one training step (forward, cross-entropy
through a linear head, backward, AdamW on the trainable parameters; bf16
autocast on CUDA): deep_impl="naive" (prompts concatenated as tokens before
every block, sliced off after) vs "fused" with the op's triton and torch backends.

Usage:
  python benchmarks/bench_attention.py                  # CPU: tiny sizes, numbers only
  python benchmarks/bench_attention.py --device cuda    # GPU sizes (also: --gpu)
  python benchmarks/bench_attention.py --device cuda --batch 512 --prompts 16 50 --dtype bfloat16
Reports median time, speed-up over the reference, achieved TFLOP/s and GB/s
(minimum traffic) against the measured matmul / copy ceilings, and peak memory.
JSON goes to benchmarks/results/attention-<device>-<date>.json (or --out), and is
rewritten after every section, so a run cut short still leaves its numbers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common
import nolabels
from nolabels.ops.attention import BACKEND_IMPLS, prompt_attention
from nolabels.reference.attention import concat_prompt_kv, prompt_attention_reference

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings(device: str, dtype: torch.dtype) -> dict:
    """Machine ceilings in this process: dense matmul TFLOP/s (dtype) and copy GB/s."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = common.median_time(lambda: a @ b, device, 10 if device == "cuda" else 3)
    x = torch.empty(256 * 2**20 if device == "cuda" else 32 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    tc = common.median_time(lambda: y.copy_(x), device, 10 if device == "cuda" else 3)
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbps": 2 * x.numel() / tc / 1e9,
            "matmul_n": n, "copy_bytes": x.numel()}


# ----------------------------------------------------------------------------- attention
def make_inputs(b, n, h, d, p, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(b, n, h, d, generator=g).to(dtype).to(device) for _ in range(4))
    pk, pv = (torch.randn(p, h, d, generator=g).to(dtype).to(device) for _ in range(2))
    return [q, k, v, pk, pv], dout


def _sdpa_cat(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def f(q, k, v, pk, pv):
        with sdpa_kernel([backend]):
            return prompt_attention_reference(q, k, v, pk, pv)

    return f


def _sdpa_precat(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def f(q, kk, vv):
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
            return o.transpose(1, 2)

    return f


def _xformers_cat():
    import xformers.ops as xops

    def f(q, k, v, pk, pv):
        kk, vv = concat_prompt_kv(k, v, pk, pv)
        return xops.memory_efficient_attention(q, kk, vv)

    return f


def attention_candidates(device: str, dtype: torch.dtype, head_dim: int, compile_ref: bool) -> dict:
    """name -> (fn(q, k, v, pk, pv) -> out, precat: bool). Only candidates that can run here."""
    out = {"reference": (lambda *a: prompt_attention(*a, backend="torch"), False)}
    call = {"device": torch.device(device), "dtype": dtype, "head_dim": head_dim}
    for impl in BACKEND_IMPLS:
        if impl.name != "torch" and not impl.not_supported_reasons(call):
            out[impl.name] = (lambda *a, name=impl.name: prompt_attention(*a, backend=name), False)
    for b in SDPA_BACKENDS:
        out[f"sdpa_{b.split('_')[0].lower()}"] = (_sdpa_cat(b), False)
        out[f"sdpa_{b.split('_')[0].lower()}_precat"] = (_sdpa_precat(b), True)
    try:
        out["xformers"] = (_xformers_cat(), False)
    except ImportError:
        pass
    if compile_ref:
        out["compiled_reference"] = (torch.compile(prompt_attention_reference, dynamic=False), False)
    return out


def attention_flops_bytes(b, n, h, d, p, elt, mode):
    fwd = 4.0 * b * h * n * (n + p) * d
    tok, prm = b * n * h * d * elt, p * h * d * elt
    lse = b * h * n * 4
    if mode == "fwd":
        return fwd, 4 * tok + 2 * prm + lse  # read q k v prompts, write out (+ lse)
    # backward: 2.5x the forward's matmul work; read q k v o dO prompts lse, write dq dk dv dprompts
    return 3.5 * fwd, (4 * tok + 2 * prm + lse) + (5 * tok + 2 * prm + lse) + (3 * tok + 2 * prm)


def run_attention(args, device, dtype, ceil, deadline, emit) -> list[dict]:
    rows = []
    b, n, h, d = args.batch, args.tokens, args.heads, args.head_dim
    for p in args.prompts:
        inputs, dout = make_inputs(b, n, h, d, p, dtype, device)
        cands = attention_candidates(device, dtype, d, args.compile)
        with torch.no_grad():
            ref_out = prompt_attention_reference(*inputs, compute_dtype=torch.float32).float()
        for mode in ("fwd", "fwd+bwd"):
            flops, nbytes = attention_flops_bytes(b, n, h, d, p, inputs[0].element_size(), mode)
            t_ref = None
            for name, (fn, precat) in cands.items():
                row = {"section": "attention", "mode": mode, "candidate": name, "B": b, "L": n, "H": h,
                       "d": d, "P": p, "dtype": str(dtype).replace("torch.", "")}
                if name == "compiled_reference" and time.monotonic() > deadline:
                    row["skipped"] = "time budget"
                    rows.append(row)
                    continue
                if precat:
                    kk, vv = concat_prompt_kv(inputs[1], inputs[2], inputs[3], inputs[4])
                    args_ = [inputs[0], kk, vv]
                else:
                    args_ = inputs
                leaves = [t.detach().requires_grad_(mode != "fwd") for t in args_]
                if mode == "fwd":
                    def call(fn=fn, leaves=leaves):
                        with torch.no_grad():
                            return fn(*leaves)
                else:
                    def call(fn=fn, leaves=leaves, dout=dout):
                        o = fn(*leaves)
                        return torch.autograd.grad(o, leaves, dout)
                try:
                    got = call() if mode == "fwd" else None
                    t = common.median_time(call, device, args.repeat, warmup=2)
                except Exception as e:  # noqa: BLE001 - e.g. an SDPA backend that cannot take the shape
                    row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    print(f"{mode:8s} P={p:3d} {name:22s} skipped ({row['skipped'][:60]})", flush=True)
                    continue
                if got is not None:
                    row["max_abs_diff_vs_fp32"] = (got.float() - ref_out).abs().max().item()
                if name == "reference":
                    t_ref = t
                row.update(median_s=t, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9,
                           pct_matmul_ceiling=100 * flops / t / 1e12 / ceil["matmul_tflops"],
                           pct_copy_ceiling=100 * nbytes / t / 1e9 / ceil["copy_gbps"])
                if t_ref:
                    row["speedup_vs_reference"] = t_ref / t
                if device == "cuda" and not args.no_memory:
                    row["peak_extra_MB"] = common.cuda_peak_bytes(call) / 2**20
                rows.append(row)
                print(f"{mode:8s} P={p:3d} {name:22s} {t * 1e3:9.3f} ms  {row['tflops']:7.2f} TFLOP/s"
                      f"  x{row.get('speedup_vs_reference', 1):.2f}", flush=True)
            emit(rows)
    return rows


# ----------------------------------------------------------------------------- model step
def build_vit(device, small: bool):
    from open_clip.transformer import VisionTransformer

    if small:
        cfg = {"image_size": 64, "patch_size": 16, "width": 192, "layers": 4, "heads": 3, "output_dim": 128}
    else:  # ViT-B/32
        cfg = {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12, "output_dim": 512}
    torch.manual_seed(0)
    return VisionTransformer(mlp_ratio=4.0, **cfg).to(device), cfg


def make_train_step(device, small, p, impl, backend, batch, n_classes=100):
    """One LaFTer/NoLA-style training step of a deep-prompted ViT: forward, label-smoothed CE
    through a linear head, backward, AdamW on the trainable parameters."""
    from nolabels.models import PromptedVisionTransformer

    visual, cfg = build_vit(device, small)
    model = PromptedVisionTransformer(visual, p, "deep", deep_impl=impl, attention_backend=backend)
    head = torch.nn.Linear(cfg["output_dim"], n_classes, bias=False).to(device)
    opt = torch.optim.AdamW(model.trainable_parameters() + list(head.parameters()), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=g).to(device)
    y = torch.randint(0, n_classes, (batch,), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = F.cross_entropy(head(model(x)), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def run_model_step(args, device, deadline, emit) -> list[dict]:
    rows = []
    small = args.model == "small"
    for p in args.prompts:
        variants = [("naive", "auto"), ("fused", "torch")]
        if device == "cuda":
            variants.insert(1, ("fused", "triton"))
        t_naive = None
        for impl, backend in variants:
            name = f"{impl}" if impl == "naive" else f"fused_{backend}"
            row = {"section": "model_step", "candidate": name, "P": p, "B": args.model_batch,
                   "model": "ViT-B/32" if not small else "small-ViT", "autocast": "bf16" if device == "cuda" else "off"}
            if time.monotonic() > deadline:
                row["skipped"] = "time budget"
                rows.append(row)
                continue
            step = make_train_step(device, small, p, impl, backend, args.model_batch)
            try:
                t = common.median_time(step, device, args.model_repeat, warmup=2)
            except Exception as e:  # noqa: BLE001
                row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(f"step P={p:3d} {name:14s} skipped ({row['skipped'][:60]})", flush=True)
                continue
            if impl == "naive":
                t_naive = t
            row.update(median_s=t, images_per_s=args.model_batch / t)
            if t_naive:
                row["speedup_vs_naive"] = t_naive / t
            if device == "cuda" and not args.no_memory:
                row["peak_extra_MB"] = common.cuda_peak_bytes(step) / 2**20
            rows.append(row)
            print(f"step P={p:3d} {name:14s} {t * 1e3:9.2f} ms  x{row.get('speedup_vs_naive', 1):.2f} vs naive",
                  flush=True)
            del step
            emit(rows)
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--gpu", action="store_true", help="same as --device cuda (GPU sizes)")
    ap.add_argument("--batch", type=int, default=None, help="attention B (default 512 GPU, 8 CPU)")
    ap.add_argument("--tokens", type=int, default=50, help="image tokens L (ViT-B/32: 50)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 50])
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (median); default 20 GPU, 5 CPU")
    ap.add_argument("--model", default=None, choices=["vit-b-32", "small", "none"],
                    help="model step: default vit-b-32 on GPU, small on CPU")
    ap.add_argument("--model-batch", type=int, default=None, help="default 512 GPU, 4 CPU")
    ap.add_argument("--model-repeat", type=int, default=None, help="default 5 GPU, 3 CPU")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip torch.compile and later model steps once this many seconds have passed "
                         "(default 120 GPU, 600 CPU)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/attention-<device>-<date>.json)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if args.gpu else "cpu")
    gpu = device == "cuda"
    args.batch = args.batch or (512 if gpu else 8)
    args.repeat = args.repeat or (20 if gpu else 5)
    args.model = args.model or ("vit-b-32" if gpu else "small")
    args.model_batch = args.model_batch or (512 if gpu else 4)
    args.model_repeat = args.model_repeat or (5 if gpu else 3)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    start = time.monotonic()
    deadline = start + (args.budget_s or (120 if gpu else 600))

    ceil = measure_ceilings(device, dtype)
    print(f"ceilings: {ceil['matmul_tflops']:.2f} TFLOP/s matmul ({dtype}), {ceil['copy_gbps']:.1f} GB/s copy")
    payload = {
        "benchmark": "attention",
        "device": device,
        "args": {k: v for k, v in vars(args).items()},
        "machine": common.machine(),
        "ceilings": ceil,
        "attention": [],
        "model_step": [],
    }
    if hasattr(nolabels, "info_dict"):
        payload["library"] = nolabels.info_dict().get("library")

    def emit(section):
        def _write(rows):
            payload[section] = rows
            payload["elapsed_s"] = time.monotonic() - start
            return common.write_json("attention", device, payload, args.out)
        return _write

    run_attention(args, device, dtype, ceil, deadline, emit("attention"))
    if args.model != "none":
        try:
            import open_clip  # noqa: F401
        except ImportError:
            payload["model_step"] = [{"skipped": "open_clip is not installed"}]
        else:
            args.model = "small" if args.model == "small" else "vit-b-32"
            run_model_step(args, device, deadline + 60, emit("model_step"))
    path = emit("model_step")(payload["model_step"])
    att_cols = ["mode", "P", "candidate", "median_s", "speedup_vs_reference", "tflops", "gbps",
                "pct_matmul_ceiling", "peak_extra_MB", "skipped"]
    short = lambda rows: [{**r, "skipped": r.get("skipped", "")[:48] or None} for r in rows]
    print(common.markdown_table(short(payload["attention"]), att_cols))
    print(common.markdown_table(short(payload["model_step"]),
                                ["P", "candidate", "median_s", "images_per_s", "speedup_vs_naive",
                                 "peak_extra_MB", "skipped"]))
    print(f"wrote {path} in {time.monotonic() - start:.0f} s")
    return payload


if __name__ == "__main__":
    main()
