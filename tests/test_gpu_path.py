"""The GPU path's decisions, tested on CPU: the process group's backend, the device and precision
choice, the onnxruntime provider choice (with the provider lists onnxruntime reports) and the
Kubeflow GPU settings. What only a GPU can show is in benchmarks/gpu/check.sh."""

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import onnxruntime as ort
import pytest
import torch

from adalabelhash.errors import UserError
from adalabelhash.onnx_runtime import (CPU, CUDA, CUDA_OPTIONS, check_running_provider, make_cuda_loadable,
                                       open_session, requested_providers)
from adalabelhash.train import fit, load_checkpoint, process_group_backend, resolve_precision, select_device
from adalabelhash.train_config import EXPECTED_GPUS_ENV

FAST = dict(backbone="small_cnn", bits=16, image_size=16, lr=3e-3, batch_size=16, patience=0, val_database_size=64,
            threads=1)
ORT_GPU = ["TensorrtExecutionProvider", CUDA, CPU]  # what onnxruntime-gpu reports on a GPU machine
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")


# --- training: backend, device, precision, host syncs -----------------------------------------

def test_backend_follows_the_training_device():
    assert process_group_backend(torch.device("cpu")) == "gloo"
    # NCCL alone has no backend for CPU tensors: the group registers gloo for them
    assert process_group_backend(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"


@no_cuda
def test_device_auto_on_a_pod_given_gpus_fails_instead_of_using_the_cpu(monkeypatch):
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match=r"device: cuda was requested .* driver >= 580"):
        select_device("cuda")
    monkeypatch.setenv(EXPECTED_GPUS_ENV, "2")
    with pytest.raises(UserError, match=rf"given 2 GPU\(s\) \({EXPECTED_GPUS_ENV}\), but CUDA is unavailable: "
                                        r"torch .* sees 0 GPU\(s\).*driver >= 580"):
        select_device("auto")
    assert select_device("cpu") == torch.device("cpu")  # asked for by name: the user's choice


@pytest.mark.parametrize("requested, device, bf16, expected", [
    ("auto", "cpu", None, "fp32"),
    ("bf16", "cpu", None, "bf16"),  # CPU autocast has bf16 (fast with AMX)
    ("fp32", "cpu", None, "fp32"),
    ("auto", "cuda", True, "bf16"),  # Ampere and later
    ("auto", "cuda", False, "fp16"),  # T4, V100: fp16 with a GradScaler
    ("fp16", "cuda", True, "fp16"),
    ("fp32", "cuda", False, "fp32"),
])
def test_precision_choice(requested, device, bf16, expected):
    assert resolve_precision(requested, torch.device(device), bf16) == expected


