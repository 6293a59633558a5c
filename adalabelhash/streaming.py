"""Images for training, read per batch: nothing holds a whole split decoded in memory.

An image source is anything that `len()` measures and that, indexed with a 1-D tensor of
row numbers, returns those images as a uint8 N x 3 x H x W tensor. A decoded uint8 tensor is
one (what the tests and benchmarks hand `fit`); the train step uses the two below:
  DecodedFiles   decodes the image files of the batch (in DataLoader workers)
  MemmapImages   reads the batch's rows of the memory-mapped decoded cache (preprocess.decoded_cache)
`stream_batches` turns a source and a list of row-index batches into a stream of batches, decoded
ahead by worker processes and pinned for non-blocking copies to a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch


class DecodedFiles:
    """Image files, decoded (resized, centre-cropped) when a batch asks for them."""

    def __init__(self, paths: Sequence[str | Path], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        from adalabelhash.preprocess import load_image

        pixels = np.stack([load_image(self.paths[i], self.size) for i in index.tolist()]) if len(index) else \
            np.zeros((0, self.size, self.size, 3), np.uint8)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)


class MemmapImages:
    """Rows of a decoded N x H x W x 3 uint8 array on disk, memory-mapped: only touched pages are read."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index.numpy()])).permute(0, 3, 1, 2)


ImageSource = Union[torch.Tensor, DecodedFiles, MemmapImages]


def stream_batches(images: ImageSource, index_batches: Sequence[torch.Tensor], workers: int = 0,
            pin_memory: bool = False) -> Iterable[torch.Tensor]:
    """The uint8 batches `images[b]` for every `b` in order; `workers` processes read ahead.

    A tensor already in memory is indexed in this process. The loader has its own generator,
    so it never draws from torch's global RNG (which training and its checkpoints own).
    """
    from torch.utils.data import DataLoader

    return DataLoader(images, batch_size=None, sampler=index_batches,
                      num_workers=0 if isinstance(images, torch.Tensor) else workers,
                      pin_memory=pin_memory, generator=torch.Generator())

