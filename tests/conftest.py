"""Shared fixtures: the optional real dataset, and small real-image samples from it."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_tarball() -> Path:
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"real data absent: {CIFAR_TARBALL} (see ../shared/datasets/README.md)")
    return CIFAR_TARBALL


@pytest.fixture(scope="session")
def cifar_sample(cifar_tarball):
    """40 real CIFAR-10 test images of each of 5 classes, at 64 px: (float images NCHW, labels)."""
    import torch
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "ship"]
    per_class = 40
    taken: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    with tarfile.open(cifar_tarball) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test" and parts[-2] in taken:
                if len(taken[parts[-2]]) < per_class:
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    taken[parts[-2]].append(np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC)))
                if all(len(v) == per_class for v in taken.values()):
                    break
    images = np.stack([img for c in classes for img in taken[c]])
    labels = np.repeat(np.arange(len(classes)), per_class)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)


def synthetic_images(classes: int, per_class: int, size: int = 16, seed: int = 0):
    """Easy but not trivial images: a class-specific colour in the top or bottom half, plus noise.

    Nothing depends on left/right, so the horizontal flip augmentation keeps the class.

    Returns (uint8 images N x 3 x S x S, one-hot labels N x C) as torch tensors.
    """
    import torch

    colours = np.random.default_rng(1234).integers(40, 216, size=(classes, 3))  # the classes: same for every seed
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(classes * per_class, 3, size, size)).astype(np.int64)
    labels = np.repeat(np.arange(classes), per_class)
    half = size // 2
    for i, c in enumerate(labels):
        y = int(c) % 2
        images[i, :, y * half : (y + 1) * half, :] += colours[c][:, None, None]
    images = np.clip(images, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.nn.functional.one_hot(torch.from_numpy(labels), classes).to(torch.uint8)


@pytest.fixture
def tiny_train_data():
    from adalabelhash.train import TrainData

    train_x, train_y = synthetic_images(4, 24, seed=0)
    val_x, val_y = synthetic_images(4, 6, seed=1)
    return TrainData(train_x, train_y, val_x, val_y, ["a", "b", "c", "d"], fingerprint="synthetic-v1")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The embedded default dataset, materialised once per test session."""
    from components.get_data import get_data

    root = tmp_path_factory.mktemp("data") / "digits"
    get_data("digits", root)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, digits_root):
    """prepare -> validate -> train (tiny) -> export-codewords -> convert-onnx, without MLflow.

    Returns a dict of the paths; the tests of later steps build on it.
    """
    from components.convert_onnx import ConvertOnnxParams, convert_onnx
    from components.export_codewords import ExportCodewordsParams, export_codewords
    from components.prepare import PrepareParams, prepare
    from components.train import train
    from components.validate import ValidateParams, validate
    from adalabelhash.train import TrainConfig

    work = tmp_path_factory.mktemp("pipeline")
    prepare(PrepareParams(source="digits", root=str(digits_root), query_per_class=10, val_per_class=5), work / "prepare")
    manifest = work / "prepare" / "manifest.parquet"
    validate(ValidateParams(), manifest, work / "validate", digits_root)
    config = TrainConfig(backbone="small_cnn", bits=16, image_size=16, lr=3e-3, schedule="cosine", epochs=3,
                         batch_size=64, patience=0, augment="shift", val_database_size=300, threads=2)
    train(config, manifest, digits_root, work / "train")
    export_codewords(ExportCodewordsParams(), work / "train" / "model.pt", work / "codewords")
    convert_onnx(ConvertOnnxParams(parity_images=16), work / "train" / "model.pt", manifest, digits_root, work / "onnx")
    return {"work": work, "root": digits_root, "manifest": manifest, "model": work / "train" / "model.pt",
            "onnx": work / "onnx" / "model.onnx", "codewords": work / "codewords", "config": config}


@pytest.fixture(scope="session")
def encoded(trained, tmp_path_factory):
    """The `trained` model's encode output (codes.npz, database.faiss)."""
    from components.encode import EncodeParams, encode

    out = tmp_path_factory.mktemp("encoded")
    encode(EncodeParams(), trained["onnx"], trained["manifest"], trained["root"], out / "shards", out / "encode")
    return out / "encode"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` (mlflow/serve-local.sh: sqlite + served artifacts) on loopback for the
    session (~30 s to start). Webhooks may call loopback, and its webhook list is cached for 1 s, not 60."""
    import requests

    store = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_STORE_DIR": str(store),
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    log = open(store / "server.log", "w")
    proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "serve-local.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # ~30 s on a quiet 2-core machine
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:  # refused or not answering yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            pytest.fail(f"mlflow server did not come up: {(store / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
