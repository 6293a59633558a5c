"""Training: the reference recipe by default, every knob in `TrainConfig` (params.yaml `train:`).

Images are read per batch from an image source (adalabelhash.streaming: the files, decoded by
DataLoader workers, or the memory-mapped decoded cache; or a uint8 tensor in memory), so memory
is bounded by the batch and the workers, not by the dataset; batches are augmented on the
training device. Every epoch:
  train on a seeded permutation -> validate (mAP of the val split against a fixed subset of
  the training images) -> checkpoint (weights, codewords, optimiser, scheduler, RNG, history).
Model selection and early stopping use the validation split, never the queries. Each epoch's
randomness comes from its own generator seeded by (seed, epoch), which is what makes a killed
and resumed run end with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adalabelhash.codes import pack_codes
from adalabelhash.errors import UserError
from adalabelhash.fileio import atomic_output
from adalabelhash.loss import adalabelhash_loss, csq_loss
from adalabelhash.model import HashModel, margin_for
from adalabelhash.streaming import ImageSource, stream_batches
from adalabelhash.train_config import EXPECTED_GPUS_ENV, TrainConfig, expected_gpus

EpochCallback = Callable[[int, dict], None]


@dataclass
class TrainData:
    """Images per split (image sources yielding uint8 N x 3 x H x W batches) and multi-hot labels (N x C)."""

    train_images: ImageSource
    train_labels: torch.Tensor
    val_images: ImageSource
    val_labels: torch.Tensor
    class_names: list[str]
    fingerprint: str  # the dataset version: checkpoints of other data are not resumed

    def __post_init__(self):
        num_classes = len(self.class_names)
        for name in ("train", "val"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if isinstance(images, torch.Tensor) and (images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3):
                raise UserError(f"{name} images must be uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
            if labels.ndim != 2 or labels.shape[1] != num_classes:
                raise UserError(f"{name} labels must be N x {num_classes} (one column per class), got {tuple(labels.shape)}")
            if labels.shape[0] != len(images):
                raise UserError(f"{name}: {len(images)} images but {labels.shape[0]} label rows")
        if len(self.train_images) == 0:
            raise UserError("no training images")
        empty = [self.class_names[c] for c in torch.nonzero(self.train_labels.sum(0) == 0).flatten().tolist()]
        if empty:
            raise UserError(f"class(es) with no training images: {', '.join(empty[:10])}")


@dataclass
class FitResult:
    model: HashModel
    history: list[dict]
    best_epoch: int
    monitor: str
    best_value: float
    identity: str
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    hardware: str = "not recorded"
    precision: str = "not recorded"  # fp32 | bf16 | fp16 autocast, as resolved on that hardware
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)


DRIVER_NEEDED = "the pinned torch wheels are CUDA 13 builds: NVIDIA driver >= 580"


def cuda_unavailable_reason() -> str:
    """Why torch sees no GPU, in torch's own words when it gave any (an old driver warns here)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = torch.cuda.device_count()
    said = "; ".join(str(w.message).strip().splitlines()[0] for w in caught)
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'}) sees {count} GPU(s)"
            f"{': ' + said if said else ''}; {DRIVER_NEEDED}")


