"""Label-free methods on real images: CIFAR-10 with the offline surrogate (**NOT CLIP**).

This is the *library-level* comparison: it calls the methods' internals with hand-picked
settings (cached prefixes, CIFAR templates, descriptions). The *user-level* evidence is
``benchmarks/eval_cli.py``: the same kind of data, but only ``nolabels`` commands (``embed``,
``label``, ``tune``, ``predict``, ``eval``) with the package defaults, on CIFAR-10 and on a
second offline set (scikit-learn's digits); its JSON is ``results/methods-cli-cpu-DATE.json``.

Compares, on a seeded subset of CIFAR-10 (``../shared/data/cifar10``):

* surrogate zero-shot ("a photo of a {}."), and with CLIP's 18 CIFAR templates;
* CDE (18 templates + the package's hand-written CIFAR-10 descriptions, NoLA §3.2);
* LaFTer and NoLA, tuned label-free on unlabeled *train* images;

all scored on *test* images (labels read only to score). Seeds and wall times are
recorded; JSON goes to ``benchmarks/results/methods-cpu-DATE.json``.

What is substituted (no CLIP or DINO weights exist offline; see ../shared/spec/assets.md):

* CLIP -> ``surrogate:effnet-lite0+minilm`` (ConSE: EfficientNet-Lite0 ImageNet
  classifier + MiniLM text embeddings, 384-d). Not CLIP; its label space is
  ImageNet-1k, which overlaps CIFAR-10's classes.
* DINO ViT-B/16 CLS features -> ``surrogate:effnet-lite0`` (the same EfficientNet's
  pooled 1280-d features; supervised ImageNet, not self-supervised DINO).
* Prompts + visual LayerNorms -> the affine parameters of the surrogate's last
  BatchNorm layers (``--surrogate-norms block``: the last inverted-residual block's
  3 BatchNorms + the head's ``bn2``, 7,808 parameters) + the linear classifier: the
  surrogate has no ViT, and back-propagating through the whole tower (all 49
  BatchNorms, the package default) runs at a few images/s on 2 CPU cores.
  Everything below the last block is frozen, so its output (192 x 7 x 7) is computed
  once and cached (float16): the weak view and ``--views`` seeded strong views per
  train image. (``--norms last``, ``bn2`` alone, underfits: NoLA 45.2 % vs 51.6 % at
  seed 0 in our runs.)
  Training draws one of those cached strong views per image and epoch instead of a
  fresh augmentation (LaFTer's strong augmentation is used for both methods).
* The store embeddings (zero-shot, CDE pseudo-labels) and the DINO stand-in
  features are computed from the cached weak-view prefix (same transform and
  weights as ``nolabels embed``; float16 prefix), checked against the encoder.
* Epoch selection is label-free (held-out agreement, see
  ``nolabels.methods.selection``); the held-out oracle curve is reported separately.

Run: ``python benchmarks/eval_methods.py`` (about an hour on 2 busy CPU cores: ~10 minutes
of one-off surrogate forward passes, cached under ``--work``, then 3 seeds of LaFTer and
NoLA).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common as common  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results"


def extract_subset(tar_path: Path, dest: Path, n: int, seed: int) -> Path:
    """Extract a seeded random subset of ``n`` images (keeping class folders)."""
    done = dest / ".done"
    if done.is_file() and done.read_text() == f"{tar_path}:{n}:{seed}":
        return dest
    with tarfile.open(tar_path, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)
        pick = random.Random(seed).sample(members, n) if n < len(members) else members
        for m in pick:
            cls, name = Path(m.name).parts[-2], Path(m.name).name
            out = dest / cls / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(m).read())
    done.write_text(f"{tar_path}:{n}:{seed}")
    return dest


def write_store(root: Path, model_desc: dict, source, emb: np.ndarray):
    from nolabels.data import EmbeddingStore

    st = EmbeddingStore.create_or_resume(root, model=model_desc, source=source.describe(),
                                         shard_size=max(1, len(source)), overwrite=True)
    entry = st.write_shard(0, emb, list(range(len(source))), source.paths, source.labels, [])
    st.commit(entry)
    return st


@torch.no_grad()
def chunks_apply(fn, arr, bs: int = 256) -> torch.Tensor:
    return torch.cat([fn(torch.from_numpy(np.asarray(arr[i:i + bs], np.float32)))
                      for i in range(0, len(arr), bs)])


def tuned_row(method: str, seed: int, acc: float, s: dict, t0: float, tune_s: float,
              **extra) -> dict:
    """One result row of a tuned method (LaFTer/NoLA: held-out agreement selection)."""
    return {"method": method, "seed": seed, "test_accuracy": acc,
            "selected_epoch": s["selected_epoch"], "criterion": "heldout_agreement",
            "criterion_value": s["criterion_value"], **extra,
            "seconds": time.perf_counter() - t0, "tune_seconds": tune_s,
            "oracle_heldout_curve": [h.get("oracle_heldout_accuracy") for h in s["history"]],
            "criterion_curve": [h.get("heldout_agreement") for h in s["history"]]}


def accuracy(pred: torch.Tensor, truth: list[int]) -> float:
    return float((pred.cpu() == torch.tensor(truth)).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=2000, help="unlabeled train images")
    ap.add_argument("--test", type=int, default=1000, help="test images")
    ap.add_argument("--views", type=int, default=2, help="cached strong views per train image")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--lafter-epochs", type=int, default=50)
    ap.add_argument("--nola-epochs", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["zeroshot", "cde", "lafter", "nola"])
    ap.add_argument("--work", default="/tmp/nolabels_eval_methods")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--norms", default="block", choices=("block", "last"),
                    help="surrogate norms tuned (the frozen prefix below them is cached)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from nolabels import ops
    from nolabels.commands.predict import load_predictor
    from nolabels.data import open_source
    from nolabels.methods import lafter, nola
    from nolabels.methods.common import class_index, load_run, load_tune_data
    from nolabels.methods.students import (
        ConSEStudent,
        build_prefix_cache,
        image_stats,
        prefix_cache_key,
        strong_transform,
    )
    from nolabels.methods.trainer import checkpoint_path, load_checkpoint_file
    from nolabels.methods.zeroshot import class_embeddings, read_descriptions
    from nolabels.models import load_encoder

    t_all = time.perf_counter()
    work = Path(args.work)
    torch.manual_seed(0)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    train_dir = extract_subset(DATA / "train.tar.gz", work / "data" / f"train{args.train}",
                               args.train, args.data_seed)
    test_dir = extract_subset(DATA / "test.tar.gz", work / "data" / f"test{args.test}",
                              args.test, args.data_seed + 1)
    src_train, src_test = open_source(str(train_dir)), open_source(str(test_dir))
    classes = sorted({lab for lab in src_train.labels})
    truth_test = class_index(src_test.labels, classes)
    timings["extract_s"] = time.perf_counter() - t

    enc = load_encoder("surrogate:effnet-lite0+minilm", device="cpu")
    dino_enc = load_encoder("surrogate:effnet-lite0", device="cpu")
    size, mean, std = image_stats(enc)
    strong = strong_transform("lafter", size, mean, std)
    cache_student = ConSEStudent(enc, args.norms).eval()
    views = {"weak": enc.transform, **{f"strong{a}": strong for a in range(args.views)}}
    t = time.perf_counter()
    key_tr = prefix_cache_key(cache_student, enc.model_id, src_train.fingerprint(),
                              range(len(src_train)), list(views), 0)
    prefix_train = build_prefix_cache(cache_student, src_train, range(len(src_train)), views,
                                      work / "cache", key=key_tr, workers=args.workers,
                                      log=print, quiet=False)
    key_te = prefix_cache_key(cache_student, enc.model_id, src_test.fingerprint(),
                              range(len(src_test)), ["weak"], 0)
    prefix_test = build_prefix_cache(cache_student, src_test, range(len(src_test)),
                                     {"weak": enc.transform}, work / "cache", key=key_te,
                                     workers=args.workers, log=print, quiet=False)
    timings["prefix_cache_s"] = time.perf_counter() - t
    forwards = len(src_train) * (1 + args.views) + len(src_test)

    # stores derived from the weak-view prefix
    import torch.nn.functional as F

    def conse(x):
        return F.normalize(cache_student.head(x), dim=-1)

    def pooled(x):
        return F.normalize(cache_student.pooled(x), dim=-1)

    stores = {}
    for name, src, pre in (("train", src_train, prefix_train), ("test", src_test, prefix_test)):
        stores[name] = write_store(work / "stores" / f"{name}_conse", enc.describe(), src,
                                   chunks_apply(conse, pre["weak"]).numpy())
        stores[name + "_dino"] = write_store(work / "stores" / f"{name}_dino",
                                             dino_enc.describe(), src,
                                             chunks_apply(pooled, pre["weak"]).numpy())
    # check: the derived store rows equal the encoder's own embeddings (up to float16)
    from nolabels.data import ImageDataset, collate

    b = collate([ImageDataset(src_test, enc.transform)[i] for i in range(8)])
    direct = enc.encode_image(b.images)
    derived = torch.from_numpy(np.asarray(stores["test"].load()[0][:8], np.float32))
    store_check = float((direct - derived).abs().max())
    print(f"derived store vs encoder: max |diff| = {store_check:.4f} (8 test images)")

    desc = read_descriptions("cifar10", classes)
    emb_test = torch.from_numpy(np.asarray(stores["test"].load()[0], np.float32))
    dino_test = torch.from_numpy(np.asarray(stores["test_dino"].load()[0], np.float32))
    rows: list[dict] = []

    def zs_row(name, templates, descriptions):
        t0 = time.perf_counter()
        cls = class_embeddings(enc, classes, templates=templates, descriptions=descriptions)
        pl = ops.pseudo_label(emb_test, cls, logit_scale=enc.logit_scale, topk=1)
        rows.append({"method": name, "seed": None, "test_accuracy": accuracy(pl.labels, truth_test),
                     "seconds": time.perf_counter() - t0, "selected_epoch": None})
        print(f"{name}: {100 * rows[-1]['test_accuracy']:.2f}%")

    if "zeroshot" in args.methods:
        zs_row("zero-shot (1 template)", "simple", None)
        zs_row("zero-shot (18 CIFAR templates)", "cifar", None)
    if "cde" in args.methods:
        zs_row("CDE (18 templates + descriptions)", "cifar", desc)

    def student_test_acc(run: Path) -> float:
        p = load_predictor(run, device="cpu", encoder=enc)
        logits_fn = (lambda x: ops.pseudo_label(p.features(x, cached=True), p.weight,
                                                logit_scale=p.scale, topk=1,
                                                normalize=p.normalize).labels)
        return accuracy(chunks_apply(logits_fn, prefix_test["weak"]), truth_test)

    strong_keys = [f"strong{a}" for a in range(args.views)]
    prefix_for_data = {"weak": prefix_train["weak"], **{k: prefix_train[k] for k in strong_keys}}
    for seed in args.seeds:
        data = load_tune_data(stores["train"].root, classes, heldout_fraction=0.1, seed=seed)
        assert data.items == list(range(len(src_train)))
        if "lafter" in args.methods:
            run = work / "runs" / f"lafter_s{seed}"
            t0 = time.perf_counter()
            s = lafter.tune(enc, data, classes, run, descriptions=desc, prefix=prefix_for_data,
                            config=lafter.LaFTerConfig(templates="cifar", surrogate_norms=args.norms,
                                                       epochs=args.lafter_epochs, seed=seed),
                            quiet=True)
            tune_s = time.perf_counter() - t0
            acc = student_test_acc(run)
            txt = load_checkpoint_file(checkpoint_path(run, "lafter_text", "final"), "final")
            w_pl = txt["state"]["classifier.weight"]
            acc_txt = accuracy((emb_test @ w_pl.T).argmax(1), truth_test)
            rows.append(tuned_row("LaFTer", seed, acc, s, t0, tune_s,
                                  stage1_text_classifier_test_accuracy=acc_txt))
            print(f"LaFTer seed {seed}: {100 * acc:.2f}% (epoch {s['selected_epoch']}; text "
                  f"classifier alone {100 * acc_txt:.2f}%; {tune_s:.0f}s)")
        if "nola" in args.methods:
            run = work / "runs" / f"nola_s{seed}"
            dino = torch.from_numpy(np.asarray(stores["train_dino"].load()[0], np.float32))
            t0 = time.perf_counter()
            s = nola.tune(enc, data, classes, run, dino=dino, descriptions=desc,
                          prefix=prefix_for_data,
                          config=nola.NoLAConfig(templates="cifar", surrogate_norms=args.norms,
                                                 epochs=args.nola_epochs, seed=seed),
                          dino_info={"spec": "surrogate:effnet-lite0 (DINO stand-in)"},
                          quiet=True)
            tune_s = time.perf_counter() - t0
            acc = student_test_acc(run)
            lab = load_run(run)[1]["labeller"]
            mlp = torch.nn.Sequential(torch.nn.Linear(dino_test.shape[1], 256), torch.nn.ReLU(),
                                      torch.nn.Linear(256, len(classes)))
            mlp.load_state_dict(lab)
            with torch.no_grad():
                acc_lab = accuracy(mlp(dino_test).argmax(1), truth_test)
            rows.append(tuned_row("NoLA", seed, acc, s, t0, tune_s, k=s["k"],
                                  subset_size=s["subset_size"],
                                  oracle_subset_accuracy=s.get("oracle_subset_accuracy"),
                                  labeller_test_accuracy=acc_lab))
            print(f"NoLA seed {seed}: {100 * acc:.2f}% (epoch {s['selected_epoch']}; labeller "
                  f"alone {100 * acc_lab:.2f}%; k={s['k']}; {tune_s:.0f}s)")

    # aggregate
    table = []
    for name in dict.fromkeys(r["method"] for r in rows):
        accs = [r["test_accuracy"] for r in rows if r["method"] == name]
        secs = [r["seconds"] for r in rows if r["method"] == name]
        row = {"method": name, "runs": len(accs), "mean": statistics.mean(accs),
               "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "seconds_mean": statistics.mean(secs)}
        for extra in ("labeller_test_accuracy", "stage1_text_classifier_test_accuracy"):
            vals = [r[extra] for r in rows if r["method"] == name and extra in r]
            if vals:
                row[extra] = statistics.mean(vals)
        table.append(row)
    zs = next((r["mean"] for r in table if r["method"].startswith("zero-shot (1")), None)
    best = max(table, key=lambda r: r["mean"])
    print("\n| method | test accuracy (mean ± std over seeds) | runs | seconds/run |")
    print("|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {r['runs']} | "
              f"{r['seconds_mean']:.1f} |")
    if zs is not None:
        print(f"\nbest: {best['method']} {100 * best['mean']:.2f}% = "
              f"{100 * (best['mean'] - zs):+.2f} points over surrogate zero-shot")
    result = {
        "benchmark": "eval_methods", "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "note": "surrogate:effnet-lite0+minilm is NOT CLIP (ConSE stand-in); numbers are not CLIP's",
        "substitutions": [
            "CLIP -> surrogate:effnet-lite0+minilm (ConSE, EfficientNet-Lite0 + MiniLM)",
            "DINO ViT-B/16 CLS -> surrogate:effnet-lite0 pooled features (supervised ImageNet)",
            f"prompts + visual LayerNorms -> affine params of the surrogate's last BatchNorms "
            f"(norms={args.norms}: {sum(p.numel() for _, p in cache_student.named_trainable_parameters())}"
            " params) + classifier; the frozen prefix below them cached (float16)",
            f"fresh strong augmentation each epoch -> {args.views} cached strong views per image "
            "(LaFTer's augmentation, also for NoLA)",
            "store embeddings and DINO stand-in features derived from the cached weak prefix",
        ],
        "data": {"train_images": len(src_train), "test_images": len(src_test),
                 "data_seed": args.data_seed, "classes": classes,
                 "train_class_counts": {c: src_train.labels.count(c) for c in classes}},
        "settings": {"views": args.views, "seeds": args.seeds,
                     "lafter_epochs": args.lafter_epochs, "nola_epochs": args.nola_epochs,
                     "heldout_fraction": 0.1, "selection": "label-free (held-out agreement)"},
        "derived_store_max_abs_diff": store_check,
        "timings": {**timings, "surrogate_forwards": forwards,
                    "total_s": time.perf_counter() - t_all},
        "table": table, "rows": rows,
        "best_minus_zero_shot_points": None if zs is None else 100 * (best["mean"] - zs),
    }
    print(f"wrote {common.write_json('methods', 'cpu', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
