"""Image -> model input, identical for training, ONNX parity checks, bulk encoding and search.

An image is decoded to RGB, its shorter side resized to `size` (bicubic) and centre-cropped
to size x size, kept as uint8 HWC. The model itself takes float RGB in [0, 1], NCHW, and
applies its backbone's normalisation inside (so the ONNX file needs no separate recipe).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from adalabelhash.data.images import read_rgb, read_rgbs


def load_image(path: str | Path, size: int) -> np.ndarray:
    return fit_image(read_rgb(path), size)


def load_batch(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """`load_image` of each path -> uint8 (N, size, size, 3); objects at URLs are fetched together."""
    return np.stack([fit_image(image, size) for image in read_rgbs(paths)])


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image -> uint8 (size, size, 3): shorter side resized to `size`, centre crop."""
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_images(paths: Sequence[str | Path], size: int, threads: int = 4, progress: bool | None = None) -> np.ndarray:
    """Decode many images in parallel (PIL releases the GIL while decoding) -> (N, size, size, 3) uint8."""
    from tqdm.auto import tqdm

    out = np.empty((len(paths), size, size, 3), np.uint8)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = pool.map(lambda p: load_image(p, size), paths)
        for i, pixels in enumerate(tqdm(jobs, total=len(paths), desc="decode", disable=None if progress is None else not progress, leave=False)):
            out[i] = pixels
    return out


def decoded_cache(paths: Sequence[Path], hashes: Sequence[str], size: int, cache_dir: Path,
                  threads: int = 4, chunk: int = 1024) -> np.ndarray:
    """The images decoded once into an .npy file on disk, returned memory-mapped (read-only).

    Keyed by the files' content hashes and the size. Built `chunk` images at a time, so neither
    building nor reading it holds the decoded dataset in memory: pages come from the OS cache.
    """
    if not len(paths):
        return np.zeros((0, size, size, 3), np.uint8)
    # "upright": decoded with the EXIF orientation applied; caches from before that are not reused
    key = hashlib.sha256(f"{size}\nupright\n".encode() + "\n".join(hashes).encode()).hexdigest()[:24]
    cached = Path(cache_dir) / f"decoded-{size}px-{key}.npy"
    if not cached.exists():
        from adalabelhash.fileio import atomic_output

        with atomic_output(cached) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
            for start in range(0, len(paths), chunk):
                out[start : start + chunk] = load_images(paths[start : start + chunk], size, threads, progress=False)
            out.flush()
            del out
    return np.load(cached, mmap_mode="r")


def to_model_input(images_nhwc: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]: what the model and model.onnx take."""
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