def select_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: cuda was requested but no CUDA device is available: {cuda_unavailable_reason()}")
    if name == "auto" and expected_gpus() and not torch.cuda.is_available():
        # a GPU pod training on CPU would be 10-100x slower and say so only in a tag: refuse
        raise UserError(f"device: auto, and this pod was given {expected_gpus()} GPU(s) ({EXPECTED_GPUS_ENV}), "
                        f"but CUDA is unavailable: {cuda_unavailable_reason()}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per DDP process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def describe_hardware(device: torch.device) -> str:
    """What the epochs ran on. Recorded because the same seed and settings, deterministic on one
    machine, have trained to different models in different sessions (CPU kernels round differently)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    amx = " + AMX" if flags and "amx_tile" in flags.group(1).split() else ""
    name = model.group(1).strip() if model else platform.processor() or platform.machine()
    return f"cpu: {name}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}{amx} kernels"


def process_group_backend(device: torch.device) -> str:
    """NCCL for the GPU tensors and gloo for any CPU one (an NCCL-only group refuses CPU tensors)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def distributed(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun describes in the environment,
    with the backend of the training `device` (already set as the current CUDA device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device is None:
            return int(os.environ["RANK"]), world  # not joined yet: torchrun's word for it
        dist.init_process_group(process_group_backend(device))
    return dist.get_rank(), world


def resolve_precision(requested: str, device: torch.device, bf16_supported: bool | None = None) -> str:
    """fp32 | bf16 | fp16 (with a GradScaler). auto: fp32 on CPU; on CUDA bf16 where the GPU has
    native bf16 (Ampere and later), else fp16 (T4, V100)."""
    if device.type != "cuda":
        if requested == "fp16":
            raise UserError("precision: fp16 needs a CUDA device (CPU autocast supports bf16); use auto, fp32 or bf16")
        return "fp32" if requested == "auto" else requested
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return "bf16" if bf16_supported else "fp16"
    if requested == "bf16" and not bf16_supported:
        raise UserError("precision: bf16, but this GPU has no native bf16 (compute capability < 8.0); use auto or fp16")
    return requested


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _TrainingForward(nn.Module):
    """Codes and codewords from one forward, so DDP sees every trained parameter used inside it."""

    def __init__(self, model: HashModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images), self.model.codewords()


def fit(
    config: TrainConfig,
    data: TrainData,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    callbacks: tuple[EpochCallback, ...] = (),
    progress: bool | None = None,
) -> FitResult:
    """Train, validate and checkpoint every epoch; return the best model by validation.

    Under torchrun (WORLD_SIZE > 1) every process trains on its own share of each epoch's
    permutation with DDP averaging the gradients; all of them validate (the weights are
    identical, so are their decisions) and only rank 0 checkpoints and calls the callbacks.
    A resumed run calls the callbacks for the restored epochs first, so its record (the MLflow
    run's curves) has every epoch, not only those trained since.
    """
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = select_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to the current device
    rank, world = distributed(device)
    listeners = callbacks if rank == 0 else ()
    precision = resolve_precision(config.precision, device)
    identity = config.identity(data.fingerprint)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    torch.manual_seed(config.seed)
    model = HashModel(config.model_config(len(data.class_names)), pretrained=config.pretrained)
    model.to(device, memory_format=memory_format)
    forward = _TrainingForward(model)
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    optimizer = _optimizer(config, model, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients underflow unscaled
    per_rank = len(data.train_images) // world  # equal shares: every rank takes as many steps
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    scheduler = _scheduler(config, optimizer, steps_per_epoch)
    margin = margin_for(config.margin, config.margin_relative, config.bits)
    monitor = "val_mAP" if len(data.val_images) else "train_loss"
    val_db = _validation_database(config, data)

    state = {"epoch": 0, "history": [], "best_value": None, "best_epoch": 0, "best_state": None, "finished": False,
             "hardware": [], "precision": []}
    checkpoint = Path(checkpoint_dir) / identity / "last.pt" if checkpoint_dir else None
    if checkpoint and resume and checkpoint.exists():
        state = _restore(checkpoint, identity, model, optimizer, scheduler, scaler)
        print(f"resuming from {checkpoint} after epoch {state['epoch']}")
        for metrics in state["history"]:
            for callback in listeners:
                callback(metrics["epoch"], metrics)
    resumed_from = state["epoch"]
    hardware = describe_hardware(device)

    amp = autocast(device, precision)
    from tqdm.auto import tqdm

    epochs = tqdm(range(state["epoch"], config.epochs), initial=state["epoch"], total=config.epochs,
                  desc="epochs", disable=_tqdm_disable(progress if rank == 0 else False), leave=False)
    for epoch in epochs:
        if state["finished"]:
            break
        t0 = time.perf_counter()
        for key, value in (("hardware", hardware), ("precision", precision)):
            if state[key][-1:] != [value]:  # a resume on another machine adds one
                state[key].append(value)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        model.train()
        order = torch.randperm(len(data.train_images), generator=generator)[: per_rank * world][rank::world]
        # this rank's batches, read ahead by the loader's workers while the model trains
        pixels = iter(stream_batches(data.train_images, list(order.split(config.batch_size)), config.loader_workers,
                                     pin_memory=device.type == "cuda"))
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0  # on the device: no per-step sync
        batches = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch + 1}",
                       disable=_tqdm_disable(progress if rank == 0 else False), leave=False)
        for start in batches:
            index = order[start : start + config.batch_size]
            images = _augment(next(pixels).to(device, non_blocking=True), config, generator)
            images = images.contiguous(memory_format=memory_format)
            labels = data.train_labels[index].to(device, torch.float32)
            with amp:
                codes, codewords = forward(images)
            if config.loss == "csq":
                loss = csq_loss(codes.float(), codewords.float(), labels, config.csq_quantization)
            else:
                loss = adalabelhash_loss(codes.float(), codewords.float(), labels, margin, config.floor_negatives)
                if config.centre_pull:  # the hinge stops at the margin; this keeps pulling every bit
                    centres = torch.where(codewords.detach().float() >= 0, 1.0, -1.0)
                    loss = loss + config.centre_pull * csq_loss(codes.float(), centres, labels, quantization=0.0)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach() * len(index)
            seen += len(index)
        totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if world > 1:  # every rank reports (and decides on) the same numbers
            torch.distributed.all_reduce(totals)
            for buffer in model.buffers():  # BatchNorm statistics of rank 0's last batch, everywhere
                torch.distributed.broadcast(buffer, 0)
        total_loss, seen = totals.tolist()  # the epoch's one host sync
        if not math.isfinite(total_loss):  # checked per epoch: a per-step check would sync every step
            raise UserError(f"training diverged: loss is {total_loss / seen} in epoch {epoch + 1}; lower lr / head_lr")
        metrics = {"epoch": epoch + 1, "train_loss": total_loss / seen, "lr": optimizer.param_groups[0]["lr"]}
        train_seconds = time.perf_counter() - t0
        metrics["train_images_per_s"] = seen / train_seconds
        if len(data.val_images):
            metrics.update(validate(model, data.val_images, data.val_labels, val_db[0], val_db[1], device, config))
        metrics["epoch_seconds"] = time.perf_counter() - t0
        _update_best(state, model, metrics, monitor)
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        stale = state["epoch"] - state["best_epoch"]
        state["finished"] = state["epoch"] == config.epochs or (config.patience > 0 and stale >= config.patience)
        if checkpoint and rank == 0:
            _save(checkpoint, identity, model, optimizer, scheduler, scaler, state)
        epochs.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("train_loss", "val_mAP")})
        for callback in listeners:
            callback(epoch + 1, metrics)

    model.load_state_dict(state["best_state"])
    model.eval()
    return FitResult(
        model=model, history=state["history"], best_epoch=state["best_epoch"], monitor=monitor,
        best_value=float(state["best_value"]), identity=identity, resumed_from_epoch=resumed_from,
        seconds=time.perf_counter() - started, stopped_early=state["epoch"] < config.epochs,
        hardware=", then ".join(state["hardware"]) or FitResult.hardware,
        precision=", then ".join(state["precision"]) or FitResult.precision,
    )


