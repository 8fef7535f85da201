#!/usr/bin/env python
"""The base-model recipe: simulated training pairs, GPU training, the accuracy benchmark.

    python benchmarks/train_base_model.py --out base-model            # one GPU, under 8 minutes
    python benchmarks/train_base_model.py --out base-model --install  # ... and ship it
    python benchmarks/train_base_model.py --install-from base-model   # ship an earlier run's
    python benchmarks/train_base_model.py --quick --out /tmp/bm       # CPU, ~2 minutes, tiny

Run it from outside the repository root where ptychostream is installed as a wheel (so the
installed package, not the source folder, is imported). Steps:

1. Pairs: ``--pairs`` frames of fresh random-feature training areas of the simulated W film
   (:func:`ptychostream.simulation.iter_pairs`, on the GPU), labels the true phase crops
   weighted to the beam, doses log-uniform from ``--dose-min`` to ``--dose-max`` photons per
   frame (as the network sees them), ``--scaled-fraction`` of them measured at a tenth of that
   and scaled x10 (0.5 ms frames with IntensityScale 10). Written as a corpus (``gen_pairs.py``).
2. Training: :func:`ptychostream.hpc.train` (masked loss, cyclic LR), ``--epochs`` over the
   pairs. Defaults: 64k pairs x 110 epochs = 7 M pair-passes, about 6 minutes at 20k pairs/s.
3. The accuracy benchmark (``bench_accuracy.py``) on the trained model, network and
   refinement rows (``--bench-iterative`` adds pty-chi rows, minutes more).

Writes into ``--out``: ``ptychonn2_base.pt`` (state dict), ``ptychonn2_base.onnx``,
``recipe.json`` (every parameter, seed, version, timing and figure), ``accuracy.json``,
``figures/`` (one PNG per case, the sweep, the loss curve, ``accuracy.txt``). ``--install``
copies the state dict and the record into ``ptychostream/data/`` (package data; the served
``--model builtin``). The corpus is deleted at the end unless ``--keep-corpus``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("train_base_model")

HERE = Path(__file__).resolve().parent

#: GPU defaults: ~7 M pair-passes (see the module doc); --quick replaces them
FULL = {"pairs": 64_000, "epochs": 110, "batch_size": 128, "map_px": 2048, "pairs_per_map": 4096}
QUICK = {"pairs": 64, "epochs": 1, "batch_size": 16, "map_px": 384, "pairs_per_map": 32}


def _sibling(name: str):
    """Import a module beside this script (benchmarks/ is not a package; the wheel lacks it)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def install_dir() -> Path:
    """Where --install writes: the source tree's package data when this script sits in one,
    else the installed package's data folder."""
    src = HERE.parent / "ptychostream"
    if (src / "__init__.py").is_file():
        return src / "data"
    from ptychostream.basemodel import data_dir

    return data_dir()


def install(run_dir: Path) -> Path:
    """Copy a run's state dict and recipe record into the package data folder."""
    from ptychostream.basemodel import RECIPE_NAME, STATE_DICT_NAME
    from ptychostream.model import load_state_dict

    run_dir = Path(run_dir)
    state, record = run_dir / STATE_DICT_NAME, run_dir / "recipe.json"
    if not state.is_file() or not record.is_file():
        raise SystemExit(f"{run_dir} holds no finished recipe run ({STATE_DICT_NAME} + recipe.json)")
    load_state_dict(str(state))  # refuse to ship what does not load
    dest = install_dir()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(state, dest / STATE_DICT_NAME)
    shutil.copyfile(record, dest / RECIPE_NAME)
    log.info("installed %s and its recipe into %s", STATE_DICT_NAME, dest)
    return dest / STATE_DICT_NAME


