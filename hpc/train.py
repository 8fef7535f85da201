"""Continual training of PtychoNN 2.0 on the corpus (REFERENCE.md, workflow step 3).

ADAM, mean absolute error against the label phase, triangular cyclic learning rate
(1e-4 to 5e-4, half cycle ~6 epochs, stepped per batch), a fresh random 10% of the pairs held
out for validation each epoch, the lowest-validation-loss weights kept, seeds set. Inputs go
through the preprocessing inference uses (:func:`ptychostream.engines.preprocess`: counts times
``intensity_scale``), times the training-only input normalisation that is folded into the saved
model.

One loop serves every device. The pairs are converted once into tensors resident where the
model runs (on a GPU: inputs and labels as float16, masks as uint8, uploaded once), each epoch's
order is one index tensor on that device, and the loop never waits for the host: losses stay on
the device until the end of the epoch. On a GPU it adds bf16 autocast, channels_last,
cuDNN autotuning and fused Adam; ``torch.compile`` is an option. Several GPUs (or CPU processes,
gloo) run the same loop under DistributedDataParallel, spawned here or under ``torchrun``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import warnings
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
    "ddp_world_size": None,  # processes for DDP; None: every GPU (1 on CPU); >1 on CPU: gloo
    "ddp_backend": None,  # None: nccl on GPUs, gloo on CPU
    "amp": "auto",  # "bf16", "fp16" (with GradScaler) or None; "auto": bf16 on a GPU that has it
    "channels_last": "auto",  # "auto": on (GPU and CPU: measured faster on both, see docs/hpc.md)
    "compile": False,  # torch.compile the model (GPU; the first epoch pays the compile time)
    "lr_scale": "sqrt",  # "sqrt", "linear" or None: lr x (batch / lr_ref_batch)^p above lr_ref_batch
    "lr_ref_batch": 64,  # batch the lr_min..lr_max schedule was tuned for (paper: small batches)
    "lr_cap": 1e-3,  # no scaled lr above this (measured: lr 2e-3 at batch 128 collapsed)
    "warmup_epochs": "auto",  # linear lr warm-up; "auto": 1 epoch when the lr was scaled up, else 0
    "init": "kaiming",  # from-scratch weights: "kaiming" (He normal, zero bias) or torch's "default"
    "collapse_guard": True,  # output independent of input -> best weights again, half the lr (3x)
    "resident": "auto",  # where the pair tensors live: "device", "host"; auto: device if it fits
    "val_batch": None,  # validation batch; None: 4 x batch_size (at least 64)
}

FIRST_CONV = "encoder.0.weight"
#: a network whose output varies across inputs by less than this fraction of the labels'
#: variation is dead (dead ReLUs or a saturated tanh give the same output for every input, to
#: float rounding: ~1e-8 rad); a healthy one varies by more than HEALTHY_RATIO of it
COLLAPSE_RATIO = 1e-4
HEALTHY_RATIO = 1e-2
MAX_COLLAPSE_RESTARTS = 3


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


def scaled_lr(cfg: dict) -> tuple[float, float, float]:
    """(lr_min, lr_max, factor) for the global batch: lr_min..lr_max hold up to lr_ref_batch;
    above it both scale by (batch / lr_ref_batch)^p (p = 1/2 "sqrt", the usual rule for Adam;
    1 "linear"), lr_max capped at lr_cap and lr_min kept below lr_max."""
    rule = cfg["lr_scale"]
    if rule not in (None, "sqrt", "linear"):
        raise ValueError(f"lr_scale must be 'sqrt', 'linear' or None, got {rule!r}")
    ratio = cfg["batch_size"] / float(cfg["lr_ref_batch"])
    factor = 1.0 if rule is None or ratio <= 1 else ratio ** (0.5 if rule == "sqrt" else 1.0)
    lr_max = cfg["lr_max"] * factor
    if factor > 1:
        lr_max = min(lr_max, max(cfg["lr_cap"], cfg["lr_max"]))
    lr_min = min(cfg["lr_min"] * factor, lr_max)
    return lr_min, lr_max, lr_max / cfg["lr_max"]


def _resolve_runtime(cfg: dict, device: str) -> dict:
    """amp dtype, channels_last and resident place for this device (see DEFAULTS)."""
    import torch

    cuda = device.startswith("cuda")
    amp = cfg["amp"]
    if amp == "auto":
        amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else None
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"amp must be 'bf16', 'fp16', None or 'auto', got {amp!r}")
    cl = cfg["channels_last"]
    cl = True if cl == "auto" else bool(cl)
    if cfg["resident"] not in ("auto", "device", "host"):
        raise ValueError(f"resident must be 'auto', 'device' or 'host', got {cfg['resident']!r}")
    return {"amp": amp, "channels_last": cl, "cuda": cuda}


def _pair_tensors(data: dict, cfg: dict, device: str, cuda: bool):
    """The corpus as tensors where training runs: x = counts * intensity_scale * input_norm
    (N, 1, H, W), y labels (N, 1, H, W), w masks (N, 1, H, W) uint8 (None unless masked_loss).

    On a GPU, inputs and labels are float16 (normalised inputs are O(1), phases within +-pi:
    1e-3 relative precision, well below the label noise) and are uploaded once, in chunks so the
    host never holds a second float32 copy; if they do not fit in the GPU's free memory they stay
    on the host (pinned) and each batch is copied over. On the CPU all float32."""
    import torch

    frames, labels, weights = data["frames"], data["labels"], data["label_weight"]
    n, h, w_ = frames.shape
    masked = cfg["masked_loss"]
    store = torch.float16 if cuda else torch.float32
    if cuda and float(np.max(frames)) * cfg["intensity_scale"] * cfg["input_norm_value"] > 6.0e4:  # float16 would overflow
        store = torch.float32
    place = "host"
    if cuda:
        need = n * h * w_ * (2 * torch.finfo(store).bits // 8 + (1 if masked else 0))
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        fits = need < 0.6 * free
        place = {"auto": "device" if fits else "host", "device": "device", "host": "host"}[cfg["resident"]]
        if place == "host":
            log.info("pairs stay on the host (%.1f GB, GPU has %.1f GB free)", need / 1e9, free / 1e9)
    target = torch.device(device) if place == "device" or not cuda else torch.device("cpu")
    pin = cuda and place == "host"

    def empty(dtype):
        t = torch.empty((n, 1, h, w_), dtype=dtype, device=target)
        return t.pin_memory() if pin else t

    from ptychostream.engines import preprocess

    norm = np.float32(cfg["input_norm_value"])
    x = empty(store)
    chunk = 4096
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x[a:b] = torch.from_numpy(preprocess(frames[a:b], cfg["intensity_scale"]) * norm).to(target, store)
    if target.type == "cpu" and store == torch.float32 and not pin:  # share the arrays, no copy
        y = torch.from_numpy(np.ascontiguousarray(labels, np.float32)).unsqueeze(1)
        wt = torch.from_numpy(np.ascontiguousarray(weights, np.uint8)).unsqueeze(1) if masked else None
        return x, y, wt, place
    y = empty(store)
    wt = empty(torch.uint8) if masked else None
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        y[a:b, 0] = torch.from_numpy(np.asarray(labels[a:b], np.float32)).to(target, store)
        if masked:
            wt[a:b, 0] = torch.from_numpy(np.asarray(weights[a:b], np.uint8)).to(target)
    return x, y, wt, place


def init_weights(model, how: str = "kaiming") -> None:
    """Initialise a from-scratch PtychoNN 2.0.

    Why: with torch's default initialisation (uniform, gain 1/sqrt(3)) each of the 17
    convolutions shrinks the signal about threefold, so the new network's output varies across
    inputs by ~1e-8 rad (measured on simulated pairs): it starts as a constant map and spends
    its first epochs finding the inputs at all. He (Kaiming) normal initialisation for ReLU keeps
    the signal's scale through the depth (spread ~0.03 rad at the start, same pairs)."""
    import torch

    if how == "default":
        return
    if how != "kaiming":
        raise ValueError(f"init must be 'kaiming' or 'default', got {how!r}")
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)


