"""prepare and validate with the images in a bucket: a real S3-protocol server (moto's, on loopback),
optionally behind `latency_proxy.py` to give every request an S3-like round trip.

    python benchmarks/scale/object_store.py --delay-ms 0 20 --repeats 3 [--code DIR] [--local]

Uploads the digits (1,797 PNGs) to s3://bench/digits once per run, then for each delay runs
`adalabelhash prepare` (source digits, root the bucket) and `adalabelhash validate` as one process
each, `--repeats` times, with the package at `--code` (default: this checkout; e.g. a checkout of
the main branch for the code before concurrent fetches). Prints wall seconds per run, their
median, the gate's own fact-gathering seconds (validation.json), and the requests the proxy saw.
`--local` also times both steps on the local copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUCKET = "bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{proc.args} did not start")
            time.sleep(0.3)


def timed(args: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "adalabelhash.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return seconds


def run_steps(root: str, work: Path, env: dict, repeats: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] = {"source": "digits", "root": root}
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    times: dict[str, list[float]] = {"prepare": [], "validate": [], "validate facts": []}
    for _ in range(repeats):
        shutil.rmtree(work / "prepared", ignore_errors=True)
        times["prepare"].append(timed(["prepare", "--params", "params.yaml", "--out", "prepared"], work, env))
        times["validate"].append(timed(["validate", "--params", "params.yaml", "--manifest",
                                        "prepared/manifest.parquet", "--out", "validated"], work, env))
        report = json.loads((work / "validated" / "validation.json").read_text())
        times["validate facts"].append(report["summary"]["seconds"]["facts"])
    return {step: {"runs": [round(t, 2) for t in runs], "median": round(statistics.median(runs), 2)}
            for step, runs in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, nargs="+", default=[0.0], help="0: no proxy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", type=Path, default=REPO, help="the adalabelhash package's checkout")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "object-store-bench")
    parser.add_argument("--local", action="store_true", help="also time the local copy")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from components.get_data import get_data

    work = args.work.resolve()
    local = work / "digits"
    if not local.is_dir():
        get_data("digits", local)
    env = {**os.environ, **S3_ENV, "PYTHONPATH": str(args.code.resolve())}
    procs = []
    try:
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(port, procs[0])
        from s3fs import S3FileSystem

        fs = S3FileSystem(key="testing", secret="testing", endpoint_url=f"http://127.0.0.1:{port}")
        fs.mkdir(BUCKET)
        files = sorted(local.rglob("*.png"))
        fs.put([str(p) for p in files], [f"{BUCKET}/digits/{p.relative_to(local).as_posix()}" for p in files])
        print(f"{len(files)} objects in s3://{BUCKET}/digits; code {args.code.resolve()}", flush=True)
        results = {}
        if args.local:
            results["local"] = run_steps(str(local), work / "local", env, args.repeats)
            print("local", json.dumps(results["local"]), flush=True)
        for delay in args.delay_ms:
            endpoint = port
            if delay:
                endpoint = free_port()
                proxy = subprocess.Popen([sys.executable, str(HERE / "latency_proxy.py"), "--listen", str(endpoint),
                                          "--upstream", str(port), "--delay-ms", str(delay)],
                                         stdout=subprocess.PIPE, text=True)
                wait_for(endpoint, proxy)
            step_env = {**env, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{endpoint}"}
            name = f"s3 +{delay:g} ms"
            results[name] = run_steps(f"s3://{BUCKET}/digits", work / f"s3-{delay:g}ms", step_env, args.repeats)
            if delay:
                proxy.terminate()
                results[name]["proxy"] = proxy.communicate(timeout=30)[0].strip().splitlines()[-1]
            print(name, json.dumps(results[name]), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
