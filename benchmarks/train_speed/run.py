"""Training throughput on this CPU: which backbone / image size / memory format / thread count
fits the quality benchmark's time budget, and what caching decoded images saves.

    python benchmarks/train_speed/run.py [--repeats 3] [--images 256]
    python benchmarks/train_speed/run.py --step-variants [--repeats 5]
    python benchmarks/train_speed/run.py --sources [--repeats 3] [--images 2560] [--size 64]

Training: the project's own `fit` (the loop `dvc repro` runs: augmentation, forward, loss,
backward, AdamW step) for one epoch over synthetic uint8 images, no validation; the number is
its `train_images_per_s`. Every configuration is measured once per round, rounds interleaved,
one warm-up round discarded, medians reported. Decoding: CIFAR-10 JPEGs decoded and resized by
`load_images` vs the same images read back from the memory-mapped uint8 cache (`decoded_cache`); skipped
when the shared dataset is absent. Prints a table and appends the result as JSON to runs/.
`--step-variants` instead times one training step (Lite0, 64 px, batch 64, 2 threads; the
project's model and loss, AdamW) three ways: eager fp32 (what `fit` runs), bf16 autocast on the
CPU, and the forward under `torch.compile`; alternated step by step, medians of `--repeats`.
`--sources` instead trains one epoch (Lite0 pretrained, batch 64, 2 threads) on `--images` real
CIFAR-10 training JPEGs read five ways: decoded whole into memory before training (the path
before streaming), the memory-mapped decoded cache, and the files decoded per batch with 0, 1
and 2 loader workers; rounds interleaved, one warm-up round discarded, medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
CIFAR = REPO / ".cache" / "cifar10"

# (backbone, pretrained, image size, channels_last, threads)
CONFIGS = [
    ("efficientnet_lite0", True, 64, True, 2),
    ("efficientnet_lite0", True, 64, False, 2),
    ("efficientnet_lite0", True, 64, True, 1),
    ("efficientnet_lite0", True, 96, True, 2),
    ("efficientnet_lite0", True, 96, False, 2),
    ("resnet18", False, 32, True, 2),
    ("resnet18", False, 64, True, 2),
]


def training_throughput(config: tuple, images: int) -> float:
    import torch

    from adalabelhash.train import TrainData, fit
    from adalabelhash.train_config import TrainConfig

    backbone, pretrained, size, channels_last, threads = config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.nn.functional.one_hot(torch.arange(images) % 10, 10).float()
    data = TrainData(pixels, labels, pixels[:0], labels[:0], [f"c{i}" for i in range(10)], "synthetic")
    train = TrainConfig(backbone=backbone, pretrained=pretrained, image_size=size, channels_last=channels_last,
                        threads=threads, bits=48, epochs=1, batch_size=64, optimizer="adamw", lr=3e-4,
                        head_lr=3e-3, schedule="cosine", patience=0, device="cpu")
    return fit(train, data, progress=False).history[0]["train_images_per_s"]


def decode_throughput(count: int) -> dict | None:
    import numpy as np

    from adalabelhash.preprocess import decoded_cache, load_images

    if not CIFAR.is_dir():
        return None
    paths = sorted(CIFAR.rglob("*.jpg"))[:count]
    hashes = [f"{path.relative_to(CIFAR)}" for path in paths]  # any stable per-image key
    out = {}
    for size in (64, 96):
        start = time.perf_counter()
        load_images(paths, size, threads=2, progress=False)
        out[f"decode_{size}px_images_per_s"] = len(paths) / (time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as cache:
            decoded_cache(paths, hashes, size, Path(cache), threads=2)  # fills the cache
            start = time.perf_counter()
            np.array(decoded_cache(paths, hashes, size, Path(cache), threads=2))  # every page read
            out[f"cached_{size}px_images_per_s"] = len(paths) / (time.perf_counter() - start)
    return out


def cifar_train_sample(count: int) -> list[Path]:
    """The first `count` training JPEGs of the shared CIFAR-10 tarball, in class-interleaved
    order, extracted once under .cache/ (name sorted: the same files every run)."""
    import tarfile

    tarball = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
    out = REPO / ".cache" / f"cifar10-train-{count}"
    if not (out / ".complete").exists():
        with tarfile.open(tarball) as tar:
            members = sorted((m for m in tar if m.isfile() and m.name.split("/")[0] == "train"), key=lambda m: m.name)
            per_class: dict[str, list] = {}
            for member in members:
                per_class.setdefault(member.name.split("/")[1], []).append(member)
            chosen = [m for group in zip(*per_class.values()) for m in group][:count]
            tar.extractall(out, members=chosen, filter="data")
        (out / ".complete").write_text("")
    return sorted(out.rglob("*.jpg"), key=lambda p: (p.stem, p.parent.name))[:count]


def source_throughput(paths: list[Path], size: int, repeats: int) -> dict[str, list[float]]:
    """`fit`'s img/s for one epoch with the images read five ways (decode time excluded for the
    in-memory path, which pays it once before training; included for the others)."""
    import dataclasses

    import torch

    from adalabelhash.preprocess import decoded_cache, load_images
    from adalabelhash.streaming import DecodedFiles, MemmapImages
    from adalabelhash.train import TrainData, fit
    from adalabelhash.train_config import TrainConfig

    classes = sorted({p.parent.name for p in paths})
    labels = torch.nn.functional.one_hot(torch.tensor([classes.index(p.parent.name) for p in paths]), len(classes))
    in_memory = torch.from_numpy(load_images(paths, size, threads=2, progress=False)).permute(0, 3, 1, 2)
    with tempfile.TemporaryDirectory() as cache:
        mapped = decoded_cache(paths, [str(p) for p in paths], size, Path(cache), threads=2)
        sources = {
            "in memory (decoded before training)": (in_memory, 0),
            "memory-mapped decoded cache": (MemmapImages(mapped), 0),
            "files, 0 workers": (DecodedFiles(paths, size), 0),
            "files, 1 worker": (DecodedFiles(paths, size), 1),
            "files, 2 workers": (DecodedFiles(paths, size), 2),
        }
        config = TrainConfig(backbone="efficientnet_lite0", pretrained=True, image_size=size, threads=2, bits=48,
                             epochs=1, batch_size=64, optimizer="adamw", lr=3e-4, head_lr=3e-3, schedule="cosine",
                             patience=0, device="cpu", augment="shift_flip")
        samples: dict[str, list[float]] = {name: [] for name in sources}
        for round_ in range(repeats + 1):
            for name, (images, workers) in sources.items():
                data = TrainData(images, labels, in_memory[:0], labels[:0], classes, "cifar")
                rate = fit(dataclasses.replace(config, loader_workers=workers), data, progress=False).history[0][
                    "train_images_per_s"]
                if round_:
                    samples[name].append(rate)
                print(f"round {round_} {name}: {rate:.1f} img/s", flush=True)
    return samples


def step_variants(repeats: int, steps: int = 5) -> dict:
    """Images per second of a training step: eager fp32, CPU bf16 autocast, torch.compile."""
    import contextlib

    import torch

    from adalabelhash.loss import adalabelhash_loss
    from adalabelhash.model import HashModel, ModelConfig
    from adalabelhash.train import _TrainingForward

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = HashModel(ModelConfig("efficientnet_lite0", 10, 48), pretrained=True).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-4)
    images = torch.rand(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    labels = torch.nn.functional.one_hot(torch.arange(64) % 10, 10).float()

    forward = _TrainingForward(model)  # fit's own forward: codes and codewords
    compiled = torch.compile(forward)
    variants = {
        "eager fp32": (forward, contextlib.nullcontext),
        "bf16 autocast": (forward, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "torch.compile": (compiled, contextlib.nullcontext),
    }

    def train_steps(run, precision) -> None:
        for _ in range(steps):
            with precision():
                codes, codewords = run(images)
            loss = adalabelhash_loss(codes.float(), codewords.float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    start = time.perf_counter()
    train_steps(*variants["torch.compile"])  # compiles (forward and backward graphs)
    compile_seconds = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, variant in variants.items():
            start = time.perf_counter()
            train_steps(*variant)
            if round_:  # round 0 warms up
                samples[name].append(steps * len(images) / (time.perf_counter() - start))
    return {"compile_seconds": compile_seconds, "images_per_s": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=256, help="training images per measurement (batch 64)")
    parser.add_argument("--decode-images", type=int, default=2000)
    parser.add_argument("--step-variants", action="store_true", help="only: fp32 vs bf16 autocast vs torch.compile")
    parser.add_argument("--sources", action="store_true", help="only: in-memory vs memory-mapped vs per-batch decoding")
    parser.add_argument("--size", type=int, default=64, help="--sources: image size")
    args = parser.parse_args()
    if args.sources:
        samples = source_throughput(cifar_train_sample(args.images), args.size, args.repeats)
        reference = statistics.median(samples["in memory (decoded before training)"])
        print(f"| images read ({args.size} px, Lite0, batch 64, 2 threads) | train img/s (median of {args.repeats}) "
              f"| vs in memory | runs |")
        print("|---|---|---|---|")
        for name, rates in samples.items():
            median = statistics.median(rates)
            print(f"| {name} | {median:.1f} | {median / reference:.2f} | {', '.join(f'{r:.1f}' for r in rates)} |")
        _append_result({"sources": samples, "size": args.size, "images": args.images,
                        "load_average": os.getloadavg()[0]})
        return
    if args.step_variants:
        result = step_variants(args.repeats)
        eager = statistics.median(result["images_per_s"]["eager fp32"])
        print(f"| training step | img/s (median of {args.repeats}) | vs eager fp32 | runs |")
        print("|---|---|---|---|")
        for name, rates in result["images_per_s"].items():
            median = statistics.median(rates)
            print(f"| {name} | {median:.1f} | {median / eager:.2f}x | {', '.join(f'{r:.1f}' for r in rates)} |")
        print(f"torch.compile's first steps, compiling included: {result['compile_seconds']:.0f} s")
        _append_result({"step_variants": result, "load_average": os.getloadavg()[0]})
        return

    samples: dict[tuple, list[float]] = {config: [] for config in CONFIGS}
    for round_ in range(args.repeats + 1):
        for config in CONFIGS:
            rate = training_throughput(config, args.images)
            if round_:  # round 0 warms caches and allocators
                samples[config].append(rate)
    load = os.getloadavg()[0]
    print(f"| backbone | pretrained | px | channels_last | threads | train img/s (median of {args.repeats}) | runs |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for config, rates in samples.items():
        median = statistics.median(rates)
        rows.append({"config": config, "median": median, "runs": rates})
        print(f"| {' | '.join(map(str, config))} | {median:.1f} | {', '.join(f'{r:.1f}' for r in rates)} |")
    decoding = decode_throughput(args.decode_images)
    if decoding:
        for key, value in decoding.items():
            print(f"{key}: {value:.0f}")
    print(f"1-min load average after the run: {load:.1f}")
    _append_result({"rows": rows, "decoding": decoding, "load_average": load})


def _append_result(result: dict) -> None:
    runs = Path(__file__).parent / "runs"
    runs.mkdir(exist_ok=True)
    with (runs / "results.jsonl").open("a") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **result}) + "\n")


if __name__ == "__main__":
    main()