def kaiming_init(path: Path, norm: float, seed: int = 0) -> Path:
    """A fresh PtychoNN 2.0 whose input reaches its output, as a warm-start checkpoint.

    Why: with PyTorch's default initialisation the 18 convolutions shrink the signal so far that
    the untrained network's output does not depend on its input (it varies by ~1e-8 rad from
    one frame to another, measured here), and training spends its first many steps, or all of
    them, on a constant map. He (Kaiming) normal weights and zero biases keep the activations'
    scale through the depth. The first convolution is stored times ``norm`` because
    :func:`ptychostream.hpc.train` takes checkpoints in raw counts and divides it back."""
    import torch
    from torch import nn

    from ptychostream.model import PtychoNN2

    torch.manual_seed(seed)
    model = PtychoNN2()
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)
    with torch.no_grad():
        model.encoder[0].weight.mul_(norm)
    torch.save(model.state_dict(), path)
    return Path(path)


def corpus_norm(corpus: Path, max_pairs: int = 2048, seed: int = 0) -> float:
    """hpc.train's input normalisation (1 / mean frame peak), from a sample of the corpus."""
    from ptychostream.hpc.corpus import Corpus
    from ptychostream.hpc.train import input_norm

    return input_norm(Corpus(corpus).load(max_pairs=max_pairs, seed=seed)["frames"])


