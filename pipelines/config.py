"""Kubeflow settings shared by the pipeline (compile time) and the component bodies (run time).

Run time imports this module inside the image, where kfp.dsl has no `component`: keep it free
of kfp. It holds the container images and the params.yaml sections as KFP dict parameters.

Every component body imports the step functions from the image, so the image must hold this
exact code: its tag is the package version (bumped with the code), not a deployment choice in
params.yaml. Build and push them with the Dockerfile:
  docker build -t ghcr.io/ivclab-adalabelhash/adalabelhash:<version> .
  docker build --build-arg DEVICE=gpu -t ghcr.io/ivclab-adalabelhash/adalabelhash:<version>-gpu .
"""

import dataclasses
import importlib
from typing import Any, Optional

from adalabelhash import __version__

REPOSITORY = "ghcr.io/ivclab-adalabelhash/adalabelhash"
IMAGE = f"{REPOSITORY}:{__version__}"
GPU_IMAGE = f"{IMAGE}-gpu"  # steps given GPUs in params.yaml `kfp:` run in this one

# params.yaml step section -> (module, dataclass): the pipeline's dict parameters.
SECTIONS: dict[str, tuple[str, str]] = {
    "prepare": ("components.prepare", "PrepareParams"),
    "validate": ("components.validate", "ValidateParams"),
    "train": ("components.train", "TrainParams"),
    "export_codewords": ("components.export_codewords", "ExportCodewordsParams"),
    "convert_onnx": ("components.convert_onnx", "ConvertOnnxParams"),
    "encode": ("components.encode", "EncodeParams"),
    "evaluate": ("components.evaluate", "EvaluateParams"),
    "promote": ("components.promote", "PromoteParams"),
    "monitor": ("components.monitor", "MonitorParams"),
    "mlflow": ("adalabelhash.tracking", "MlflowParams"),
}


def section_class(name: str) -> type:
    module, cls = SECTIONS[name]
    return getattr(importlib.import_module(module), cls)


def section(name: str, values: Optional[dict]) -> Any:
    """A dict parameter as its step's dataclass.

    KFP carries dict parameters as protobuf Structs, whose numbers are doubles: the local runner
    hands `epochs: 10` over as 10.0. Integral floats become ints again before parse_section,
    which turns them back into floats where the field is a float.
    """
    from adalabelhash.params import parse_section

    return parse_section(section_class(name), _integral_to_int(values), name)


def to_parameter(name: str, values: Optional[dict]) -> dict:
    """A params.yaml section as a KFP dict parameter: checked, with its nulls left out.

    A Struct default cannot hold null; leaving the key out is the same value because the
    field's default is null (checked here).
    """
    from adalabelhash.errors import UserError

    section(name, values)
    defaults = {f.name: f.default for f in dataclasses.fields(section_class(name))}
    values = values or {}
    for key, value in values.items():
        if value is None and defaults[key] is not None:
            raise UserError(f"params {name}.{key}: null cannot be passed to Kubeflow (the default is {defaults[key]!r})")
    return {key: value for key, value in values.items() if value is not None}


def _integral_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_to_int(v) for v in value]
    return value


def image_root(dataset_metadata: dict) -> str:
    """Where the images of a prepared `dataset` artifact are read, for a step that reads them.

    The artifact holds the manifest, never the images: a non-digits source is read at the data
    root it was prepared from (the data PVC, mounted in every step that reads images, or a bucket
    URL, kept as the string it is); the embedded digits are generated here (deterministic: the
    manifest's hashes still match).
    """
    if dataset_metadata.get("data_root"):
        return dataset_metadata["data_root"]
    if dataset_metadata.get("source") == "digits":
        return embedded_digits()
    from adalabelhash.errors import UserError

    raise UserError("the dataset artifact names no data_root (prepared by another version of the pipeline?)")


def embedded_digits() -> str:
    """The digits as files in this pod's temp directory, written once (atomically) per pod."""
    import tempfile
    from pathlib import Path

    from components.get_data import get_data

    target = Path(tempfile.gettempdir()) / f"adalabelhash-digits-{__version__}"
    if not target.is_dir():
        get_data("digits", target)
    return str(target)
