"""Label-free tuning as a user runs it: the ``nolabels`` CLI, defaults only (**surrogate, NOT CLIP**).

For two real labelled image sets that ship offline, this script

1. prepares seeded train/test splits as class folders plus a ``classes.txt``:

   * **CIFAR-10** (``../shared/data/cifar10``): a seeded subset of the train tar (data seed 0)
     and of the test tar (data seed 1), picked exactly as ``benchmarks/eval_methods.py``
     picks them (sorted members, ``random.Random(seed).sample``), so the default sizes are
     the images of the older table. Class names: the folder names (airplane ... truck).
   * **digits** (scikit-learn's bundled ``load_digits``: 1,797 8x8 images, 0..16 ink):
     written as PNG, ink dark on white (``255 - v * 255 / 16``, how scikit-learn's example
     plots them, ``gray_r``), upscaled **bicubic** to 64x64 and stored as RGB; one seeded
     permutation (seed 0) gives the train and test images. Class names, fixed before any
     result was seen: the digit words ``zero`` ... ``nine`` (also the folder names).

2. runs, per data set, only ``nolabels`` commands in subprocesses, with nothing but what a
   user must pass (no descriptions: NoLA and LaFTer do not require them; no epochs,
   views, norms or other settings; ``--seed`` only to vary the tuning seed)::

       nolabels embed TEST --model surrogate:effnet-lite0+minilm --out test_store
       nolabels label test_store --classes classes.txt --out zeroshot_labels   # zero-shot
       nolabels eval zeroshot_labels --json
       nolabels tune --method nola TRAIN --classes classes.txt \\
           --model surrogate:effnet-lite0+minilm --out RUN --seed S                # S = 0, 1, 2
       nolabels predict RUN TEST --out preds.parquet
       nolabels eval preds.parquet --json

   ``--methods nola lafter`` adds ``tune --method lafter`` the same way. Test labels are read
   only by ``nolabels eval`` (and by ``tune``'s oracle report, never selected on).

   The zero-shot baselines run first; the tuned runs are interleaved (seed, method, data
   set), and ``--deadline-min`` starts no new tune run after that many minutes.

3. records per command its wall time, its own CPU time (``getrusage`` of the child: on a
   shared machine the wall time depends on the others' load, the CPU time much less), exit
   status and the load average before and after;
   a background thread samples the load average every 15 s. Each finished command's
   record is kept under ``--work/steps`` so a re-run (e.g. adding ``--methods lafter``)
   reuses it; the JSON (``benchmarks/results/methods-cli-cpu-DATE.json``) then sums the
   recorded command times, and names the longest single user run (one method's tune +
   predict + eval, or the zero-shot embed + label + eval): ``each_run_within_an_hour``
   is that run against an hour, ``within_an_hour`` the whole evaluation.

The surrogate is ConSE (EfficientNet-Lite0 ImageNet classifier + MiniLM text space); its
label space is ImageNet-1k, which overlaps CIFAR-10's classes and has no digit classes.
Its numbers are not CLIP numbers. ``benchmarks/eval_methods.py`` is the library-level
comparison (hand-picked settings, CDE and template ensembles); this script is the
user-level evidence.

Run: ``python benchmarks/eval_cli.py`` (defaults: CIFAR-10 2,000 / 1,000, digits 1,300 / 497,
NoLA, seeds 0 1 2). ``--cifar-train 200 --cifar-test 100 --datasets cifar10 --seeds 0`` is a
quick timing probe.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common as common  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "surrogate:effnet-lite0+minilm"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_SIZE = 64
DIGITS_TOTAL = 1797


# --------------------------------------------------------------------------- data
def extract_cifar_subset(tar_path: Path, dest: Path, n: int, seed: int) -> list[str]:
    """Extract a seeded random subset of ``n`` JPEGs of a CIFAR-10 tar into ``dest/<class>/``.

    The members are sorted by name and ``random.Random(seed).sample(members, n)`` picks them
    (all of them when ``n`` >= their number). Returns the sorted class names. A finished
    extraction (``dest/.done`` naming the same tar, n and seed) is reused.
    """
    done = dest / ".done"
    tag = f"{tar_path}:{n}:{seed}"
    if not (done.is_file() and done.read_text() == tag):
        if dest.exists():
            shutil.rmtree(dest)
        with tarfile.open(tar_path, "r:gz") as tf:
            members = sorted((m for m in tf.getmembers()
                              if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
            pick = random.Random(seed).sample(members, n) if n < len(members) else members
            for m in pick:
                cls, name = Path(m.name).parts[-2], Path(m.name).name
                out = dest / cls / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
        done.write_text(tag)
    return sorted(p.name for p in dest.iterdir() if p.is_dir())


def digit_image(pixels, size: int = DIGITS_SIZE):
    """One ``load_digits`` image (8x8, values 0..16, 16 = ink) as a ``size`` x ``size`` RGB
    PIL image: ink dark on white, upscaled with bicubic interpolation."""
    import numpy as np
    from PIL import Image

    gray = np.clip(np.rint(255.0 - np.asarray(pixels, np.float64) * (255.0 / 16.0)), 0, 255)
    img = Image.fromarray(gray.astype(np.uint8))  # 2-D uint8: mode "L"
    return img.resize((size, size), Image.BICUBIC).convert("RGB")


def digits_split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Disjoint train / test indices into ``load_digits`` (one seeded permutation)."""
    import numpy as np

    if n_train < 1 or n_test < 1 or n_train + n_test > DIGITS_TOTAL:
        raise ValueError(f"need 1 <= train, test and train + test <= {DIGITS_TOTAL}, "
                         f"got {n_train} + {n_test}")
    perm = np.random.default_rng(seed).permutation(DIGITS_TOTAL)
    return perm[:n_train].tolist(), perm[n_train:n_train + n_test].tolist()


