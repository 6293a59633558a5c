"""The parts of the GPU check (check.sh runs each as its own bounded process): python check.py PART OUT_DIR.

Each part prints what it measured and writes OUT_DIR/<part>.json. GPU_CHECK_CPU=1 rehearses
them on a CPU with tiny sizes, saying which GPU-only steps it skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

CPU_REHEARSAL = os.environ.get("GPU_CHECK_CPU") == "1"
WORK = REPO / ".cache" / "gpu-check"
CIFAR = REPO / ".cache" / "cifar10"  # where benchmarks/quality/presets.yaml looks for it
TARBALLS = [REPO / ".gpu-check" / "cifar10-jpeg.tar.gz", REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"]
PER_CLASS = 24 if CPU_REHEARSAL else 300  # the subset of parts 1-3: CIFAR-10 training images per class
SIZE = 32 if CPU_REHEARSAL else 224
BATCH = 16 if CPU_REHEARSAL else 128
SUBSET = WORK / "subset"
MANIFEST = WORK / "prepare" / "manifest.parquet"


def skip(what: str) -> None:
    print(f"SKIPPED on the CPU rehearsal (GPU_CHECK_CPU=1): {what}")


def save(out: Path, part: str, result: dict) -> None:
    (out / f"{part}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{part}: {json.dumps(result)}")


def train_config(**overrides):
    from adalabelhash.train_config import TrainConfig

    # EfficientNet-Lite0 as in the quality benchmark; ImageNet weights only matter for quality (part 4).
    # The rehearsal takes one thread: two on the shared 2-core machine ran 10x slower.
    base = dict(backbone="efficientnet_lite0", pretrained=False, bits=48, image_size=SIZE, optimizer="adamw",
                lr=3e-4, head_lr=3e-3, weight_decay=1e-4, schedule="cosine", batch_size=BATCH, augment="shift_flip",
                shift=0.125, patience=0, val_database_size=500, epochs=2, decode_threads=16,
                device="cpu" if CPU_REHEARSAL else "cuda", precision="bf16", threads=1 if CPU_REHEARSAL else None)
    return TrainConfig(**{**base, **overrides})


def env(out: Path) -> None:
    import platform

    import onnxruntime
    import torch

    result = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "cuda_available": torch.cuda.is_available(), "onnxruntime": onnxruntime.__version__,
              "ort_providers": onnxruntime.get_available_providers(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        result.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                      bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                      nccl=".".join(map(str, torch.cuda.nccl.version())) if isinstance(torch.cuda.nccl.version(), tuple)
                      else str(torch.cuda.nccl.version()))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        result["driver"] = smi.stdout.strip() or smi.stderr.strip()
    elif not CPU_REHEARSAL:
        from adalabelhash.train import cuda_unavailable_reason

        raise SystemExit(f"error: no CUDA: {cuda_unavailable_reason()}")
    save(out, "env", result)


def data(out: Path) -> None:
    """CIFAR-10 extracted once (part 4 uses all of it), and an ImageFolder subset of its training images."""
    from components.get_data import get_data
    from components.prepare import PrepareParams, prepare

    if not (CIFAR / "train").is_dir():
        tarball = next((t for t in TARBALLS if t.is_file()), None)
        if tarball is None:
            raise SystemExit(f"error: no CIFAR-10 tarball at {' or '.join(map(str, TARBALLS))} (check.sh pack)")
        get_data("cifar10", CIFAR, tarball=tarball)
    shutil.rmtree(WORK, ignore_errors=True)
    for folder in sorted((CIFAR / "train").iterdir()):
        (SUBSET / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:PER_CLASS]:
            shutil.copyfile(image, SUBSET / folder.name / image.name)
    summary = prepare(PrepareParams(source="imagefolder", root=str(SUBSET), query_per_class=PER_CLASS // 6,
                                    val_per_class=PER_CLASS // 6), MANIFEST.parent)
    save(out, "data", {"images": summary["images"], "classes": summary["classes"], "per_class": PER_CLASS})


def train(out: Path) -> None:
    """Part 1: one GPU, bf16 (then fp16 with its GradScaler): img/s of the last epoch, peak GPU memory."""
    import torch

    from components.train import train as train_step

    result = {}
    runs = (("bf16", 2), ("fp16", 1))
    if CPU_REHEARSAL:  # CPU autocast of EfficientNet's depthwise convolutions in bf16 crawls (4.6 img/s here)
        skip("bf16, and fp16 + GradScaler: the rehearsal trains with precision auto (fp32 on CPU)")
        runs = (("auto", 2),)
    for precision, epochs in runs:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        target = WORK / f"train-{precision}"
        summary = train_step(train_config(precision=precision, epochs=epochs), MANIFEST, SUBSET, target,
                             cache_dir=WORK / "decoded")
        history = json.loads((target / "train_summary.json").read_text())  # what the step wrote
        rows = (target / "history.csv").read_text().splitlines()
        columns = rows[0].split(",")
        last = dict(zip(columns, rows[-1].split(",")))
        result[precision] = {
            "precision": summary["precision"], "hardware": summary["hardware"], "epochs": history["epochs_run"],
            "train_images": summary["train_images"], "image_size": SIZE, "batch_size": BATCH,
            "img_per_s_last_epoch": round(float(last["train_images_per_s"]), 1),
            "epoch_seconds": [round(float(dict(zip(columns, r.split(",")))["epoch_seconds"]), 2) for r in rows[1:]],
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "best_val_mAP": round(summary["best_value"], 4),
        }
    save(out, "train", result)


RANK = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from benchmarks.gpu.check import MANIFEST, SUBSET, WORK, train_config
from components.train import train
device = {device!r}
small = {{}} if device == "cuda" else {{"backbone": "small_cnn", "image_size": 32, "batch_size": 32}}  # CPU: the backend, not speed
summary = train(train_config(epochs=1, processes=2, device=device, precision="auto", val_database_size=200, **small),
                MANIFEST, SUBSET, WORK / "ddp-{tag}", cache_dir=WORK / "decoded")
# the group the training made takes tensors of both kinds: NCCL for CUDA, gloo for CPU
checked = {{}}
for kind in (["cuda", "cpu"] if device == "cuda" else ["cpu"]):
    t = torch.ones(1, device=torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else "cpu")
    dist.all_reduce(t)
    checked[kind] = t.item()
line = f"rank {{dist.get_rank()}}: backend {{dist.get_backend()}}, all_reduce {{checked}}, hardware {{summary['hardware']}}"
(WORK / f"ddp-{tag}-rank{{dist.get_rank()}}.txt").write_text(line)
print(line)
"""


