"""Materialise a raw source as image files (what `adalabelhash get-data` writes under data/).

Each writer fills a temporary directory that replaces its target only when complete, so an
interrupted run never leaves a half-written tree for `dvc add` to record.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from adalabelhash.data.sources import CIFAR10_CLASSES
from adalabelhash.errors import UserError
from adalabelhash.fileio import atomic_directory


def write_digits(out: str | os.PathLike) -> dict[str, Any]:
    """scikit-learn's bundled digits (1,797 8x8 images, values 0-16) as `<digit>/<index>.png`.

    Grayscale scaled to 0-255. PNGs are written uncompressed (compress_level=0): the bytes then
    do not depend on the zlib build, so `data.dvc`'s md5 is the same on every machine.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    with atomic_directory(out) as tmp:
        for name in map(str, digits.target_names):
            (tmp / name).mkdir()
        for index, (image, target) in enumerate(zip(pixels, digits.target)):
            Image.fromarray(image).save(tmp / str(target) / f"{index:04d}.png", compress_level=0)
    return {"source": "digits", "out": str(out), "images": len(pixels), "classes": len(digits.target_names)}


def _member_path(member: tarfile.TarInfo, tarball: Path) -> str:
    """The member's relative path; links, devices, absolute and `..` names are refused."""
    name = member.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\\" in name or not parts:
        raise UserError(f"{tarball}: member {name!r} would be written outside the target directory")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{tarball}: member {name!r} is a link or special file; refusing to extract it")
    return os.path.join(*parts)


def extract_cifar10_tarball(tarball: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Extract an ImageFolder tarball (`train/<class>/*`, `test/<class>/*`, optionally under one
    top-level folder) into `out`.

    Members are checked and written one by one into a temporary directory (a bad member aborts
    and nothing reaches `out`); streaming skips tarfile's per-member metadata calls, which made
    `extractall` twice as slow on the 60,000 CIFAR files.
    """
    tarball = Path(tarball)
    digest = hashlib.sha256()
    try:
        with tarball.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        tar = tarfile.open(tarball)
    except FileNotFoundError:
        raise UserError(f"{tarball}: tarball not found") from None
    except tarfile.TarError as exc:
        raise UserError(f"{tarball}: not a readable tar archive ({exc})") from None
    files = 0
    with tar, atomic_directory(out) as tmp:
        folders = {str(tmp)}
        try:
            for member in tar:
                target = os.path.join(tmp, _member_path(member, tarball))
                folder = target if member.isdir() else os.path.dirname(target)
                if folder not in folders:
                    os.makedirs(folder, exist_ok=True)
                    folders.add(folder)
                if member.isfile():
                    with open(target, "wb") as f:
                        f.write(tar.extractfile(member).read())
                    files += 1
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{tarball}: extraction failed ({exc})") from None
        top = [p for p in tmp.iterdir() if not p.name.startswith(".")]
        if len(top) == 1 and (top[0] / "train").is_dir():  # one wrapping folder: lift its content
            for child in list(top[0].iterdir()):
                child.rename(tmp / child.name)
            top[0].rmdir()
        missing = [s for s in ("train", "test") if not (tmp / s).is_dir()]
        if missing:
            raise UserError(f"{tarball}: no {' and '.join(missing)}/ folder at the top of the archive "
                            f"(expected train/<class>/*.jpg and test/<class>/*.jpg)")
    return {"source": "cifar10", "out": str(out), "tarball": str(tarball), "tarball_sha256": digest.hexdigest(),
            "images": files}


def write_class_tree(folder: Path, images: np.ndarray, targets: list[int], classes: tuple[str, ...]) -> None:
    """uint8 (N, H, W, 3) images -> `folder/<class>/<NNNN>.png`, numbered per class in input order."""
    from PIL import Image

    counters = dict.fromkeys(range(len(classes)), 0)
    for name in classes:
        (folder / name).mkdir(parents=True)
    for image, target in zip(images, targets):
        Image.fromarray(image).save(folder / classes[target] / f"{counters[target]:04d}.png")
        counters[target] += 1


def download_cifar10(out: str | os.PathLike, cache_dir: str | os.PathLike) -> dict[str, Any]:
    """torchvision's CIFAR-10 (online) written as the same tree, lossless PNG instead of JPEG."""
    from torchvision.datasets import CIFAR10

    cache_dir = Path(cache_dir)
    with atomic_directory(out) as tmp:
        total = 0
        for split, train in (("train", True), ("test", False)):
            try:
                dataset = CIFAR10(cache_dir, train=train, download=True)
            except (OSError, RuntimeError) as exc:  # URLError is an OSError
                raise UserError(f"could not download CIFAR-10 ({exc}); offline, pass "
                                f"--tarball ../shared/datasets/cifar10-jpeg.tar.gz") from None
            if tuple(dataset.classes) != CIFAR10_CLASSES:
                raise UserError(f"torchvision CIFAR-10 classes {dataset.classes} differ from {CIFAR10_CLASSES}")
            write_class_tree(tmp / split, dataset.data, dataset.targets, CIFAR10_CLASSES)
            total += len(dataset.data)
    return {"source": "cifar10", "out": str(out), "download_cache": str(cache_dir), "images": total}
