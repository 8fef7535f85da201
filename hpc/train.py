"""Continual training of PtychoNN 2.0 on the corpus (REFERENCE.md, workflow step 3).

ADAM, mean absolute error against the label phase, triangular cyclic learning rate
(1e-4 to 5e-4, half cycle ~6 epochs, stepped per batch), a fresh random 10% of the pairs held
out for validation each epoch, the lowest-validation-loss weights kept, seeds set. Inputs go
through :func:`ptychostream.engines.preprocess`, the one preprocessing inference also uses.
One GPU when there is one; several through torch's DistributedDataParallel (spawned here, or
under ``torchrun``); CPU otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import socket
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULTS = {
    "lr_min": 1e-4,
    "lr_max": 5e-4,
    "half_cycle_epochs": 6.0,
    "val_fraction": 0.1,
    "intensity_scale": 1.0,
    "input_norm": "auto",  # "auto": scale inputs to O(1) while training, folded into the export
    "masked_loss": False,  # True: loss only where the reconstruction was well illuminated
    "device": None,  # "cpu", "cuda", "cuda:1"; None: GPU if there is one
    "threads": None,  # torch CPU threads
    "progress": True,  # tqdm bar over epochs
    "ddp": True,  # use every visible GPU through DistributedDataParallel
}


FIRST_CONV = "encoder.0.weight"


def input_norm(frames: np.ndarray, intensity_scale: float = 1.0) -> float:
    """1 / (mean per-frame maximum): brings network inputs to O(1) while training.

    Why: Adam moves each weight by ~lr per step whatever its gradient, so on raw counts
    (hundreds per pixel) the first layer's output jumps by hundreds per step and the tanh output
    saturates. The first layer is linear, so training on ``x * s`` and multiplying the first
    convolution's weights by ``s`` afterwards gives a model that takes raw counts: the exported
    model needs no new preprocessing at the edge (preprocess and IntensityScale unchanged)."""
    peak = float(np.mean(np.max(frames.reshape(len(frames), -1), axis=1))) * float(intensity_scale)
    return 1.0 / peak if peak > 0 else 1.0


class TrainingError(RuntimeError):
    """Training cannot start (empty corpus, bad checkpoint, bad option): says why."""


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _epoch_split(n: int, val_fraction: float, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """This epoch's random (train, validation) split; identical on every DDP rank."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return perm[n_val:], perm[:n_val]


def _fit(data: dict, cfg: dict, rank: int = 0, world: int = 1, device: str = "cpu") -> dict:
    """The training loop; returns best state dict (CPU tensors), history and timing."""
    import torch
    from torch import nn

    from ptychostream.engines import preprocess
    from ptychostream.model import PtychoNN2, load_state_dict

    _seed_everything(cfg["seed"])
    norm = cfg["input_norm_value"]
    if cfg["warm_start"]:
        model = load_state_dict(cfg["warm_start"])
        with torch.no_grad():  # checkpoints take raw counts: back into the normalised space
            model.encoder[0].weight.div_(norm)
    else:
        model = PtychoNN2()
    model = model.to(device).train()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[torch.device(device).index])
    frames, labels, weights = data["frames"], data["labels"], data["label_weight"]
    n = len(frames)
    bs, scale, masked = cfg["batch_size"], cfg["intensity_scale"], cfg["masked_loss"]
    n_train_rank = math.ceil((n - max(1, int(round(cfg["val_fraction"] * n)))) / world)
    steps_per_epoch = max(1, math.ceil(n_train_rank / bs))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr_min"])
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=cfg["lr_min"], max_lr=cfg["lr_max"], mode="triangular",
        step_size_up=max(1, int(round(cfg["half_cycle_epochs"] * steps_per_epoch))),
        cycle_momentum=False,
    )

    def batch(idx: np.ndarray):
        idx = np.sort(idx)
        x = torch.from_numpy(preprocess(frames[idx], scale) * np.float32(norm)).to(device)
        y = torch.from_numpy(labels[idx][:, None]).to(device)
        w = torch.from_numpy(weights[idx][:, None].astype(np.float32)).to(device) if masked else None
        return x, y, w

    def loss_fn(pred, y, w):
        err = (pred - y).abs()
        if w is None:
            return err.mean()
        return (err * w).sum() / w.sum().clamp_min(1.0)

    def reduce(total: float, count: int) -> float:
        if world > 1:
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        return total / max(count, 1)

    from tqdm.auto import tqdm

    history, best_val, best_epoch, best_state = [], math.inf, -1, None
    t0 = time.perf_counter()
    seen = 0
    bar = tqdm(range(cfg["epochs"]), desc="train", unit="epoch",
               disable=not cfg["progress"] or rank != 0, leave=False)
    for epoch in bar:
        tr, va = _epoch_split(n, cfg["val_fraction"], cfg["seed"], epoch)
        if world > 1:  # equal shares, so every rank runs the same number of DDP steps
            tr = tr[: len(tr) - len(tr) % world]
        tr, va = tr[rank::world], va[rank::world]
        net.train()
        tot, cnt = 0.0, 0
        for s in range(0, len(tr), bs):
            x, y, w = batch(tr[s : s + bs])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y, w)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}; lower lr_max or "
                                    "set intensity_scale so inputs are O(1)-O(100)")
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(x)
            cnt += len(x)
        seen += cnt
        train_loss = reduce(tot, cnt)
        net.eval()
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(va), max(bs, 64)):
                x, y, w = batch(va[s : s + max(bs, 64)])
                tot += loss_fn(model(x), y, w).item() * len(x)
                cnt += len(x)
        val_loss = reduce(tot, cnt)
        lr = opt.param_groups[0]["lr"]
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr})
        if val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best_state[FIRST_CONV] = best_state[FIRST_CONV] * norm  # fold: the model takes counts
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best_epoch)
        log.debug("epoch %d train %.4f val %.4f lr %.2e", epoch, train_loss, val_loss, lr)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"state": best_state, "history": history, "best_epoch": best_epoch,
            "best_val_loss": best_val, "seconds": seconds, "pairs_seen": seen * world}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, cfg: dict, result_path: str) -> None:
    """One process per GPU (torch.multiprocessing.spawn); rank 0 saves the result."""
    import torch

    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        data = _load(cfg)
        result = _fit(data, cfg, rank, world, f"cuda:{rank}")
        if rank == 0:
            torch.save(result, result_path)
    finally:
        torch.distributed.destroy_process_group()