@torch.no_grad()
def encode(model: HashModel, images: ImageSource, device: torch.device, batch_size: int = 256,
           channels_last: bool = True, workers: int = 0) -> np.ndarray:
    """uint8 images (N, 3, H, W; any image source) -> tanh codes (N, K) as float32 numpy, in eval mode."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    index_batches = list(torch.arange(len(images)).split(batch_size))
    for pixels in stream_batches(images, index_batches, workers, pin_memory=device.type == "cuda"):
        batch = pixels.to(device, non_blocking=True).float().div_(255)
        out.append(model(batch.contiguous(memory_format=memory_format)).float().cpu())
    if not out:
        return np.zeros((0, model.config.bits), np.float32)
    return torch.cat(out).numpy()


def validate(model, val_images, val_labels, db_images, db_labels, device, config: TrainConfig) -> dict:
    from adalabelhash.metrics import nearest_codeword_classify, retrieval_metrics

    val_codes = encode(model, val_images, device, channels_last=config.channels_last, workers=config.loader_workers)
    db_codes = encode(model, db_images, device, channels_last=config.channels_last)
    val_packed, db_packed = pack_codes(val_codes), pack_codes(db_codes)
    result = retrieval_metrics(val_packed, val_labels.numpy(), db_packed, db_labels.numpy(), topk=(), precision_at=())
    predicted = nearest_codeword_classify(val_packed, pack_codes(model.codewords().detach().cpu()))
    hits = val_labels.numpy()[np.arange(len(predicted)), predicted] > 0
    return {"val_mAP": float(result["mAP"]), "val_codeword_accuracy": float(hits.mean())}


def _validation_database(config: TrainConfig, data: TrainData) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded subset of the training images for the val queries to be ranked against.

    Decoded once and kept: its size is `val_database_size`, not the dataset's."""
    n = len(data.train_images)
    size = min(config.val_database_size, n)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))[:size].sort().values
    return data.train_images[index], data.train_labels[index]