def write_digits(dest: Path, n_train: int, n_test: int, seed: int = 0,
                 size: int = DIGITS_SIZE) -> tuple[Path, Path]:
    """Write ``dest/train/<word>/NNNN.png`` and ``dest/test/<word>/NNNN.png`` (NNNN: the
    ``load_digits`` index) for :func:`digits_split`'s indices; reused when ``dest/.done``
    names the same sizes, seed and image size. Returns the train and test folders."""
    from sklearn.datasets import load_digits

    done = dest / ".done"
    tag = f"digits:{n_train}:{n_test}:{seed}:{size}:bicubic:ink-dark"
    train_dir, test_dir = dest / "train", dest / "test"
    if done.is_file() and done.read_text() == tag:
        return train_dir, test_dir
    if dest.exists():
        shutil.rmtree(dest)
    d = load_digits()
    tr, te = digits_split(n_train, n_test, seed)
    for folder, idx in ((train_dir, tr), (test_dir, te)):
        for i in idx:
            out = folder / DIGIT_WORDS[int(d.target[i])] / f"{i:04d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            digit_image(d.images[i], size).save(out)
    done.write_text(tag)
    return train_dir, test_dir


def count_classes(folder: Path) -> dict[str, int]:
    """Images per class folder."""
    return {p.name: sum(1 for f in p.iterdir() if f.is_file())
            for p in sorted(folder.iterdir()) if p.is_dir()}