def _load(cfg: dict) -> dict:
    from .corpus import Corpus

    return Corpus(cfg["corpus_dir"]).load(cfg["max_pairs"], seed=cfg["seed"])


def train(
    corpus_dir: str,
    out_dir: str,
    warm_start: str | None = None,
    epochs: int = 50,
    batch_size: int = 32,
    seed: int = 0,
    max_pairs: int | None = None,
    **options,
) -> dict:
    """Train PtychoNN 2.0 on the corpus; write the best model as a state dict and ONNX.

    ``warm_start``: a state dict (the previous best checkpoint) to continue from.
    ``max_pairs``: a random subset of the corpus (seeded), for quick rounds.
    ``options``: lr_min, lr_max, half_cycle_epochs, val_fraction, intensity_scale, masked_loss,
    input_norm, device, threads, progress, ddp (see DEFAULTS). The saved models take raw
    counts (after ``preprocess(frames, intensity_scale)``), like every published checkpoint.
    Returns {"state_dict", "onnx", "history": [{epoch, train_loss, val_loss, lr}],
    "best_epoch", "best_val_loss", "n_pairs", "seconds", "pairs_per_s", "device", "world_size",
    "intensity_scale", "warm_start"}; the same dict is written to ``out_dir/history.json``.
    """
    import torch

    from ptychostream.model import ModelError, export_onnx, load_state_dict

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    cfg = {**DEFAULTS, **options, "corpus_dir": str(corpus_dir), "epochs": int(epochs),
           "batch_size": int(batch_size), "seed": int(seed), "max_pairs": max_pairs,
           "warm_start": None}
    if not 0.0 < cfg["val_fraction"] < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {cfg['val_fraction']}")
    if warm_start:
        if not Path(warm_start).exists():
            raise TrainingError(f"warm-start checkpoint {warm_start} does not exist")
        try:
            load_state_dict(warm_start)
        except ModelError as exc:
            raise TrainingError(f"warm-start checkpoint {warm_start}: {exc}") from exc
        cfg["warm_start"] = str(warm_start)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    data = _load(cfg)
    n = len(data["frames"])
    norm = cfg["input_norm"]
    if norm == "auto":
        norm = input_norm(data["frames"], cfg["intensity_scale"])
    elif norm is None:
        norm = 1.0
    if not (isinstance(norm, int | float) and np.isfinite(norm) and norm > 0):
        raise ValueError(f"input_norm must be 'auto', None or a positive number, got {norm!r}")
    cfg["input_norm_value"] = float(norm)
    if n < 2:
        raise TrainingError(f"corpus {corpus_dir} has {n} pair(s); need at least 2 (train + validation)")
    n_gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    log.info("training on %d pairs, %d epochs, batch %d, %s%s", n, epochs, batch_size, device,
             f" x{n_gpus} (DDP)" if n_gpus > 1 and cfg["ddp"] else "")
    if launched > 1:  # under torchrun: this process is one rank
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        dev = f"cuda:{local}" if device.startswith("cuda") else "cpu"
        if dev != "cpu":
            torch.cuda.set_device(local)
        result = _fit(data, cfg, rank, launched, dev)
        world = launched
        if rank != 0:
            return {"rank": rank, "world_size": world}
    elif n_gpus > 1 and cfg["ddp"] and device == "cuda":
        world = n_gpus
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        result_path = str(out / "_ddp_result.pt")
        torch.multiprocessing.spawn(_ddp_worker, args=(world, cfg, result_path), nprocs=world, join=True)
        result = torch.load(result_path, weights_only=False)
        Path(result_path).unlink(missing_ok=True)
    else:
        world = 1
        result = _fit(data, cfg, 0, 1, device)

    best = load_state_dict(result["state"])
    state_path = out / "model.pt"
    onnx_path = out / "model.onnx"
    torch.save(best.state_dict(), state_path)
    export_onnx(best, onnx_path)
    summary = {
        "state_dict": str(state_path), "onnx": str(onnx_path), "history": result["history"],
        "best_epoch": int(result["best_epoch"]), "best_val_loss": float(result["best_val_loss"]),
        "n_pairs": int(n), "seconds": float(result["seconds"]),
        "pairs_per_s": float(result["pairs_seen"] / max(result["seconds"], 1e-9)),
        "device": device, "world_size": int(world), "intensity_scale": float(cfg["intensity_scale"]),
        "input_norm": cfg["input_norm_value"],
        "warm_start": cfg["warm_start"], "epochs": int(epochs), "batch_size": int(batch_size),
        "seed": int(seed),
    }
    (out / "history.json").write_text(json.dumps(summary, indent=1))
    log.info("trained %d epochs on %d pairs in %.1f s (%.1f pairs/s); best epoch %d, val MAE %.4f",
             epochs, n, summary["seconds"], summary["pairs_per_s"], summary["best_epoch"],
             summary["best_val_loss"])
    return copy.deepcopy(summary)
