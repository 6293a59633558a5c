"""The AdaLabelHash model: backbone -> Linear -> tanh codes, plus one codeword per class.

Codewords are a C x K parameter seen through tanh (soft vertices of the K-cube) and train
together with the network (the reference's Keras `Embedding(C, K)` + tanh). With
`freeze_codewords` they are fixed +-1 vertices instead: the CSQ-style fixed-centre ablation
from the same code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from adalabelhash.backbones import build_backbone
from adalabelhash.codes import check_bits
from adalabelhash.errors import UserError

CodewordInit = Literal["uniform", "hadamard", "random"]

# Learnable codewords initialised at a vertex v start at tanh(v * VERTEX_LOGIT) = +-0.76:
# close to the vertex but not in tanh's flat tail, so they can still move.
VERTEX_LOGIT = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in checkpoints and model files."""

    backbone: str
    num_classes: int
    bits: int
    codeword_init: CodewordInit = "uniform"
    freeze_codewords: bool = False
    seed: int = 0

    def __post_init__(self):
        check_bits(self.bits)
        if self.num_classes < 2:
            raise UserError(f"need at least 2 classes, got {self.num_classes}")
        if self.codeword_init not in ("uniform", "hadamard", "random"):
            raise UserError(f"unknown codeword_init '{self.codeword_init}' (uniform, hadamard, random)")
        if self.freeze_codewords and self.codeword_init == "uniform":
            raise UserError("freeze_codewords needs vertex codewords: set codeword_init to hadamard or random")

    def to_dict(self) -> dict:
        return asdict(self)


class HashModel(nn.Module):
    """forward(images in [0, 1], NCHW RGB) -> tanh codes (N, K)."""

    def __init__(self, config: ModelConfig, pretrained: bool = False):
        super().__init__()
        self.config = config
        backbone = build_backbone(config.backbone, pretrained)
        self.backbone = backbone.module
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))
        self.hash_layer = nn.Linear(backbone.feature_dim, config.bits)
        init = initial_codewords(config.codeword_init, config.num_classes, config.bits, config.seed)
        if config.freeze_codewords:
            self.register_buffer("fixed_codewords", init)
            self.codeword_logits = None
        else:
            logits = init if config.codeword_init == "uniform" else init * VERTEX_LOGIT
            self.codeword_logits = nn.Parameter(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images - self.mean) / self.std)
        return torch.tanh(self.hash_layer(features))

    def codewords(self) -> torch.Tensor:
        """(C, K) class codewords in [-1, 1]."""
        if self.codeword_logits is None:
            return self.fixed_codewords
        return torch.tanh(self.codeword_logits)

    def head_parameters(self) -> list[nn.Parameter]:
        """Hash layer and codewords: trained with their own learning rate."""
        params = list(self.hash_layer.parameters())
        if self.codeword_logits is not None:
            params.append(self.codeword_logits)
        return params


def initial_codewords(kind: str, num_classes: int, bits: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "uniform":  # Keras Embedding's default init
        return torch.empty(num_classes, bits).uniform_(-0.05, 0.05, generator=generator)
    if kind == "random":
        return _random_vertices(num_classes, bits, generator)
    if kind == "hadamard":
        return hadamard_codewords(num_classes, bits, generator)
    raise UserError(f"unknown codeword_init '{kind}' (uniform, hadamard, random)")


def hadamard_codewords(num_classes: int, bits: int, generator: torch.Generator) -> torch.Tensor:
    """CSQ's centres: rows of a Sylvester Hadamard matrix and their negations.

    H_K exists for K a power of two. H's first column is constant (every class would share
    that bit), so it is replaced by a seeded random column. When 2K < C, or K is not a power
    of two (e.g. 48), CSQ falls back to random vertices; so do we, and say so in the name of
    the result via `describe_codeword_init`.
    """
    if not _is_power_of_two(bits) or num_classes > 2 * bits:
        return _random_vertices(num_classes, bits, generator)
    h = torch.ones(1, 1)
    while h.shape[0] < bits:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    rows = torch.cat([h, -h], 0)[:num_classes].clone()
    rows[:, 0] = _random_vertices(num_classes, 1, generator)[:, 0]
    return rows


def describe_codeword_init(kind: str, num_classes: int, bits: int) -> str:
    if kind == "hadamard" and (not _is_power_of_two(bits) or num_classes > 2 * bits):
        return "random (hadamard needs K a power of two and C <= 2K)"
    return kind


def _random_vertices(num_classes: int, bits: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (num_classes, bits), generator=generator).float() * 2 - 1


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def save_model(path, model: HashModel, class_names: list[str], image_size: int, extra: dict | None = None) -> None:
    """The final model file: weights + config + class names (+ anything the trainer adds)."""
    from adalabelhash.fileio import atomic_output

    payload = {
        "format": "adalabelhash-model/1",
        "config": model.config.to_dict(),
        "class_names": list(class_names),
        "image_size": int(image_size),
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


@dataclass
class LoadedModel:
    model: HashModel
    class_names: list[str]
    image_size: int
    extra: dict


def load_model(path) -> LoadedModel:
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors have many types
        raise UserError(f"{path}: not a readable model file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != "adalabelhash-model/1":
        raise UserError(f"{path}: not an adalabelhash model file")
    config = ModelConfig(**payload["config"])
    model = HashModel(config, pretrained=False)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    known = {"format", "config", "class_names", "image_size", "state_dict"}
    extra = {k: v for k, v in payload.items() if k not in known}
    return LoadedModel(model, payload["class_names"], payload["image_size"], extra)


def codewords_numpy(model: HashModel) -> np.ndarray:
    with torch.no_grad():
        return model.codewords().float().cpu().numpy()


def margin_for(margin: float, relative: bool, bits: int) -> float:
    """The hinge margin in inner-product units (scores live in [-K, K])."""
    value = margin * bits if relative else margin
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"margin must be a positive number, got {value}")
    return value