def ddp(out: Path) -> None:
    """Part 2: DDP in 2 processes. NCCL refuses two ranks on one GPU ("Duplicate GPU detected",
    NCCL >= 2.5), so with one GPU: the NCCL+gloo group in one process, then 2 processes on gloo with
    device cpu on this GPU host (the case that used to pick NCCL for a CPU model)."""
    import torch

    gpus = torch.cuda.device_count()
    result = {"gpus": gpus}
    if gpus:
        result["one_process_nccl_gloo_group"] = one_process_group()
    else:
        skip("the NCCL + gloo process group (no CUDA)")
    runs = [("cuda", "nccl")] if gpus >= 2 else []
    if gpus == 1:
        print("one GPU: NCCL allows one rank per GPU, so the 2-process NCCL run needs a 2-GPU machine")
    runs.append(("cpu", "gloo"))
    for device, tag in runs:
        script = WORK / f"rank-{tag}.py"
        script.write_text(RANK.format(repo=str(REPO), device=device, tag=tag))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=240)
        print(proc.stdout[-2000:], proc.stderr[-3000:] if proc.returncode else "", sep="\n")
        result[f"2_processes_{device}_{tag}"] = {"exit": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
                                                 "ranks": [p.read_text() for p in sorted(WORK.glob(f"ddp-{tag}-rank*.txt"))]}
    save(out, "ddp", result)
    if any(v["exit"] for k, v in result.items() if k.startswith("2_processes")):
        raise SystemExit("error: a DDP run failed (its output is above)")


def one_process_group() -> dict:
    import tempfile

    import torch
    import torch.distributed as dist

    from adalabelhash.train import process_group_backend

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    backend = process_group_backend(device)
    dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    values = {}
    for tensor in (torch.ones(2, device=device), torch.ones(2)):
        dist.all_reduce(tensor)
        values[tensor.device.type] = tensor.tolist()
    dist.destroy_process_group()
    return {"backend": backend, "all_reduce": values}


