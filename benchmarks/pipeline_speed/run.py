"""Pipeline speed: wall time of each `dvc repro` stage on the embedded default, and onnxruntime
vs PyTorch eager encoding throughput on the same images and threads.

    python benchmarks/pipeline_speed/run.py [--repeats 5]

Stage times: a temporary git + DVC copy of the repository, the digits materialised, then
`dvc repro --single-item <stage>` for each stage in order (CLI start-up included, as a user sees
it). Encoding: the same decoded images, batch 64, one model exported by the convert-onnx code,
PyTorch eager (channels_last, no_grad) vs onnxruntime (CPU provider), each at 1 and 2 threads,
and onnxruntime on the same model exported with `convert_onnx.flip_average` (image + mirror);
interleaved repeats, medians. Prints a table and appends it as JSON to runs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
STAGES = ["prepare", "validate", "train", "export_codewords", "convert_onnx", "encode", "evaluate", "promote"]


def stage_times() -> dict[str, float]:
    from components.get_data import get_data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split()
        for name in files:
            if (REPO / name).is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, root / name)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
            subprocess.run(cmd, cwd=root, env=env, check=True)
        get_data("digits", root / "data" / "digits")
        times = {}
        for stage in STAGES:
            start = time.perf_counter()
            subprocess.run(["dvc", "repro", "--single-item", stage], cwd=root, env=env, check=True,
                           capture_output=True)
            times[stage] = round(time.perf_counter() - start, 1)
        times["total"] = round(sum(times.values()), 1)
        return times


def encoding_throughput(repeats: int) -> list[dict]:
    import numpy as np
    import onnxruntime as ort
    import torch

    from adalabelhash.model import HashModel, ModelConfig
    from components.convert_onnx import export_onnx, flip_averaged

    rng = np.random.default_rng(0)
    rows = []
    for backbone, size, pretrained in (("efficientnet_lite0", 64, True), ("small_cnn", 32, False)):
        model = HashModel(ModelConfig(backbone, 10, 48), pretrained=pretrained).eval()
        images = rng.random((512, 3, size, size), dtype=np.float32)  # the same input for both engines
        with tempfile.TemporaryDirectory() as tmp:
            path, flip_path = Path(tmp) / "model.onnx", Path(tmp) / "flip.onnx"
            export_onnx(model, images[:2], path)
            export_onnx(flip_averaged(model), images[:2], flip_path)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session, flip_session = (ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                                         for p in (path, flip_path))
                model_cl = model.to(memory_format=torch.channels_last)

                def run_torch():
                    with torch.no_grad():
                        for start in range(0, len(images), 64):
                            model_cl(torch.from_numpy(images[start:start + 64]).contiguous(memory_format=torch.channels_last))

                def ort_runner(engine):
                    def run():
                        for start in range(0, len(images), 64):
                            engine.run(None, {"images": images[start:start + 64]})
                    return run

                engines = {"torch": run_torch, "ort": ort_runner(session), "ort_flip": ort_runner(flip_session)}
                for fn in engines.values():  # warm-up
                    fn()
                times = {name: [] for name in engines}
                for _ in range(repeats):  # interleaved, so all see the same machine load
                    for name, fn in engines.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                torch_ips = len(images) / statistics.median(times["torch"])
                ort_ips = len(images) / statistics.median(times["ort"])
                flip_ips = len(images) / statistics.median(times["ort_flip"])
                rows.append({"backbone": backbone, "image_size": size, "threads": threads,
                             "torch_img_per_s": round(torch_ips), "ort_img_per_s": round(ort_ips),
                             "ort_speedup": round(ort_ips / torch_ips, 2), "ort_flip_img_per_s": round(flip_ips),
                             "flip_cost": round(ort_ips / flip_ips, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-stages", action="store_true", help="only the encoding comparison")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
              "load_before": round(load_before, 2)}
    if not args.skip_stages:
        result["stage_seconds"] = stage_times()
        print("stage wall time (s):", json.dumps(result["stage_seconds"]))
    result["encoding"] = encoding_throughput(args.repeats)
    print("| backbone | px | threads | torch eager img/s | onnxruntime img/s | ORT / torch | ORT, flip-averaged img/s "
          "| flip cost |\n|---|---|---|---|---|---|---|---|")
    for r in result["encoding"]:
        print(f"| {r['backbone']} | {r['image_size']} | {r['threads']} | {r['torch_img_per_s']} | {r['ort_img_per_s']} | "
              f"{r['ort_speedup']}x | {r['ort_flip_img_per_s']} | {r['flip_cost']}x |")
    result["load_after"] = round(os.getloadavg()[0], 2)
    out = Path(__file__).with_name("runs")
    out.mkdir(exist_ok=True)
    (out / f"{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
