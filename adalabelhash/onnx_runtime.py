"""onnxruntime sessions: CUDA when the GPU build and a GPU are present, else CPU."""

from __future__ import annotations

from pathlib import Path

from adalabelhash.errors import UserError


def open_session(path: str | Path, threads: int | None = None, prefer_gpu: bool = True):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'adalabelhash[cpu]' (or [gpu])") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if prefer_gpu and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{path}: onnxruntime cannot load it ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