def onnx(out: Path) -> None:
    """Part 3: convert-onnx and encode with the CPU-only onnxruntime; torch's GPU inference on the same images."""
    import torch

    from adalabelhash.data.manifest import Manifest
    from adalabelhash.errors import UserError
    from adalabelhash.model import load_model
    from adalabelhash.preprocess import load_images, to_model_input
    from components.convert_onnx import ConvertOnnxParams, convert_onnx
    from components.encode import EncodeParams, encode_shards

    model_path = WORK / f"train-{'auto' if CPU_REHEARSAL else 'bf16'}" / "model.pt"  # part 1's model
    report = convert_onnx(ConvertOnnxParams(parity_images=64), model_path, MANIFEST, SUBSET, WORK / "onnx")
    onnx_path = WORK / "onnx" / "model.onnx"
    result = {"parity": {k: report[k] for k in ("provider", "bit_agreement", "confident_agreement", "max_abs_diff", "passed")}}
    for shards in ("shards-cuda", "shards-auto"):  # a rerun of this part encodes again, not resumes
        shutil.rmtree(WORK / shards, ignore_errors=True)
    try:
        encode_shards(EncodeParams(device="cuda"), onnx_path, MANIFEST, SUBSET, WORK / "shards-cuda")
        result["encode_device_cuda"] = "ran: expected the clear error of a CPU-only onnxruntime"
    except UserError as exc:
        result["encode_device_cuda"] = f"error: {exc}"
    encoded = encode_shards(EncodeParams(device="auto", batch_size=BATCH, decode_threads=8), onnx_path, MANIFEST,
                            SUBSET, WORK / "shards-auto")
    result["encode_auto"] = {"provider": encoded["provider"], "images": encoded["images"],
                             "ort_img_per_s": round(encoded["images"] / encoded["inference_seconds"], 1)}
    if not torch.cuda.is_available():
        skip("torch's GPU inference img/s")
    else:
        manifest = Manifest.load(MANIFEST)
        frame = manifest.frame
        paths = [SUBSET / p for p in frame.loc[frame["query"] | frame["database"], "path"]]
        images = torch.from_numpy(to_model_input(load_images(paths, SIZE))).pin_memory()  # copies at full speed
        model = load_model(model_path).model.cuda().eval().to(memory_format=torch.channels_last)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as the parity
        for precision in ("fp32", "bf16"):
            result[f"torch_gpu_{precision}_img_per_s"] = torch_img_per_s(model, images, precision)
    save(out, "onnx", result)
    if not result["encode_device_cuda"].startswith("error: device: cuda") or result["encode_auto"]["provider"] != "CPUExecutionProvider":
        raise SystemExit("error: encode's provider choice did not behave as the CPU-only onnxruntime requires")


def torch_img_per_s(model, images, precision: str) -> float:
    import torch

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def batches():
        for start in range(0, len(images), BATCH):
            yield images[start : start + BATCH].cuda(non_blocking=True).contiguous(memory_format=torch.channels_last)

    with torch.no_grad(), autocast:
        for batch in batches():  # warm-up: cuDNN picks its kernels
            model(batch)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches():
            model(batch)
        torch.cuda.synchronize()
    return round(len(images) / (time.perf_counter() - started), 1)


def quality(out: Path, seconds: float) -> None:
    """Part 4: the protocol I, 48-bit, 224 px reference-loss row, with as many epochs as the time left allows."""
    measured = next(iter(json.loads((out / "train.json").read_text()).values()))["img_per_s_last_epoch"]  # bf16
    train_images, fixed = 4750, 180  # protocol I's training split; prepare, export, convert, encode 60,000, evaluate
    per_epoch = train_images / measured + 5000 / (measured * 3)  # + validation against 5,000 training images
    epochs = max(1, min(15, int((seconds - fixed) / per_epoch)))
    command = [sys.executable, "benchmarks/quality/run.py", "--protocol", "I", "--method", "adalabelhash", "--bits", "48",
               "--preset", "gpu", "--epochs", str(epochs), "--tag", "gpucheck", "-S", "mlflow.enabled=false"]
    if CPU_REHEARSAL:  # the same command, shrunk to fit a 2-core CPU
        command += ["-S", "train.device=cpu", "-S", "train.image_size=16", "-S", "train.backbone=small_cnn",
                    "-S", "train.pretrained=false", "-S", "train.val_database_size=200", "-S", "train.threads=1",
                    "-S", "encode.batch_size=256", "-S", "encode.decode_threads=2"]
        epochs = 1
        command[command.index("--epochs") + 1] = "1"
    print(f"{epochs} epoch(s) fit in {seconds:.0f} s at {measured} img/s: {' '.join(command)}")
    results = REPO / "benchmarks" / "quality" / "results.jsonl"
    before = results.read_text()
    try:
        finished = f"exit {subprocess.run(command, timeout=seconds).returncode}"
    except subprocess.TimeoutExpired:
        finished = f"stopped after {seconds:.0f} s: did not finish"
    rows = results.read_text()[len(before):]
    (out / "results-gpu.jsonl").write_text(rows)
    if CPU_REHEARSAL:
        results.write_text(before)  # a rehearsal row is no result
    save(out, "quality", {"run": finished, "epochs": epochs, "rows": [json.loads(r) for r in rows.splitlines()]})


def main() -> None:
    part, out = sys.argv[1], Path(sys.argv[2]).resolve()
    parts = {"env": env, "data": data, "train": train, "ddp": ddp, "onnx": onnx}
    if part == "quality":
        quality(out, float(sys.argv[3]))
    else:
        parts[part](out)


if __name__ == "__main__":
    main()
