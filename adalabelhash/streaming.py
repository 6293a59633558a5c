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
from typing import Iterator, Sequence, Union

import numpy as np
import torch


class DecodedFiles:
    """Image files, decoded (resized, centre-cropped) when a batch asks for them."""

    def __init__(self, paths: Sequence[str | Path], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self, index: list[int]) -> np.ndarray:
        """These images as uint8 N x H x W x 3."""
        from adalabelhash.preprocess import load_batch

        if not index:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return load_batch([self.paths[i] for i in index], self.size)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return _nchw(self.rows(index.tolist()))


class MemmapImages:
    """Rows of a decoded N x H x W x 3 uint8 array on disk, memory-mapped: only touched pages are read."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def rows(self, index: list[int]) -> np.ndarray:
        return np.ascontiguousarray(self.array[index])

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return _nchw(self.rows(index.tolist()))


ImageSource = Union[torch.Tensor, DecodedFiles, MemmapImages]


def stream_batches(images: ImageSource, index_batches: Sequence[torch.Tensor], workers: int = 0,
                   pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The uint8 batches `images[b]` for every `b` in order; `workers` processes read ahead.

    A tensor already in memory is indexed in this process. Workers exchange plain lists and
    numpy arrays with this process (pickled through a pipe): torch's tensor sharing passes file
    descriptors over a socket in $TMPDIR, which hangs where that path is too long for a socket.
    The loader has its own generator, so it never draws from torch's global RNG (which training
    and its checkpoints own).
    """
    if isinstance(images, torch.Tensor):
        batches = (images[b] for b in index_batches)
    else:
        batches = _loaded(images, [b.tolist() for b in index_batches], workers)
    return (batch.pin_memory() for batch in batches) if pin_memory else batches


def _loaded(source: DecodedFiles | MemmapImages, index_batches: list[list[int]], workers: int) -> Iterator[torch.Tensor]:
    from torch.utils.data import DataLoader

    loader = iter(DataLoader(_Rows(source), batch_size=None, sampler=index_batches, num_workers=workers,
                             collate_fn=_unchanged, generator=torch.Generator()))
    for remaining in range(len(index_batches) - 1, -1, -1):
        rows = next(loader)
        if not remaining:
            del loader  # the workers end with the last batch, not when the caller drops this generator
        yield _nchw(rows)


class _Rows:
    """A source as a map-style dataset whose items are whole batches (numpy, NHWC)."""

    def __init__(self, source: DecodedFiles | MemmapImages):
        self.source = source

    def __getitem__(self, index: list[int]) -> np.ndarray:
        return self.source.rows(index)


def _unchanged(batch: np.ndarray) -> np.ndarray:
    return batch


def _nchw(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows).permute(0, 3, 1, 2)
