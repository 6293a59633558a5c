"""Training reads images per batch: the same weights from every image source, memory flat in the dataset size."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from adalabelhash.streaming import DecodedFiles, MemmapImages, stream_batches
from adalabelhash.train import TrainConfig, TrainData, fit

FAST = TrainConfig(backbone="small_cnn", bits=16, image_size=16, lr=3e-3, epochs=2, batch_size=16, patience=0,
                   val_database_size=64, threads=1, augment="shift_flip")


def write_pngs(images: torch.Tensor, folder) -> list:
    """uint8 N x 3 x H x W -> PNG files (lossless: decoding gives the same pixels back)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_files_memmap_and_tensor_train_the_same_weights(tiny_train_data, tmp_path):
    d = tiny_train_data
    files = TrainData(DecodedFiles(write_pngs(d.train_images, tmp_path / "train"), 16), d.train_labels,
                      DecodedFiles(write_pngs(d.val_images, tmp_path / "val"), 16), d.val_labels, d.class_names,
                      d.fingerprint)
    np.save(tmp_path / "train.npy", d.train_images.permute(0, 2, 3, 1).numpy())
    mapped = np.load(tmp_path / "train.npy", mmap_mode="r")
    memmap = replace(d, train_images=MemmapImages(mapped))
    reference = fit(FAST, d).model.state_dict()
    for data, workers in ((files, 2), (memmap, 0), (memmap, 1)):
        state = fit(replace(FAST, loader_workers=workers), data).model.state_dict()
        assert all(torch.equal(reference[k], state[k]) for k in reference), (type(data.train_images), workers)


def test_batches_come_in_order_and_only_the_rows_asked_for(tiny_train_data, tmp_path):
    images = tiny_train_data.train_images
    read = []

    class Recording(DecodedFiles):
        def rows(self, index):
            read.extend(index)
            return super().rows(index)

    source = Recording(write_pngs(images, tmp_path), 16)
    wanted = [torch.tensor([5, 1, 9]), torch.tensor([2]), torch.tensor([30, 31])]
    got = list(stream_batches(source, wanted, workers=0))
    assert [g.tolist() for g in got] == [images[w].tolist() for w in wanted]
    assert read == [5, 1, 9, 2, 30, 31]  # a DDP rank's share is all it decodes


PEAK_MEMORY = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    peak = [0]
    def sample():  # anonymous memory only: the memory-mapped cache's pages are file-backed
        while True:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()

    from components.train import train
    from adalabelhash.train import TrainConfig

    root, manifest, out, cache = map(Path, sys.argv[1:5])
    config = TrainConfig(backbone="small_cnn", bits=16, image_size=96, lr=1e-3, epochs=1, batch_size=32, patience=0,
                         val_database_size=64, threads=1, loader_workers=0, decode_threads=1, augment="none")
    time.sleep(0.05)
    before = peak[0]
    train(config, manifest, root, out, cache_dir=None if str(cache) == "-" else cache)
    time.sleep(0.05)
    print(json.dumps({"before": before, "peak": peak[0]}))
    """
)


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak anonymous memory of the train step at 400 and 3,200 images of 96 px (decoded: 11 vs 88 MB).

    Decoding a split whole (the old path) grows the peak by >= 77 MB; reading per batch, by the
    manifest's few MB. glibc is told to return large blocks at once, so that the peak measures
    what is held rather than what the allocator kept.
    """
    from components.prepare import PrepareParams, prepare

    rng = np.random.default_rng(0)
    peaks = {}
    for count in (400, 3200):
        root = tmp_path / f"data{count}"
        for c in range(4):
            colour = rng.integers(0, 256, 3)
            pixels = np.clip(colour + rng.integers(-20, 20, (count // 4, 64, 64, 3)), 0, 255).astype(np.uint8)
            write_pngs(torch.from_numpy(pixels).permute(0, 3, 1, 2), root / f"class{c}")
        prepare(PrepareParams(source="imagefolder", root=str(root), query_per_class=5, val_per_class=5),
                tmp_path / f"prepare{count}")
        for cache in ("-", str(tmp_path / "cache")):
            proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(root), str(tmp_path / f"prepare{count}/manifest.parquet"),
                                   str(tmp_path / f"out{count}"), cache], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            peaks[count, cache != "-"] = measured["peak"] - measured["before"]
    decoded_difference = (3200 - 400) * 96 * 96 * 3
    for cached in (False, True):
        growth = peaks[3200, cached] - peaks[400, cached]
        assert growth < decoded_difference / 3, (cached, growth / 2**20, peaks)


def test_loader_workers_under_a_long_tmpdir(tiny_train_data, tmp_path):
    """Workers hand batches back through a pipe: torch's tensor sharing needs a socket in $TMPDIR,
    whose path a deep TMPDIR (KFP's local runner) makes too long, and the loader then hung."""
    paths = write_pngs(tiny_train_data.train_images[:40], tmp_path / "images")
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    script = textwrap.dedent(f"""
        import torch
        from adalabelhash.streaming import DecodedFiles, stream_batches
        source = DecodedFiles({[str(p) for p in paths]!r}, 16)
        got = list(stream_batches(source, list(torch.arange(40).split(8)), workers=2))
        print(sum(len(b) for b in got))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(deep)})
    assert proc.returncode == 0 and proc.stdout.split() == ["40"], proc.stderr[-2000:]