def versions() -> dict:
    import numpy
    import torch

    import ptychostream

    info = {"python": platform.python_version(), "ptychostream": ptychostream.__version__,
            "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loss_png(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], label="train")
    ax.plot(ep, [h["val_loss"] for h in history], label="validation")
    ax.set(xlabel="epoch", ylabel="masked MAE (rad)", yscale="log", title="base model training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarise_accuracy(acc: dict) -> dict:
    """The figures worth keeping in the record: rows, per-frame MAE and stitching per case."""
    out = {}
    for name, case in acc["cases"].items():
        out[name] = {k: case[k] for k in ("scan", "rows", "frame_mae", "stitch", "ai_vs_iterative")
                     if k in case}
    return {"cases": out, "calibration": acc.get("calibration"), "table": acc.get("table"),
            "seconds": acc.get("seconds")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder the run writes into")
    ap.add_argument("--quick", action="store_true", help="tiny CPU run (~2 min) that exercises every step")
    ap.add_argument("--install", action="store_true", help="ship the result as package data")
    ap.add_argument("--install-from", help="only ship an earlier run's folder, then stop")
    ap.add_argument("--pairs", type=int, help=f"training pairs (default {FULL['pairs']})")
    ap.add_argument("--epochs", type=int, help=f"epochs (default {FULL['epochs']})")
    ap.add_argument("--batch-size", type=int, help=f"batch (default {FULL['batch_size']})")
    ap.add_argument("--lr-min", type=float, default=1e-4)
    ap.add_argument("--lr-max", type=float, default=5e-4)
    ap.add_argument("--half-cycle-epochs", type=float, default=6.0)
    ap.add_argument("--map-px", type=int, help="side of each training map (px)")
    ap.add_argument("--pairs-per-map", type=int, help="pairs cut from one training map")
    ap.add_argument("--dose-min", type=float, default=2.5e5, help="photons/frame, network side")
    ap.add_argument("--dose-max", type=float, default=6e7)
    ap.add_argument("--scaled-fraction", type=float, default=0.3)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--feature-nm", type=float, default=200.0, help="feature size scale of the sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu / cuda (default: a GPU if there is one)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--warm-start", help="state dict to continue from")
    ap.add_argument("--init", choices=("kaiming", "default"), default="kaiming",
                    help="fresh weights: He normal (default; see kaiming_init) or PyTorch's")
    ap.add_argument("--bench-iterative", action="store_true", help="add pty-chi rows to the benchmark")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--keep-corpus", action="store_true")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.install_from and not args.out:
        ap.error("--out is required (or --install-from DIR)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from ptychostream import setup_logging

    setup_logging()
    if args.install_from:
        path = install(Path(args.install_from))
        print(f"installed {path}")
        return {"installed": str(path)}
    import torch

    from ptychostream.hpc import train
    from ptychostream.simulation import ExperimentConfig

    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    cfg = ExperimentConfig(sample_kind="train", feature_m=args.feature_nm * 1e-9)
    record: dict = {"recipe": {k: v for k, v in vars(args).items()}, "versions": versions(),
                    "device": device, "simulation": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
                    "film_phase_rad": cfg.film_phase_rad, "object_pixel_m": cfg.object_pixel_m,
                    "seconds": {}}

    # 1. pairs
    gen = _sibling("gen_pairs")
    corpus = out / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    t0 = time.perf_counter()
    record["generation"] = gen.generate_corpus(
        corpus, args.pairs, seed=args.seed, device=device, cfg=cfg, map_px=args.map_px,
        pairs_per_map=args.pairs_per_map, dose_min=args.dose_min, dose_max=args.dose_max,
        scaled_fraction=args.scaled_fraction, scale=args.scale)
    record["seconds"]["pairs"] = time.perf_counter() - t0
    log.info("%d pairs in %.1f s (%.0f pairs/s)", args.pairs, record["seconds"]["pairs"],
             record["generation"]["pairs_per_s"])

    # 2. training
    t0 = time.perf_counter()
    warm = args.warm_start
    if warm is None and args.init == "kaiming":
        warm = str(kaiming_init(out / "init.pt", corpus_norm(corpus), seed=args.seed))
    options = {"masked_loss": True, "lr_min": args.lr_min, "lr_max": args.lr_max,
               "half_cycle_epochs": args.half_cycle_epochs, "progress": False, "device": device}
    if args.threads:
        options["threads"] = args.threads
    res = train(str(corpus), str(out / "train"), warm_start=warm, epochs=args.epochs,
                batch_size=args.batch_size, seed=args.seed, **options)
    record["seconds"]["train"] = time.perf_counter() - t0
    state, onnx = out / "ptychonn2_base.pt", out / "ptychonn2_base.onnx"
    shutil.copyfile(res["state_dict"], state)
    shutil.copyfile(res["onnx"], onnx)
    record["training"] = {k: v for k, v in res.items() if k not in ("state_dict", "onnx")}
    record["training"]["pair_passes"] = round(res["pairs_per_s"] * res["seconds"])
    loss_png(res["history"], figures / "loss.png")
    log.info("trained: %.0f pairs/s, best val MAE %.4f (epoch %d), %.0f s", res["pairs_per_s"],
             res["best_val_loss"], res["best_epoch"], record["seconds"]["train"])
    if not args.keep_corpus:
        shutil.rmtree(corpus, ignore_errors=True)

    # 3. accuracy
    if not args.skip_bench:
        bench = _sibling("bench_accuracy")
        bargs = ["--model", str(state), "--json", str(out / "accuracy.json"), "--out", str(figures)]
        if not args.bench_iterative:
            bargs += ["--iterations", "0"]
        # the recipe measures the network; one refinement pass keeps it inside its 8 minutes
        # (bench_accuracy.py alone gives the IOC's 32)
        bargs += ["--refine-passes", "1"]
        if args.quick:
            bargs += ["--quick", "--cases", "b,c", "--positions", "24"]
        if device.startswith("cuda"):
            bargs += ["--engine", "torch"]
        t0 = time.perf_counter()
        record["accuracy"] = summarise_accuracy(bench.main(bargs))
        record["seconds"]["bench"] = time.perf_counter() - t0
    record["seconds"]["wall"] = time.perf_counter() - t_start
    (out / "recipe.json").write_text(json.dumps(record, indent=1, default=str))
    if args.install:
        record["installed"] = str(install(out))
        (out / "recipe.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"base model: {state} ({record['seconds']['wall']:.0f} s: pairs "
          f"{record['seconds']['pairs']:.0f} s, training {record['seconds']['train']:.0f} s at "
          f"{res['pairs_per_s']:.0f} pairs/s)")
    return record


if __name__ == "__main__":
    main()
