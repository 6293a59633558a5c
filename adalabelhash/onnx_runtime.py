"""onnxruntime sessions on the execution provider a step's `device` asks for.

`device`: auto (CUDA when this onnxruntime has the CUDA provider and it loads, else CPU) | cpu |
cuda (CUDA or one clear error, never a quiet CPU run). convert-onnx and encode both open their
sessions here, so the parity check runs on the provider that encodes. The provider that really
runs is read back from the session (onnxruntime falls back to CPU when CUDA fails to load).
"""

from __future__ import annotations

from pathlib import Path

from adalabelhash.errors import UserError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
# onnxruntime's CUDA provider enables TF32 by default: 10-bit mantissas in convolutions. Off, so
# the parity check compares fp32 with the fp32 PyTorch reference, and encode runs what it certified.
CUDA_OPTIONS = {"use_tf32": "0"}
GPU_INSTALL = "install onnxruntime-gpu instead of onnxruntime (pip install 'adalabelhash[gpu]', the -gpu image)"


def requested_providers(device: str, available: list[str]) -> list:
    """The provider list for InferenceSession, from `device` and ort.get_available_providers()."""
    if device not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device != "cpu" and CUDA in available:
        return [(CUDA, CUDA_OPTIONS), CPU]
    if device == "cuda":
        raise UserError(f"device: cuda, but this onnxruntime has no CUDA provider (it has {', '.join(available)}): "
                        f"{GPU_INSTALL}")
    return [CPU]


def check_running_provider(device: str, running: list[str], expected_gpus: int = 0) -> str:
    """The provider that runs the model (session.get_providers()[0]); refuse a CPU run that should be CUDA."""
    provider = running[0]
    if provider == CUDA:
        return provider
    if device == "cuda":
        raise UserError(f"device: cuda, but onnxruntime's CUDA provider did not load (running {', '.join(running)}): "
                        "its CUDA / cuDNN libraries were not found, or the NVIDIA driver is too old for them "
                        "(CUDA 13 needs >= 580); onnxruntime's log above names the library")
    if device == "auto" and expected_gpus:
        raise UserError(f"device: auto, and this pod was given {expected_gpus} GPU(s), but onnxruntime runs on "
                        f"{provider}: {GPU_INSTALL}, with CUDA libraries and a driver that fit it")
    return provider


def make_cuda_loadable(ort) -> None:
    """The pip nvidia-* wheels' CUDA and cuDNN libraries are not on the loader's path: onnxruntime
    finds them after preload_dlls() (onnxruntime 1.21+) or once torch has loaded them."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    else:
        import torch  # noqa: F401  (loads the same libraries)


def open_session(path: str | Path, threads: int | None = None, device: str = "auto"):
    from adalabelhash.train_config import expected_gpus

    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'adalabelhash[cpu]' (or [gpu])") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    providers = requested_providers(device, ort.get_available_providers())
    if providers[0] != CPU:
        make_cuda_loadable(ort)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(f"{path}: onnxruntime cannot load it ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    check_running_provider(device, session.get_providers(), expected_gpus())
    return session