def _augment(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """uint8 batch -> float in [0, 1] with the reference's random shift and horizontal flip.

    `shift` alone is for data where a mirror image is another class (digits, text).

    Shifts pad with the edge pixels (Keras' fill_mode='nearest') and crop back, one random
    offset per image, as one gather for the whole batch.
    """
    x = images.float().div_(255)
    if config.augment == "none":
        return x
    b, _, h, w = x.shape
    if config.augment in ("shift_flip", "shift"):
        pad = int(round(config.shift * max(h, w)))
        if pad:
            padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
            dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            channel = torch.arange(3, device=x.device)[None, :, None, None]
            x = padded[batch, channel, rows, cols]
    if config.augment == "shift":
        return x
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _optimizer(config: TrainConfig, model: HashModel, fused: bool = False) -> torch.optim.Optimizer:
    """fused (CUDA): one kernel per step, and a GradScaler's inf check stays on the GPU (no host sync)."""
    head = model.head_parameters()
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [
        {"params": backbone, "lr": config.lr},
        {"params": head, "lr": config.head_lr or config.lr},
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=config.weight_decay, fused=fused or None)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused or None)
    return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay, fused=fused or None)


def _scheduler(config: TrainConfig, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * steps_per_epoch
    if config.schedule == "inverse_time":
        factor = InverseTimeDecay(config.lr_decay)
    elif config.schedule == "cosine":
        factor = CosineDecay(total)
    else:
        factor = InverseTimeDecay(0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class InverseTimeDecay:
    """Keras' `decay`: lr_t = lr / (1 + decay * t), t = iterations so far."""

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, step: int) -> float:
        return 1.0 / (1.0 + self.decay * step)


class CosineDecay:
    def __init__(self, total_steps: int):
        self.total_steps = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


def _update_best(state: dict, model: HashModel, metrics: dict, monitor: str) -> None:
    value = metrics[monitor]
    better = state["best_value"] is None or (value > state["best_value"] if monitor == "val_mAP" else value < state["best_value"])
    if better:
        state["best_value"] = value
        state["best_epoch"] = metrics["epoch"]
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save(path: Path, identity: str, model, optimizer, scheduler, scaler, state: dict) -> None:
    payload = {
        "format": "adalabelhash-checkpoint/1",
        "identity": identity,
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **state,
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, identity: str | None = None) -> dict:
    """Read a checkpoint safely (weights_only) and check it belongs to this configuration."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != "adalabelhash-checkpoint/1":
        raise UserError(f"{path}: not an adalabelhash checkpoint")
    if identity is not None and payload["identity"] != identity:
        raise UserError(
            f"{path}: checkpoint from another configuration or dataset "
            f"(identity {payload['identity']}, expected {identity}); delete it or train without resume"
        )
    return payload


def _restore(path: Path, identity: str, model, optimizer, scheduler, scaler) -> dict:
    payload = load_checkpoint(path, identity)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):  # fp16 only (a disabled scaler's state is empty)
        scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    state = {k: payload[k] for k in ("epoch", "history", "best_value", "best_epoch", "best_state", "finished")}
    # checkpoints before 2026-11-30 lack the hardware, before 2026-12-06 the precision
    return {**state, "hardware": payload.get("hardware", []), "precision": payload.get("precision", [])}


def _tqdm_disable(progress: bool | None) -> bool | None:
    """None lets tqdm decide (shown on a terminal, hidden in logs)."""
    return None if progress is None else not progress
