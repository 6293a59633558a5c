"""Time the data gate on all 60,000 CIFAR-10 JPEGs (protocol II); see README.md for results.

    python benchmarks/validate_speed/run.py [repeats, default 3]

Extracts ../shared/datasets/cifar10-jpeg.tar.gz into .cache/cifar10 once, prepares protocol II,
then times (interleaved, `repeats` times each, medians reported): a plain PIL decode loop (the
baseline) and the fact pass serial / threads / processes; then the whole `validate` step
(facts + GX + reports) once. Results also go to runs/<time>.json (git-ignored).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CACHE = REPO / ".cache"
sys.path.insert(0, str(REPO))


def timed(label: str, fn, results: dict):
    started = time.perf_counter()
    value = fn()
    results[label] = round(time.perf_counter() - started, 2)
    print(f"{label:<34} {results[label]:>7.2f} s", flush=True)
    return value


def main(repeat: int = 3) -> int:
    if not TARBALL.is_file():
        print(f"skipped: {TARBALL} is absent (the shared datasets are not on this machine)")
        return 0
    from PIL import Image

    from adalabelhash.data import validation
    from adalabelhash.data.manifest import Manifest
    from components.get_data import get_data
    from components.prepare import PrepareParams, prepare
    from components.validate import ValidateParams, validate

    root = CACHE / "cifar10"
    results: dict = {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    if not (root / "train").is_dir():
        timed("extract tarball (get-data)", lambda: get_data("cifar10", root, TARBALL), results)
    work = CACHE / "validate_speed"
    params = PrepareParams(source="cifar10", root=str(root), protocol="II", val_per_class=100)
    timed("prepare protocol II (hash 60k)", lambda: prepare(params, work / "prepared"), results)
    manifest = Manifest.load(work / "prepared" / "manifest.parquet")
    paths = [root / p for p in manifest.frame["path"]]

    def decode_all():
        for path in paths:
            with Image.open(path) as image:
                image.load()

    def threads():
        chunks = [list(manifest.frame["path"][i::8]) for i in range(8)]
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(partial(validation.facts_for, str(root)), chunks))

    # Interleaved repeats: on a shared 2-core machine the load changes from minute to minute.
    contenders = {"baseline: PIL decode loop": decode_all,
                  "facts: serial": lambda: validation.gather_facts(manifest, root, workers=1),
                  f"facts: {os.cpu_count()} threads": threads,
                  f"facts: {os.cpu_count()} processes": lambda: validation.gather_facts(manifest, root, workers=0)}
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            runs[name].append(round(time.perf_counter() - started, 2))
    for name, seconds in runs.items():
        results[name] = {"median": statistics.median(seconds), "runs": seconds}
        print(f"{name:<34} {statistics.median(seconds):>7.2f} s  (runs: {', '.join(map(str, seconds))})")
    summary = timed("validate step (facts+GX+reports)",
                    lambda: validate(ValidateParams(min_side=32, max_side=32), work / "prepared/manifest.parquet",
                                     work / "report"), results)
    results["validate_parts"] = summary["seconds"]
    print(f"  of which facts {summary['seconds']['facts']} s, GX suite + Data Docs {summary['seconds']['gx']} s")
    out_dir = Path(__file__).parent / "runs"
    out_dir.mkdir(exist_ok=True)
    (out_dir / time.strftime("%Y%m%d-%H%M%S.json")).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