def _warm(opt, step: int, warm_steps: int) -> None:
    """Linear warm-up: the scheduler's lr times (step + 1) / warm_steps for the first steps."""
    if step < warm_steps:
        for group in opt.param_groups:
            group["lr"] *= (step + 1) / warm_steps


def _fit(data: dict, cfg: dict, rank: int = 0, world: int = 1, device: str = "cpu") -> dict:
    """The training loop; returns best state dict (CPU tensors), history and timing."""
    import torch
    from torch import nn

    from ptychostream.model import PtychoNN2, load_state_dict

    _seed_everything(cfg["seed"])
    rt = _resolve_runtime(cfg, device)
    cuda = rt["cuda"]
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    norm = cfg["input_norm_value"]
    if cfg["warm_start"]:
        model = load_state_dict(cfg["warm_start"])
        with torch.no_grad():  # checkpoints take raw counts: back into the normalised space
            model.encoder[0].weight.div_(norm)
    else:
        model = PtychoNN2()
        init_weights(model, cfg["init"])
    fmt = torch.channels_last if rt["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    net = model
    if world > 1:
        ids = [torch.device(device).index] if cuda else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg["compile"]:
        net = torch.compile(net)

    x_all, y_all, w_all, place = _pair_tensors(data, cfg, device, cuda)
    n = len(x_all)
    on_device = x_all.device.type == torch.device(device).type
    bs, masked = cfg["batch_size"], cfg["masked_loss"]
    if bs < world:
        raise ValueError(f"batch_size {bs} is smaller than the DDP world size {world}")
    vbs = cfg["val_batch"] or max(4 * bs, 64)
    n_train = n - min(n - 1, max(1, int(round(cfg["val_fraction"] * n))))
    n_train -= n_train % world
    steps_per_epoch = max(1, (n_train // bs) if cfg["compile"] else math.ceil(n_train / bs))
    lr_min, lr_max, factor = scaled_lr(cfg)
    warm = cfg["warmup_epochs"]
    warm = (1.0 if factor > 1 else 0.0) if warm == "auto" else float(warm)
    warm_steps = int(round(warm * steps_per_epoch))

    def make_optimizer(lo: float, hi: float):
        kw = {"fused": True} if cuda else {}
        opt = torch.optim.Adam(model.parameters(), lr=lo, **kw)
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=lo, max_lr=hi, mode="triangular",
            step_size_up=max(1, int(round(cfg["half_cycle_epochs"] * steps_per_epoch))),
            cycle_momentum=False,
        )
        return opt, sched

    opt, sched = make_optimizer(lr_min, lr_max)
    _warm(opt, 0, warm_steps)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[rt["amp"]]
    scaler = torch.amp.GradScaler(torch.device(device).type) if rt["amp"] == "fp16" else None
    if scaler is not None:  # it skips the steps whose gradients overflowed; the schedule goes on
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    def autocast():
        return torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def batch(idx):
        """idx: a long tensor on the pairs' device; returns float32 x, y, w on the device."""
        x = x_all.index_select(0, idx)
        y = y_all.index_select(0, idx)
        w = w_all.index_select(0, idx) if masked else None
        if not on_device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            w = w.to(device, non_blocking=True) if masked else None
        x = x.float().contiguous(memory_format=fmt)
        return x, y.float(), (w.float() if masked else None)

    def loss_fn(pred, y, w):
        """Mean absolute error (over the beam area with masked_loss), in float32."""
        err = (pred.float() - y).abs()
        if w is None:
            return err.mean()
        return (err * w).sum() / w.sum().clamp_min(1.0)

    def reduce(t):
        if world > 1:
            torch.distributed.all_reduce(t)
        return t

    def evaluate(idx) -> tuple[float, float, float]:
        """(validation loss, spread of the predictions across inputs, the labels' spread)."""
        model.eval()
        # loss x pairs, pairs; spread across inputs of prediction and label x pairs, pairs
        v = torch.zeros(5, dtype=torch.float64, device=device)
        with torch.no_grad(), autocast():
            for s in range(0, len(idx), vbs):
                x, y, w = batch(idx[s : s + vbs])
                pred = model(x).float()
                v[0] += loss_fn(pred, y, w).double() * len(x)
                v[1] += len(x)
                if len(x) > 1:
                    v[2] += pred.std(dim=0, unbiased=False).mean().double() * len(x)
                    v[3] += y.std(dim=0, unbiased=False).mean().double() * len(x)
                    v[4] += len(x)
        v = reduce(v).tolist()
        return v[0] / max(v[1], 1.0), v[2] / max(v[4], 1.0), v[3] / max(v[4], 1.0)

    from tqdm.auto import tqdm

    peak = 0.0  # the largest spread the network has shown: a collapse is losing it
    if cfg["collapse_guard"]:
        _, peak, _ = evaluate(torch.from_numpy(_epoch_split(n, cfg["val_fraction"], cfg["seed"], 0)[1][rank::world].copy()).to(x_all.device))
    history, best_val, best_epoch, best_state, best_state_device = [], math.inf, -1, None, None
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    restarts, step = 0, 0
    t0 = time.perf_counter()
    seen = 0
    idx_device = x_all.device
    bar = tqdm(range(cfg["epochs"]), desc="train", unit="epoch",
               disable=not cfg["progress"] or rank != 0, leave=False)
    for epoch in bar:
        tr, va = _epoch_split(n, cfg["val_fraction"], cfg["seed"], epoch)
        tr = tr[: len(tr) - len(tr) % world]
        tr_t = torch.from_numpy(tr).to(idx_device)
        va_t = torch.from_numpy(va[rank::world].copy()).to(idx_device)
        net.train()
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss x pairs, pairs
        n_steps = steps_per_epoch if cfg["compile"] else math.ceil(len(tr) / bs)
        for s in range(n_steps):
            g = tr_t[s * bs : (s + 1) * bs]  # the global batch; this rank's share
            x, y, w = batch(g[rank::world])
            opt.zero_grad(set_to_none=True)
            with autocast():
                pred = net(x)
            loss = loss_fn(pred, y, w)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            step += 1
            if step < warm_steps:
                _warm(opt, step, warm_steps)
            stats[0] += loss.detach().double() * len(x)
            stats[1] += len(x)
        stats = reduce(stats)
        train_loss = float(stats[0] / stats[1].clamp_min(1))
        if not math.isfinite(train_loss):
            raise TrainingError(f"loss became {train_loss} at epoch {epoch}; lower lr_max or "
                                "set intensity_scale so inputs are O(1)-O(100)")
        seen += int(stats[1])
        val_loss, pred_std, label_std = evaluate(va_t)
        lr = opt.param_groups[0]["lr"]
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr})
        collapsed = (cfg["collapse_guard"] and peak >= HEALTHY_RATIO * label_std
                     and pred_std < COLLAPSE_RATIO * label_std)
        peak = max(peak, pred_std)
        if collapsed:
            restarts += 1
            if restarts > MAX_COLLAPSE_RESTARTS:
                raise TrainingError(f"the network collapsed to a constant output {restarts} times "
                                    f"(last lr_max {lr_max:.2e}); lower lr_max or the batch size")
            lr_min, lr_max = lr_min / 2, lr_max / 2
            log.warning("epoch %d: output collapsed to a constant (spread %.2g vs labels %.2g rad); "
                        "back to the best weights, lr_max now %.2e", epoch, pred_std, label_std, lr_max)
            source = best_state_device if best_state_device is not None else initial_state
            model.load_state_dict(source)
            opt, sched = make_optimizer(lr_min, lr_max)
            step = 0  # and warm up again
            _warm(opt, 0, warm_steps)
        elif val_loss < best_val:
            best_val, best_epoch = val_loss, epoch
            best_state_device = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_state = {k: v.cpu() for k, v in best_state_device.items()}
            best_state[FIRST_CONV] = best_state[FIRST_CONV] * norm  # fold: the model takes counts
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best_epoch)
        log.debug("epoch %d train %.4f val %.4f lr %.2e spread %.2g (labels %.2g)", epoch, train_loss,
                  val_loss, lr, pred_std, label_std)
    bar.close()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if best_state is None:
        raise TrainingError("no epoch produced a usable network (every epoch collapsed)")
    best_state = {k: v.contiguous() for k, v in best_state.items()}
    return {"state": best_state, "history": history, "best_epoch": best_epoch,
            "best_val_loss": best_val, "seconds": seconds, "pairs_seen": seen,
            "runtime": {**rt, "resident": place, "lr_min": lr_min, "lr_max": lr_max,
                        "lr_factor": factor, "warmup_steps": warm_steps,
                        "collapse_restarts": restarts, "steps_per_epoch": steps_per_epoch}}