# --------------------------------------------------------------------------- commands
class LoadSampler:
    """Samples ``os.getloadavg()`` every ``every`` seconds in a daemon thread."""

    def __init__(self, every: float = 15.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append([round(time.time(), 1), *os.getloadavg()])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict:
        one = [s[1] for s in self.samples]
        return {"every_s": self.every, "samples": len(one),
                "load1_min": min(one, default=None), "load1_max": max(one, default=None),
                "load1_mean": statistics.mean(one) if one else None,
                "series": self.samples}


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as the shell command a user types (``nolabels ...``)."""
    return "nolabels " + " ".join(shlex.quote(str(a)) for a in argv)


def parse_json_output(text: str) -> dict:
    """The JSON object printed by ``nolabels eval --json`` (log lines before it are skipped)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return json.loads(text[start:])


class Runner:
    """Runs ``nolabels`` subcommands in subprocesses, timed, with cached records."""

    def __init__(self, work: Path, python: str = sys.executable) -> None:
        self.work, self.python = work, python
        (work / "steps").mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, argv: Sequence[str], outputs: Sequence[Path] = ()) -> dict:
        """Run ``nolabels ARGV`` unless a successful record ``name`` exists; a step run
        afresh first removes its ``outputs`` (left over from a failed try). Returns the
        record: command, seconds, rc, load averages, stdout, log file."""
        rec_path = self.work / "steps" / f"{name}.json"
        if rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            if rec.get("rc") == 0:
                rec["reused"] = True
                return rec
        for o in outputs:
            if o.is_dir():
                shutil.rmtree(o)
            elif o.exists():
                o.unlink()
        log = self.work / "logs" / f"{name}.log"
        cmd = command_line(argv)
        print(f"$ {cmd}", flush=True)
        load0 = os.getloadavg()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        with open(log, "w") as err:
            p = subprocess.run([self.python, "-m", "nolabels", *map(str, argv)],
                               stdout=subprocess.PIPE, stderr=err, text=True, cwd=self.work)
        secs = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        rec = {"name": name, "command": cmd, "rc": p.returncode, "seconds": secs,
               "cpu_seconds": cpu,
               "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
               "stdout": p.stdout, "log": str(log),
               "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if p.returncode != 0:
            lines = log.read_text(errors="replace").splitlines()
            rec["error_tail"] = lines[-15:]
            print(f"  FAILED rc={p.returncode} after {secs:.1f}s; log: {log}", flush=True)
            for line in lines[-5:]:
                print(f"  | {line}", flush=True)
        else:
            print(f"  {secs:.1f}s wall, {cpu:.1f}s cpu  (load {load0[0]:.2f} -> "
                  f"{rec['loadavg_after'][0]:.2f})", flush=True)
        rec_path.write_text(json.dumps(rec, indent=1) + "\n")
        rec["reused"] = False
        return rec


def score(runner: Runner, name: str, labels: Path) -> tuple[dict, float | None]:
    """``nolabels eval LABELS --json``: the command record and the accuracy (None on failure)."""
    rec = runner.run(name, ["eval", labels, "--json"])
    if rec["rc"] != 0:
        return rec, None
    res = parse_json_output(rec["stdout"])
    if res.get("unmatched_true_classes"):
        raise RuntimeError(f"{labels}: folder names not among the classes: "
                           f"{res['unmatched_true_classes']}")
    rec["eval"] = {k: res.get(k) for k in ("rows", "evaluated", "accuracy", "correct",
                                           "per_class", "predicted_counts", "mean_confidence")}
    return rec, res["accuracy"]


def run_summary(run: Path) -> dict:
    """What the run's ``summary.json`` says about selection (label-free) and the oracle."""
    p = run / "summary.json"
    if not p.is_file():
        return {}
    s = json.loads(p.read_text())
    crit = str(s.get("selection", "")).split(":")[0] or None
    hist = s.get("history") or []
    out = {k: s.get(k) for k in ("selected_epoch", "criterion_value", "selection_curves", "k",
                                 "subset_size", "oracle_subset_accuracy",
                                 "labeller_heldout_agreement", "train_images",
                                 "heldout_images", "cached_prefix") if k in s}
    # the run's own clocks, named apart from the command's wall time
    if "total_seconds" in s:
        out["run_total_seconds"] = s["total_seconds"]
    if "seconds" in s:
        out["run_method_seconds"] = s["seconds"]
    out["criterion"] = crit
    if hist and crit:
        out["criterion_curve"] = [h.get(crit) for h in hist]
    if hist:
        out["oracle_heldout_curve"] = [h.get("oracle_heldout_accuracy") for h in hist]
        out["epochs_logged"] = len(hist)
    return out


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["cifar10", "digits"],
                    choices=("cifar10", "digits"))
    ap.add_argument("--methods", nargs="+", default=["nola"], choices=("nola", "lafter"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cifar-train", type=int, default=2000)
    ap.add_argument("--cifar-test", type=int, default=1000)
    ap.add_argument("--digits-train", type=int, default=1300)
    ap.add_argument("--digits-test", type=int, default=497)
    ap.add_argument("--work", default="/tmp/eval/cli")
    ap.add_argument("--out", default=None)
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="start no new tune run after this many minutes (the JSON lists the "
                         "skipped ones)")
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    work = Path(args.work)
    runner = Runner(work)
    sizes = {"cifar10": (args.cifar_train, args.cifar_test),
             "digits": (args.digits_train, args.digits_test)}
    rows: list[dict] = []
    data_info: dict[str, Any] = {}
    paths: dict[str, tuple[Path, Path, Path, Path, str]] = {}
    skipped: list[str] = []
    with LoadSampler() as load:
        for ds in args.datasets:  # data, then the zero-shot baseline of each data set
            n_train, n_test = sizes[ds]
            t = time.perf_counter()
            base = work / ds / f"tr{n_train}_te{n_test}"
            if ds == "cifar10":
                classes = extract_cifar_subset(CIFAR / "train.tar.gz", base / "train", n_train, 0)
                extract_cifar_subset(CIFAR / "test.tar.gz", base / "test", n_test, 1)
                train_dir, test_dir = base / "train", base / "test"
                prep = ("seeded subsets of ../shared/data/cifar10/{train,test}.tar.gz "
                        "(data seeds 0 / 1), 32x32 JPEGs as shipped")
            else:
                train_dir, test_dir = write_digits(base, n_train, n_test, seed=0)
                classes = list(DIGIT_WORDS)
                prep = ("sklearn.datasets.load_digits, one seeded permutation (seed 0); "
                        f"8x8 -> {DIGITS_SIZE}x{DIGITS_SIZE} bicubic, ink dark on white "
                        "(255 - v*255/16), RGB PNG")
            classes_txt = base / "classes.txt"
            classes_txt.write_text("\n".join(classes) + "\n")
            data_info[ds] = {"train_images": n_train, "test_images": n_test,
                             "classes": classes, "preparation": prep,
                             "train_dir": str(train_dir), "test_dir": str(test_dir),
                             "train_class_counts": count_classes(train_dir),
                             "test_class_counts": count_classes(test_dir),
                             "prepare_seconds": time.perf_counter() - t}
            tag = f"{ds}_tr{n_train}_te{n_test}"
            paths[ds] = (base, train_dir, test_dir, classes_txt, tag)

            # zero-shot: embed the test images, label them, score
            store, zs = base / "test_store", base / "zeroshot_labels"
            cmds = [runner.run(f"{tag}_embed_test",
                               ["embed", test_dir, "--model", MODEL, "--out", store], [store])]
            if cmds[-1]["rc"] == 0:
                cmds.append(runner.run(f"{tag}_label_zeroshot",
                                       ["label", store, "--classes", classes_txt, "--out", zs],
                                       [zs]))
            acc = None
            if cmds[-1]["rc"] == 0:
                rec, acc = score(runner, f"{tag}_eval_zeroshot", zs)
                cmds.append(rec)
            rows.append({"dataset": ds, "method": "zero-shot (nolabels label)", "seed": None,
                         "test_accuracy": acc, "commands": cmds,
                         "seconds": sum(c["seconds"] for c in cmds),
                         "cpu_seconds": sum(c.get("cpu_seconds", 0.0) for c in cmds)})
            print(f"{ds} zero-shot: {acc}", flush=True)

        # tuned runs, interleaved (seed, method, data set) so that a deadline leaves every
        # data set with runs
        for seed in args.seeds:
            for method in args.methods:
                for ds in args.datasets:
                    base, train_dir, test_dir, classes_txt, tag = paths[ds]
                    name = f"{tag}_tune_{method}_s{seed}"
                    elapsed = time.perf_counter() - t_all
                    if (args.deadline_min is not None and elapsed > 60 * args.deadline_min
                            and not (work / "steps" / f"{name}.json").is_file()):
                        skipped.append(f"{ds} {method} seed {seed} (deadline: "
                                       f"{elapsed / 60:.1f} min elapsed)")
                        print(f"skipped: {skipped[-1]}", flush=True)
                        continue
                    run = base / "runs" / f"{method}_s{seed}"
                    preds = base / "preds" / f"{method}_s{seed}.parquet"
                    preds.parent.mkdir(parents=True, exist_ok=True)
                    tune = runner.run(name, ["tune", "--method", method, train_dir, "--classes",
                                             classes_txt, "--model", MODEL, "--out", run,
                                             "--seed", str(seed)], [run])
                    cmds, acc = [tune], None
                    if tune["rc"] == 0:
                        cmds.append(runner.run(f"{tag}_predict_{method}_s{seed}",
                                               ["predict", run, test_dir, "--out", preds],
                                               [preds]))
                    if cmds[-1]["rc"] == 0:
                        rec, acc = score(runner, f"{tag}_eval_{method}_s{seed}", preds)
                        cmds.append(rec)
                    row = {"dataset": ds, "method": method, "seed": seed, "test_accuracy": acc,
                           "commands": cmds, "seconds": sum(c["seconds"] for c in cmds),
                           "cpu_seconds": sum(c.get("cpu_seconds", 0.0) for c in cmds),
                           "tune_seconds": tune["seconds"],
                           "tune_cpu_seconds": tune.get("cpu_seconds"),
                           "predict_seconds": cmds[1]["seconds"] if len(cmds) > 1 else None,
                           **run_summary(run)}
                    rows.append(row)
                    print(f"{ds} {method} seed {seed}: {acc} (selected epoch "
                          f"{row.get('selected_epoch')}; {row['seconds']:.0f}s)", flush=True)

    # aggregate
    table = []
    for ds in args.datasets:
        for name in dict.fromkeys(r["method"] for r in rows if r["dataset"] == ds):
            rs = [r for r in rows if r["dataset"] == ds and r["method"] == name]
            accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
            table.append({"dataset": ds, "method": name, "runs": len(accs),
                          "failed": len(rs) - len(accs),
                          "mean": statistics.mean(accs) if accs else None,
                          "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                          "seconds_mean": statistics.mean(r["seconds"] for r in rs),
                          "cpu_seconds_mean": statistics.mean(r["cpu_seconds"] for r in rs),
                          "selected_epochs": [r.get("selected_epoch") for r in rs]})

    def mean_of(ds, method):
        return next((t["mean"] for t in table if t["dataset"] == ds and t["method"] == method),
                    None)

    command_seconds = sum(c["seconds"] for r in rows for c in r["commands"])
    prepare_seconds = sum(d["prepare_seconds"] for d in data_info.values())
    # what one user waits for: one method run (tune + predict + eval) or the zero-shot
    # baseline (embed + label + eval); and, separately, the whole evaluation
    longest = max((r["seconds"] for r in rows), default=0.0)
    targets: dict[str, Any] = {"command_seconds": command_seconds,
                               "command_cpu_seconds": sum(c.get("cpu_seconds", 0.0)
                                                          for r in rows for c in r["commands"]),
                               "prepare_seconds_this_invocation": prepare_seconds,
                               "longest_run_seconds": longest,
                               "each_run_within_an_hour": longest <= 3600,
                               "within_an_hour": command_seconds + prepare_seconds <= 3600}
    for ds in args.datasets:
        zs = mean_of(ds, "zero-shot (nolabels label)")
        for method in args.methods:
            m = mean_of(ds, method)
            gain = None if zs is None or m is None else 100 * (m - zs)
            targets[f"{ds}_{method}_minus_zeroshot_points"] = gain
            if ds == "cifar10" and method == "nola":
                targets["cifar10_nola_at_least_zeroshot_plus_10"] = None if gain is None \
                    else gain >= 10.0
            if ds == "digits" and method == "nola":
                targets["digits_nola_gain"] = None if gain is None else gain > 0.0

    print("\n| data set | method | test accuracy % (mean ± std over seeds) | runs | "
          "seconds / run (wall) | cpu seconds / run | selected epochs |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        acc = "failed" if t["mean"] is None else f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f}"
        print(f"| {t['dataset']} | {t['method']} | {acc} | {t['runs']} | "
              f"{t['seconds_mean']:.0f} | {t['cpu_seconds_mean']:.0f} | "
              f"{t['selected_epochs']} |")
    print(json.dumps(targets, indent=1))

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    where = subprocess.run([sys.executable, "-c", "import nolabels; print(nolabels.__file__)"],
                           capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "eval_cli", "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "git_commit": commit, "nolabels_imported_from": where,
                    "PYTHONPATH": os.environ.get("PYTHONPATH")},
        "note": f"{MODEL} is NOT CLIP (ConSE stand-in: EfficientNet-Lite0 ImageNet-1k + "
                "MiniLM); NoLA's DINO model is its own EfficientNet features (the CLI's "
                "surrogate default). Numbers are not CLIP's.",
        "protocol": "only nolabels CLI commands in subprocesses, package defaults; the "
                    "tuning seed is the only setting passed; test labels read only by "
                    "nolabels eval",
        "model": MODEL, "seeds": args.seeds, "methods": args.methods, "data": data_info,
        "load_average": load.summary(),
        "invocation_seconds": time.perf_counter() - t_all,
        "skipped_by_deadline": skipped,
        "targets": targets, "table": table, "rows": rows,
    }
    print(f"wrote {common.write_json('methods-cli', 'cpu', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