def test_impossible_precisions_are_one_clear_error():
    with pytest.raises(UserError, match="precision: fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(UserError, match="precision: bf16, but this GPU has no native bf16"):
        resolve_precision("bf16", torch.device("cuda"), bf16_supported=False)
    from adalabelhash.params import parse_section
    from adalabelhash.train_config import TrainConfig

    with pytest.raises(UserError, match="params train.precision: 'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'"):
        parse_section(TrainConfig, {"precision": "fp8"}, "train")


def test_bf16_autocast_trains_on_cpu_and_is_recorded(tiny_train_data, tmp_path):
    from adalabelhash.train import TrainConfig

    result = fit(TrainConfig(**FAST, epochs=2, precision="bf16"), tiny_train_data, checkpoint_dir=tmp_path)
    assert result.precision == "bf16" and result.best_value > 0.5
    (last,) = tmp_path.glob("*/last.pt")
    assert load_checkpoint(last)["precision"] == ["bf16"]
    # precision, like the device, is not part of the identity: the fp32 config picks the bf16 run up
    again = fit(TrainConfig(**FAST, epochs=2, precision="fp32"), tiny_train_data, checkpoint_dir=tmp_path)
    assert again.resumed_from_epoch == 2 and again.precision == "bf16"  # finished: nothing trained in fp32


SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


def host_reads_during_fit(monkeypatch, data, batch_size: int) -> int:
    """How often our code read tensor values on the host (a GPU sync each) during one epoch of fit.

    torch's own reads are not counted: on CPU its Adam reads its step counter every step, the
    fused CUDA optimizer fit uses on a GPU does not (benchmarks/gpu/check.sh watches that with
    torch.cuda.set_sync_debug_mode)."""
    import sys

    from adalabelhash.train import TrainConfig

    package = str(Path(__file__).resolve().parents[1] / "adalabelhash")
    count = [0]
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            count[0] += sys._getframe(1).f_code.co_filename.startswith(package)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    fit(TrainConfig(**{**FAST, "batch_size": batch_size}, epochs=1), data)
    monkeypatch.undo()
    return count[0]


def test_training_steps_read_nothing_back_to_the_host(monkeypatch, tiny_train_data):
    # 96 images: 12 steps of 8 or 2 of 48. The reads are per epoch (totals, validation), not per step.
    assert host_reads_during_fit(monkeypatch, tiny_train_data, 8) == host_reads_during_fit(monkeypatch, tiny_train_data, 48)


# --- onnxruntime: provider choice, read back, recorded ----------------------------------------

def test_providers_requested_from_what_onnxruntime_reports():
    here = ort.get_available_providers()  # the CPU build: no CUDA provider
    assert CUDA not in here and CPU in here
    assert requested_providers("auto", here) == [CPU]
    assert requested_providers("cpu", ORT_GPU) == [CPU]
    assert requested_providers("auto", ORT_GPU) == requested_providers("cuda", ORT_GPU) == [(CUDA, CUDA_OPTIONS), CPU]
    assert CUDA_OPTIONS == {"use_tf32": "0"}  # parity and encode compare fp32 with fp32
    with pytest.raises(UserError, match="device: cuda, but this onnxruntime has no CUDA provider .*onnxruntime-gpu"):
        requested_providers("cuda", here)
    with pytest.raises(UserError, match="device must be one of auto, cpu, cuda"):
        requested_providers("gpu", here)


def test_the_provider_that_runs_is_checked_against_the_request():
    # onnxruntime-gpu falls back to CPU when its CUDA libraries do not load: get_providers() says so
    assert check_running_provider("cuda", [CUDA, CPU]) == CUDA
    assert check_running_provider("auto", [CPU]) == CPU
    with pytest.raises(UserError, match=r"CUDA provider did not load .*driver is too old .*\(CUDA 13 needs >= 580\)"):
        check_running_provider("cuda", [CPU])
    with pytest.raises(UserError, match=r"given 1 GPU\(s\), but onnxruntime runs on CPUExecutionProvider"):
        check_running_provider("auto", [CPU], expected_gpus=1)


def test_cuda_libraries_are_made_loadable_before_a_cuda_session():
    calls = []
    make_cuda_loadable(SimpleNamespace(preload_dlls=lambda: calls.append("preload")))  # onnxruntime >= 1.21
    assert calls == ["preload"]
    make_cuda_loadable(SimpleNamespace())  # older: torch loads the same libraries
    import sys

    assert "torch" in sys.modules


def test_sessions_and_steps_on_this_cpu_onnxruntime(trained, tmp_path, monkeypatch):
    from components.encode import EncodeParams, encode_shards

    assert open_session(trained["onnx"]).get_providers() == [CPU]
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        open_session(trained["onnx"], device="cuda")
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        encode_shards(EncodeParams(device="cuda"), trained["onnx"], trained["manifest"], trained["root"], tmp_path / "s")
    assert not (tmp_path / "s").exists()
    monkeypatch.setenv(EXPECTED_GPUS_ENV, "1")  # a Kubeflow GPU pod with the CPU onnxruntime
    with pytest.raises(UserError, match="this pod was given 1 GPU"):
        open_session(trained["onnx"])


def test_convert_onnx_records_its_provider_in_mlflow(trained, tmp_path):
    from mlflow import MlflowClient

    from adalabelhash import tracking
    from components.convert_onnx import ConvertOnnxParams, convert_onnx_tracked
    from components.encode import EncodeParams, encode, tag_providers

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref = tracking.start_run(tracking.MlflowParams(experiment="providers", tracking_uri=uri), {}, {}, "providers")
    report, ref = convert_onnx_tracked(ConvertOnnxParams(parity_images=16), trained["model"].parent, trained["manifest"],
                                       trained["root"], trained["codewords"], tmp_path / "onnx", ref)
    summary = encode(EncodeParams(shard_size=1000), tmp_path / "onnx" / "model.onnx", trained["manifest"],
                     trained["root"], tmp_path / "shards", tmp_path / "encoded")
    tag_providers(tmp_path / "onnx" / "model.onnx", summary)
    tags = MlflowClient(uri).get_run(ref.run_id).data.tags
    assert report["provider"] == tags["convert_onnx.provider"] == CPU
    assert tags["encode.providers"] == CPU

    failing = tracking.start_run(tracking.MlflowParams(experiment="providers", tracking_uri=uri), {}, {}, "failing")
    with pytest.raises(UserError), tracking.step_status(failing):
        raise UserError("device: auto, and this pod was given 1 GPU(s)")
    run = MlflowClient(uri).get_run(failing.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["adalabelhash.error"] == "UserError: device: auto, and this pod was given 1 GPU(s)"


# --- Kubeflow: one GPU count for the pod and the DDP processes, /dev/shm ----------------------

def compiled(tmp_path: Path, train: dict, kfp: dict):
    import yaml

    from adalabelhash.params import load_params
    from pipelines.pipeline import PARAMS, build_pipeline, compile_pipeline

    params = load_params(PARAMS)
    params = {**params, "train": {**params["train"], **train}, "kfp": {**params["kfp"], **kfp}}
    spec, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", build_pipeline(params)).read_text())
    return spec["deploymentSpec"]["executors"], platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_kfp_gpu_pods_know_their_gpus_and_get_shared_memory(tmp_path):
    executors, k8s = compiled(tmp_path, {"processes": 2}, {"train_gpus": 2, "encode_gpus": 1, "shm_size": "8Gi"})
    env = {name: {e["name"]: e["value"] for e in executors[name]["container"].get("env", [])} for name in executors}
    assert env["exec-train-model"][EXPECTED_GPUS_ENV] == "2"
    assert env["exec-encode-shard"][EXPECTED_GPUS_ENV] == "1"
    # the parity check runs on the provider the encode shards get
    convert = executors["exec-convert-onnx"]["container"]
    assert convert["resources"]["accelerator"]["resourceCount"] == "1" and env["exec-convert-onnx"][EXPECTED_GPUS_ENV] == "1"
    assert EXPECTED_GPUS_ENV not in env["exec-evaluate-retrieval"]
    shm = {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi"}
    assert k8s["exec-train-model"]["emptyDirMounts"] == k8s["exec-encode-shard"]["emptyDirMounts"] == [shm]


def test_kfp_refuses_gpus_and_processes_that_disagree(tmp_path, trained, monkeypatch):
    with pytest.raises(UserError, match=r"train.processes is 1 but kfp.train_gpus gives the train pod 4 GPU\(s\)"):
        compiled(tmp_path, {"processes": 1}, {"train_gpus": 4})
    executors, _ = compiled(tmp_path, {"processes": 2}, {"train_gpus": 0})  # 2 CPU processes on gloo: fine
    assert "accelerator" not in executors["exec-train-model"]["container"].get("resources", {})
    with pytest.raises(UserError, match="shm_size"):
        compiled(tmp_path, {}, {"shm_size": "lots"})

    # a submit-time override the compile never saw: the train step sees the pod's GPU count
    from components.train import train_tracked

    monkeypatch.setenv(EXPECTED_GPUS_ENV, "2")
    with pytest.raises(UserError, match=r"train.processes is 1 but kfp.train_gpus gives the train pod 2 GPU\(s\)"):
        train_tracked({"train": {"processes": 1}, "mlflow": {"enabled": False}}, trained["manifest"],
                      trained["root"], trained["work"] / "validate", tmp_path / "out")
    assert not (tmp_path / "out").exists()