def _init_local_group(backend: str, rank: int, world: int, store_path: str) -> None:
    """A process group of processes on this machine that opens no port beyond loopback: the
    rendezvous is a file (torch's FileStore; a TCPStore would listen on every interface) and
    gloo's transport is bound to 127.0.0.1."""
    import torch

    kwargs = {}
    if backend == "gloo":
        opts = torch.distributed.ProcessGroupGloo._Options()
        opts._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        kwargs["pg_options"] = opts
    torch.distributed.init_process_group(backend, init_method=f"file://{store_path}",
                                         rank=rank, world_size=world, **kwargs)


def _ddp_worker(rank: int, world: int, cfg: dict, result_path: str, backend: str, store_path: str) -> None:
    """One process per GPU, or per CPU share (torch.multiprocessing.spawn); rank 0 saves."""
    import torch

    _init_local_group(backend, rank, world, store_path)
    try:
        if cfg["threads"]:
            torch.set_num_threads(int(cfg["threads"]))
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        else:
            device = "cpu"
        data = _load(cfg)
        result = _fit(data, cfg, rank, world, device)
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
    ``batch_size``: the global batch (split across DDP ranks, so a run gives the same training
    on one device or several). ``max_pairs``: a random subset of the corpus (seeded).
    ``options`` (see DEFAULTS and docs/hpc.md): lr_min, lr_max, half_cycle_epochs, val_fraction,
    intensity_scale, masked_loss, input_norm, device, threads, progress, ddp, ddp_world_size,
    ddp_backend, amp, channels_last, compile, lr_scale, lr_ref_batch, lr_cap, warmup_epochs,
    collapse_guard, resident, val_batch. The saved models take raw counts (after
    ``preprocess(frames, intensity_scale)``), like every published checkpoint.
    Returns {"state_dict", "onnx", "history": [{epoch, train_loss, val_loss, lr}],
    "best_epoch", "best_val_loss", "n_pairs", "seconds", "pairs_per_s", "device", "world_size",
    "intensity_scale", "warm_start", "runtime": {amp, channels_last, resident, lr_min, lr_max,
    ...}}; the same dict is written to ``out_dir/history.json``.
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
    scaled_lr(cfg)  # refuse a bad lr_scale before any work
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
    _resolve_runtime(cfg, device)  # refuse bad amp / resident values before loading the corpus
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
    cuda = device.startswith("cuda")
    n_gpus = torch.cuda.device_count() if cuda else 0
    world = cfg["ddp_world_size"]
    if world is None:
        world = n_gpus if (cuda and device == "cuda" and cfg["ddp"] and n_gpus > 1) else 1
    world = int(world)
    if world < 1 or (cuda and world > max(n_gpus, 1)):
        raise ValueError(f"ddp_world_size {world} is not possible on {device} ({n_gpus} GPU(s))")
    if batch_size < world:
        raise ValueError(f"batch_size {batch_size} is smaller than the DDP world size {world}")
    backend = cfg["ddp_backend"] or ("nccl" if cuda else "gloo")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    log.info("training on %d pairs, %d epochs, batch %d, %s%s", n, epochs, batch_size, device,
             f" x{world} (DDP, {backend})" if world > 1 else "")
    if launched > 1:  # under torchrun: this process is one rank
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend)
        dev = f"cuda:{local}" if cuda else "cpu"
        if dev != "cpu":
            torch.cuda.set_device(local)
        result = _fit(data, cfg, rank, launched, dev)
        world = launched
        if rank != 0:
            return {"rank": rank, "world_size": world}
    elif world > 1:
        del data  # each rank loads its own copy
        result_path = out / "_ddp_result.pt"
        store = out / f"_ddp_store.{os.getpid()}"
        store.unlink(missing_ok=True)  # a FileStore must start from no file
        try:
            torch.multiprocessing.spawn(_ddp_worker, args=(world, cfg, str(result_path), backend, str(store)),
                                        nprocs=world, join=True)
        finally:
            store.unlink(missing_ok=True)
        result = torch.load(result_path, weights_only=False)
        result_path.unlink(missing_ok=True)
    else:
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
        "seed": int(seed), "runtime": result["runtime"],
    }
    (out / "history.json").write_text(json.dumps(summary, indent=1))
    log.info("trained %d epochs on %d pairs in %.1f s (%.1f pairs/s); best epoch %d, val MAE %.4f",
             epochs, n, summary["seconds"], summary["pairs_per_s"], summary["best_epoch"],
             summary["best_val_loss"])
    return copy.deepcopy(summary)
