"""Step `train`: manifest + images -> model.pt (weights, codewords, config, class names) + curves."""

from __future__ import annotations

import argparse
from pathlib import Path

from adalabelhash.train import EpochCallback, TrainConfig

TrainParams = TrainConfig  # params.yaml `train:` is the core training config, unchanged


def train(
    params: TrainConfig,
    manifest_path: Path,
    data_root: Path,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    cache_dir: Path | None = None,
    callbacks: tuple[EpochCallback, ...] = (),
) -> dict:
    """Train on the manifest's `train` split, select on `val`; write the model and its curves.

    Outputs (written together: a failed run leaves `out_dir` as it was):
      model.pt            best-on-validation weights, codewords, config, class names
      history.csv         one row per epoch (DVC plots / MLflow metrics)
      train_summary.json  best epoch, monitored value, time, whether it stopped early
      curves.png          training loss and validation mAP per epoch
    """
    import torch

    from adalabelhash.data.manifest import Manifest
    from adalabelhash.fileio import atomic_directory, write_json
    from adalabelhash.model import save_model
    from adalabelhash.preprocess import load_images_cached
    from adalabelhash.train import TrainData, fit

    manifest = Manifest.load(manifest_path)
    frame = manifest.frame

    def split(name: str):
        rows = frame[frame[name]]
        paths = [Path(data_root) / p for p in rows["path"]]
        pixels = load_images_cached(paths, list(rows["sha256"]), params.image_size, cache_dir, params.decode_threads)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        return images, torch.from_numpy(manifest.label_matrix(name))

    train_images, train_labels = split("train")
    val_images, val_labels = split("val")
    data = TrainData(train_images, train_labels, val_images, val_labels, manifest.classes, manifest.fingerprint())
    result = fit(params, data, checkpoint_dir, resume=resume, callbacks=callbacks)

    summary = {
        "bits": params.bits,
        "backbone": params.backbone,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "monitor": result.monitor,
        "best_value": result.best_value,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "seconds": round(result.seconds, 2),
        "train_images": len(train_images),
        "val_images": len(val_images),
        "dataset_fingerprint": manifest.fingerprint(),
        "identity": result.identity,
    }
    with atomic_directory(out_dir) as tmp:
        save_model(tmp / "model.pt", result.model, manifest.classes, params.image_size,
                   extra={"history": result.history, "summary": summary})
        _write_history(tmp / "history.csv", result.history)
        write_json(tmp / "train_summary.json", summary)
        plot_curves(result.history, tmp / "curves.png")
    return summary


def _write_history(path: Path, history: list[dict]) -> None:
    import csv

    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [row["train_loss"] for row in history], label="train loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    if history and "val_mAP" in history[0]:
        right = ax.twinx()
        right.plot(epochs, [row["val_mAP"] for row in history], label="val mAP", color="tab:orange")
        right.set_ylabel("val mAP")
    fig.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads its `train:` section")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--data-root", required=True, type=Path, help="directory the manifest paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output directory (model.pt, history.csv, ...)")
    parser.add_argument("--checkpoints", type=Path, help="per-epoch checkpoints, kept across runs for resuming")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--cache", type=Path, help="directory for decoded-image caches")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section

    params = load_section(TrainConfig, "train", args.params)
    summary = train(params, args.manifest, args.data_root, args.out, args.checkpoints, not args.no_resume, args.cache)
    print(f"trained {summary['backbone']} {summary['bits']} bits: best {summary['monitor']} "
          f"{summary['best_value']:.4f} at epoch {summary['best_epoch']}/{summary['epochs_run']} "
          f"in {summary['seconds']:.0f} s -> {args.out}/model.pt")
