"""Time and memory of the pipeline's steps at dataset sizes a user brings (20k, 200k images).

    python benchmarks/scale/run.py --images 20000 [--work .cache/scale] [--old-code /work/main]

Writes a synthetic ImageFolder dataset (10 classes, JPEG, 64 px: a class colour in one of four
quadrants plus noise; written once and reused), then runs the real steps as `adalabelhash`
commands, one process each, as `dvc repro` does: prepare, validate, one training epoch
(small_cnn, 64 px, batch 64: read per batch from the files by 2 loader workers, and again from
the memory-mapped decoded cache, its first run building it; `train-cache-again` in --steps
trains from the built cache), export-codewords, convert-onnx,
encode (shards of 10,000), evaluate.
MLflow is off. For each step: wall time and the peak anonymous memory (Pss_Anon, sampled every
50 ms) summed over the step's process tree (its loader workers included). Anonymous memory is
close to what a pod's limit must hold; the cache's pages are file-backed (the OS page cache), so they are
not in it. `--old-code DIR` also trains with the package at DIR (e.g. a checkout from before
streaming: it decodes every split whole into memory). Appends the result as JSON to runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLASSES = 10
SIZE = 64


def generate(root: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs under root/<class>/ (skipped when already complete)."""
    from PIL import Image

    done = root / ".complete"
    if done.exists() and int(done.read_text()) == count:
        return
    rng = np.random.default_rng(seed)
    colours = rng.integers(60, 256, (CLASSES, 3))
    for i in range(count):
        c = i % CLASSES
        pixels = rng.integers(0, 50, (SIZE, SIZE, 3))
        y, x = (c % 4 // 2) * SIZE // 2, (c % 2) * SIZE // 2
        pixels[y : y + SIZE // 2, x : x + SIZE // 2] += colours[c] // 2
        path = root / f"class{c}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    done.write_text(str(count))


def tree_anon_bytes(pid: int) -> int:
    """Proportional anonymous memory (Pss_Anon) of `pid` and all its descendants: pages a forked
    loader worker still shares with its parent count once, not once per process."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss_Anon:"):
                    total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                stack += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(command: list[str], cwd: Path, env: dict) -> dict:
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_anon_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_anon_mb": round(peak[0] / 2**20), "last_line": output.strip().splitlines()[-1][:200]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "scale")
    parser.add_argument("--old-code", type=Path, help="also train with the package checked out here")
    parser.add_argument("--steps", help="comma-separated subset ('' for none, e.g. with --old-code only)", default="prepare,validate,train,train-cache,export-codewords,convert-onnx,encode,evaluate")
    args = parser.parse_args()
    work = args.work.resolve() / str(args.images)
    data = work / "data"
    start = time.perf_counter()
    generate(data, args.images)
    print(f"dataset: {args.images} images ({time.perf_counter() - start:.0f} s)", flush=True)

    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder", root=str(data), query_per_class=100, val_per_class=50)
    params["train"].update(image_size=SIZE, epochs=1, batch_size=64, threads=2, loader_workers=2,
                           val_database_size=2000)
    params["mlflow"]["enabled"] = False
    params["evaluate"].update(topk=[1000], precision_at=[100, 1000], examples=3)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    old = {**params, "prepare": {k: v for k, v in params["prepare"].items() if k != "unlabeled"},
           "train": {k: v for k, v in params["train"].items() if k != "loader_workers"}}
    (work / "params-old.yaml").write_text(yaml.safe_dump(old))  # the keys the code before streaming knew
    b = work / "build"
    common = ["--params", "params.yaml"]
    manifest = ["--manifest", str(b / "prepare/manifest.parquet")]
    train = ["train", *common, *manifest, "--data-root", str(data), "--validation", str(b / "validate"), "--no-resume"]
    steps = {
        "prepare": ["prepare", *common, "--out", str(b / "prepare")],
        "validate": ["validate", *common, *manifest, "--data-root", str(data), "--out", str(b / "validate")],
        "train": [*train, "--out", str(b / "train")],
        "train-cache": [*train, "--out", str(b / "train-cache"), "--cache", str(work / "decoded")],
        "train-cache-again": [*train, "--out", str(b / "train-cache"), "--cache", str(work / "decoded")],
        "export-codewords": ["export-codewords", *common, "--model", str(b / "train"), "--out", str(b / "codewords")],
        "convert-onnx": ["convert-onnx", *common, "--model", str(b / "train"), "--codewords", str(b / "codewords"),
                         *manifest, "--data-root", str(data), "--out", str(b / "onnx")],
        "encode": ["encode", *common, "--onnx", str(b / "onnx/model.onnx"), *manifest, "--data-root", str(data),
                   "--shards-dir", str(b / "encode_shards"), "--out", str(b / "encode")],
        "evaluate": ["evaluate", *common, "--encoded", str(b / "encode"), "--run", str(b / "onnx"), *manifest,
                     "--data-root", str(data), "--codewords", str(b / "codewords/codewords.npy"),
                     "--out", str(b / "evaluate")],
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
    results = {}
    wanted = [name for name in args.steps.split(",") if name]
    for name in wanted:
        results[name] = measure([sys.executable, "-m", "adalabelhash.cli", *steps[name]], work, env)
        print(f"{name}: {results[name]}", flush=True)
    if args.old_code:
        old_env = {**env, "PYTHONPATH": str(args.old_code)}
        old_train = [*train, "--out", str(b / "train-old")]
        old_train[old_train.index("params.yaml")] = "params-old.yaml"
        results["train (old code)"] = measure([sys.executable, "-m", "adalabelhash.cli", *old_train], work, old_env)
        print(f"train (old code): {results['train (old code)']}", flush=True)
    record = {"images": args.images, "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average": os.getloadavg(), "results": results}
    (HERE / "runs").mkdir(exist_ok=True)
    with open(HERE / "runs" / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
