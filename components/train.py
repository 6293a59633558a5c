"""Step `train`: manifest + images -> model.pt (weights, codewords, config, class names) + curves."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from adalabelhash.train_config import TrainConfig

if TYPE_CHECKING:
    from adalabelhash.tracking import RunRef
    from adalabelhash.train import EpochCallback

TrainParams = TrainConfig  # params.yaml `train:` is the core training config, unchanged


def train(
    params: TrainConfig,
    manifest_path: Path,
    data_root: str | Path,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    cache_dir: Path | None = None,
    callbacks: tuple["EpochCallback", ...] = (),
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
    from adalabelhash.model import describe_codeword_init, save_model
    from adalabelhash.preprocess import decoded_cache
    from adalabelhash.streaming import DecodedFiles, MemmapImages
    from adalabelhash.train import TrainData, distributed, fit

    manifest = Manifest.load(manifest_path)
    frame = manifest.frame

    def split(name: str):
        """Read per batch: from the files, or from the memory-mapped decoded cache when there is one."""
        paths = manifest.files(data_root, name)
        if cache_dir is None:
            images = DecodedFiles(paths, params.image_size)
        else:
            hashes = list(frame.loc[frame[name], "sha256"])
            images = MemmapImages(decoded_cache(paths, hashes, params.image_size, cache_dir, params.decode_threads))
        return images, torch.from_numpy(manifest.label_matrix(name))

    train_images, train_labels = split("train")
    val_images, val_labels = split("val")
    data = TrainData(train_images, train_labels, val_images, val_labels, manifest.classes, manifest.fingerprint())
    result = fit(params, data, checkpoint_dir, resume=resume, callbacks=callbacks)

    summary = {
        "bits": params.bits,
        "backbone": params.backbone,
        "codeword_init": describe_codeword_init(params.codeword_init, len(manifest.classes), params.bits),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "monitor": result.monitor,
        "best_value": result.best_value,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "seconds": round(result.seconds, 2),
        # every epoch's time, including epochs trained before a resume
        "epoch_seconds_total": round(sum(epoch["epoch_seconds"] for epoch in result.history), 2),
        "train_images": len(train_images),
        "val_images": len(val_images),
        "dataset_fingerprint": manifest.fingerprint(),
        "identity": result.identity,
        "hardware": result.hardware,
        "precision": result.precision,
    }
    if distributed()[0] != 0:  # DDP: rank 0 writes the outputs
        return summary
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


TRACKED_SECTIONS = ("prepare", "validate", "train", "mlflow")  # what defines the model; later steps log their own


def train_tracked(all_params: dict, manifest_path: Path, data_root: str | Path, validation_dir: Path, out_dir: Path,
                  checkpoint_dir: Path | None = None, resume: bool = True, cache_dir: Path | None = None,
                  source: str = "dvc") -> tuple[dict, "RunRef"]:
    """`train` inside the pipeline: refuse data that failed the gate, start the MLflow run, log to it.

    With `train.processes` > 1 this launches torchrun (one process per GPU, gloo on CPU) running
    the same command; rank 0 of those does the tracking and writes the outputs.
    """
    from adalabelhash import tracking
    from adalabelhash.data.manifest import Manifest
    from adalabelhash.data.validation import require_passed
    from adalabelhash.params import parse_section
    from adalabelhash.train import distributed
    from adalabelhash.train_config import expected_gpus

    params = parse_section(TrainConfig, all_params.get("train"), "train")
    mlflow_params = parse_section(tracking.MlflowParams, all_params.get("mlflow"), "mlflow")
    fingerprint = Manifest.load(manifest_path).fingerprint()
    require_passed(validation_dir, fingerprint)  # and on this dataset version, not only on some data
    check_processes_fit_gpus(params.processes, expected_gpus())
    if params.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(params.processes, all_params, manifest_path, data_root, validation_dir, out_dir,
                                checkpoint_dir, resume, cache_dir)
    if distributed()[0] != 0:
        mlflow_params = tracking.MlflowParams(enabled=False)
    tags = tracking.provenance_tags(fingerprint, source)
    logged = {k: all_params[k] for k in TRACKED_SECTIONS if k in all_params}
    ref = tracking.start_run(mlflow_params, logged, tags, run_name=mlflow_params.run_name or f"{params.backbone}-{params.bits}bits")
    with tracking.step_status(ref):
        tracking.log_artifacts(ref, sorted(Path(validation_dir).glob("*")), "validation")
        summary = train(params, manifest_path, data_root, out_dir, checkpoint_dir, resume, cache_dir,
                        callbacks=(tracking.epoch_logger(ref),))
        tracking.log_metrics(ref, {"best_val_value": summary["best_value"], "best_epoch": summary["best_epoch"],
                                   "train_seconds": summary["seconds"]})
        tracking.set_tags(ref, {"train.hardware": summary["hardware"], "train.precision": summary["precision"]})
        tracking.log_artifacts(ref, [out_dir / n for n in ("history.csv", "curves.png", "train_summary.json")], "train")
    if distributed()[0] == 0:
        ref.save(out_dir)
    return summary, ref


def check_processes_fit_gpus(processes: int, gpus: int) -> None:
    """One DDP process per GPU the deployment gave: fewer would leave GPUs idle, more would share one."""
    from adalabelhash.errors import UserError

    if gpus and processes != gpus:
        raise UserError(f"train.processes is {processes} but kfp.train_gpus gives the train pod {gpus} GPU(s): "
                        "set them equal, one DDP process per GPU")


def _launch_torchrun(processes: int, all_params: dict, manifest_path, data_root, validation_dir, out_dir,
                     checkpoint_dir, resume, cache_dir) -> tuple[dict, "RunRef"]:
    import yaml

    from adalabelhash.errors import UserError
    from adalabelhash.fileio import read_json
    from adalabelhash.tracking import RunRef

    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(all_params))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "adalabelhash.cli", "train", "--params", str(params_file), "--manifest", str(manifest_path),
                   "--data-root", str(data_root), "--validation", str(validation_dir), "--out", str(out_dir)]
        command += ["--checkpoints", str(checkpoint_dir)] if checkpoint_dir else []
        command += ["--cache", str(cache_dir)] if cache_dir else []
        command += [] if resume else ["--no-resume"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))}
        if subprocess.run(command, env=env).returncode != 0:
            raise UserError(f"distributed training with {processes} processes failed (see the ranks' output above)")
    return read_json(Path(out_dir) / "train_summary.json"), RunRef.load(out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `train:` (and `mlflow:`)")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--validation", required=True, type=Path, help="output of the validate step (the gate must have passed)")
    parser.add_argument("--data-root", required=True, help="directory or URL (s3://...) the manifest paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output directory (model.pt, history.csv, ...)")
    parser.add_argument("--checkpoints", type=Path, help="per-epoch checkpoints, kept across runs for resuming")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--cache", type=Path, help="decode the images once into a memory-mapped cache here "
                        "(pays from the second epoch on; without it, every epoch decodes the files)")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_params

    summary, _ = train_tracked(load_params(args.params), args.manifest, args.data_root, args.validation, args.out,
                               args.checkpoints, not args.no_resume, args.cache)
    if "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports
    print(f"trained {summary['backbone']} {summary['bits']} bits: best {summary['monitor']} "
          f"{summary['best_value']:.4f} at epoch {summary['best_epoch']}/{summary['epochs_run']} "
          f"in {summary['seconds']:.0f} s -> {args.out}/model.pt")
