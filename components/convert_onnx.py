"""Step `convert-onnx`: model.pt -> model.onnx (one file, dynamic batch) + a bit-parity report.

The exported graph is image in [0, 1] (N, 3, S, S) -> tanh codes (N, K); with `flip_average` the
graph encodes each image and its mirror and returns the mean code (test-time flip: the same
input and output, twice the compute), so every consumer of model.onnx gets it. Parity is checked on
*bits*, the thing retrieval uses: onnxruntime must give the same bit as PyTorch wherever the
code is clearly away from 0, and nearly everywhere overall. The step fails otherwise.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from adalabelhash.tracking import RunRef

INPUT_NAME = "images"
OUTPUT_NAME = "codes"


@dataclass(frozen=True)
class ConvertOnnxParams:
    """params.yaml `convert_onnx:`."""

    parity_images: int = 64  # the first N query images of the manifest: a fixed real batch
    min_bit_agreement: float = 0.999  # overall; bits with |code| > confident_margin must all agree
    confident_margin: float = 1e-3
    flip_average: bool = False  # codes = mean over the image and its mirror; off for data that must not be mirrored
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the parity check's execution provider: set it as encode.device

    def __post_init__(self):
        if self.parity_images < 2:
            raise ValueError("parity_images must be >= 2 (the batch dimension is tested with 1 and N)")
        if not 0 < self.min_bit_agreement <= 1:
            raise ValueError(f"min_bit_agreement must be in (0, 1], got {self.min_bit_agreement}")
        if not self.confident_margin >= 0:
            raise ValueError(f"confident_margin must be >= 0, got {self.confident_margin}")


def convert_onnx(params: ConvertOnnxParams, model_path: Path, manifest_path: Path, data_root: str | Path, out_dir: Path) -> dict:
    import numpy as np
    import onnx
    import torch

    from adalabelhash.data.manifest import Manifest
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import atomic_directory, write_json
    from adalabelhash.model import load_model
    from adalabelhash.onnx_runtime import open_session
    from adalabelhash.preprocess import load_images, to_model_input

    loaded = load_model(model_path)
    model, size = loaded.model, loaded.image_size
    if params.flip_average:
        model = flip_averaged(model)
    manifest = Manifest.load(manifest_path)
    paths = manifest.files(data_root, "query")[: params.parity_images]
    if len(paths) < 2:
        raise UserError(f"{manifest_path}: need at least 2 query images for the parity check, found {len(paths)}")
    batch = to_model_input(load_images(paths, size))

    with atomic_directory(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        export_onnx(model, batch[:2], onnx_path)
        graph = onnx.load(onnx_path)
        onnx.checker.check_model(graph, full_check=True)
        batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
        if not batch_dim.dim_param or batch_dim.HasField("dim_value"):
            raise UserError(f"exported model has a fixed batch dimension ({batch_dim}); expected a symbolic one")

        with torch.no_grad():
            reference = model(torch.from_numpy(batch)).numpy()
        session = open_session(onnx_path, device=params.device)
        ort_codes = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        single = session.run([OUTPUT_NAME], {INPUT_NAME: batch[:1]})[0]
        provider = session.get_providers()[0]  # after the runs: onnxruntime may fall back to CPU inside run()
        report = parity_report(reference, ort_codes, params.confident_margin)
        report.update({
            "flip_average": params.flip_average,
            "images": len(batch),
            "image_size": size,
            "bits": int(reference.shape[1]),
            "batch_dim": batch_dim.dim_param,
            "batch_of_one_matches": bool(np.array_equal(single >= 0, ort_codes[:1] >= 0)),
            "provider": provider,  # the one that ran; "providers": its fallbacks after it
            "providers": session.get_providers(),
            "onnx_bytes": onnx_path.stat().st_size,
        })
        report["passed"] = bool(
            report["confident_agreement"] == 1.0
            and report["bit_agreement"] >= params.min_bit_agreement
            and report["batch_of_one_matches"]
        )
        if not report["passed"]:
            raise UserError(
                f"ONNX parity failed: bit agreement {report['bit_agreement']:.5f} (need >= {params.min_bit_agreement}), "
                f"confident bits {report['confident_agreement']:.5f} (need 1.0), batch of one ok: {report['batch_of_one_matches']}"
            )
        write_json(tmp / "parity.json", report)
    return report


def flip_averaged(model):
    """model -> a module whose codes are the mean of the image's and its horizontal mirror's."""
    import torch

    class FlipAveraged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            # One pass for both halves; sliced by the input's size (chunk(2) would fix the exported batch).
            codes = self.model(torch.cat([images, images.flip(3)]))
            return (codes[: images.shape[0]] + codes[images.shape[0]:]) / 2

    return FlipAveraged().eval()


def export_onnx(model, example, path: Path) -> None:
    """One self-contained file (weights inside), batch dimension symbolic."""
    import torch

    torch.onnx.export(
        model, (torch.as_tensor(example),), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=False, dynamo=True,
    )


def parity_report(reference, candidate, confident_margin: float) -> dict:
    import numpy as np

    same = (reference >= 0) == (candidate >= 0)
    confident = np.abs(reference) > confident_margin
    return {
        "bit_agreement": float(same.mean()),
        "confident_agreement": float(same[confident].mean()) if confident.any() else 1.0,
        "confident_bits": int(confident.sum()),
        "max_abs_diff": float(np.abs(reference - candidate).max()),
    }


def convert_onnx_tracked(params: ConvertOnnxParams, model_dir: Path, manifest_path: Path, data_root: str | Path,
                         codewords_dir: Path, out_dir: Path, upstream, monitor_params=None) -> tuple[dict, "RunRef"]:
    """Convert, then log the parity report and the ONNX model, with its codewords, class names and,
    given `monitor_params`, its reference profile beside it: the model's own data through its own
    encoder, what the monitor step compares a later dataset version with once it is champion."""
    from adalabelhash import tracking

    ref = tracking.attach(upstream, "convert_onnx", params)
    with tracking.step_status(ref):
        report = convert_onnx(params, Path(model_dir) / "model.pt", manifest_path, data_root, out_dir)
        tracking.log_metrics(ref, {"onnx_bit_agreement": report["bit_agreement"], "onnx_max_abs_diff": report["max_abs_diff"]})
        tracking.set_tags(ref, {"convert_onnx.provider": report["provider"]})
        tracking.log_artifacts(ref, [Path(out_dir) / "parity.json"], "onnx")
        extra = [Path(codewords_dir) / "codewords.json", Path(codewords_dir) / "codewords.npy"]
        if monitor_params is not None:
            from components.monitor import PROFILE_NAME, profile, write_profile

            reference = profile(monitor_params, manifest_path, data_root, Path(out_dir) / "model.onnx")
            write_profile(reference, Path(out_dir) / PROFILE_NAME)
            extra.append(Path(out_dir) / PROFILE_NAME)
        ref = tracking.log_onnx_model(ref, Path(out_dir) / "model.onnx", extra, report["image_size"])
    ref.save(out_dir)
    return report, ref


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `convert_onnx:`")
    parser.add_argument("--model", required=True, type=Path, help="output directory of the train step")
    parser.add_argument("--codewords", required=True, type=Path, help="output directory of export-codewords (MLflow run, codewords)")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--data-root", required=True, help="directory or URL (s3://...) the manifest paths are relative to")
    parser.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section
    from components.monitor import MonitorParams

    params = load_section(ConvertOnnxParams, "convert_onnx", args.params)
    report, _ = convert_onnx_tracked(params, args.model, args.manifest, args.data_root, args.codewords, args.out,
                                     args.codewords, load_section(MonitorParams, "monitor", args.params))
    print(f"model.onnx ({report['onnx_bytes'] / 1e6:.1f} MB, batch dim '{report['batch_dim']}'): bit agreement "
          f"{report['bit_agreement']:.5f}, max |diff| {report['max_abs_diff']:.2e} on {report['images']} images "
          f"({report['provider']}) -> {args.out}")
