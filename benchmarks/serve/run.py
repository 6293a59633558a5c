"""Serving benchmark: `adalabelhash serve` (real uvicorn on 127.0.0.1) vs raw in-process faiss and ORT.

Inputs: a finished pipeline build (`make run`, here with train.bits=64): model.onnx, the encode
output, the manifest, the codewords. The benchmark registers its own versions in its own
sqlite store under benchmarks/serve/runs/ (never the pipeline's registry):
  digits     the real database (1,597 codes)
  clustered  1M codes drawn around the model's binarised codewords, each bit flipped with the
             model's measured rate (database codes vs their own class codeword)
  uniform    1M uniform random codes (the worst case for IVF)
and serves each with `adalabelhash serve --alias <name>`. For each: queries/s and p50/p99 of id
queries and image queries at 1 and 8 concurrent clients, beside raw faiss search and raw
ORT encode + faiss search in this process (same threads, same k). Then IVF tie-aware
recall@100 vs speed on the 1M sets. Request counts are fixed; everything stays on loopback.

  python benchmarks/serve/run.py --build .cache/digits-run/build --data-root .cache/digits-run/data/digits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from adalabelhash import tracking  # noqa: E402
from adalabelhash.database import ARTIFACT_PATH, Database, database_from_encoded, write_database  # noqa: E402
from benchmarks.serve.load import get_request, run_load, upload_request  # noqa: E402

NAME = "serve-bench"


def timed_calls(call, items: list, clients: int, cpu_seconds=time.process_time) -> dict:
    """Run call(item) for every item from `clients` threads (the raw in-process side); queries/s,
    latency percentiles and the CPU time per query of the process doing the work (`cpu_seconds`:
    a cumulative clock). On a shared machine wall-clock numbers move with the neighbours' load;
    CPU per query much less."""
    latencies = np.empty(len(items))
    cpu_before = cpu_seconds()

    def one(i):
        started = time.perf_counter()
        call(items[i])
        latencies[i] = time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(items))))
    return summary(latencies, time.perf_counter() - started, cpu_seconds() - cpu_before)


def timed_requests(port: int, requests: list[bytes], clients: int, cpu_seconds) -> dict:
    """The same over HTTP, from the light asyncio client (load.py); its own CPU per request too."""
    cpu_before = cpu_seconds()
    load = run_load(port, requests, clients)
    return {**summary(load["latencies"], load["wall"], cpu_seconds() - cpu_before),
            "client_cpu_ms_per_query": round(1000 * load["client_cpu"] / len(requests), 3)}


def summary(latencies: np.ndarray, wall: float, cpu: float) -> dict:
    return {"qps": round(len(latencies) / wall, 1), "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2), "requests": len(latencies),
            "cpu_ms_per_query": round(1000 * cpu / len(latencies), 3)}


def synthetic(codewords_bits: np.ndarray, flip: float, count: int, seed: int, uniform: bool) -> Database:
    rng = np.random.default_rng(seed)
    bits = codewords_bits.shape[1]
    if uniform:
        classes = rng.integers(0, len(codewords_bits), count)
        codes = rng.integers(0, 256, (count, bits // 8), dtype=np.uint8)
    else:
        classes = rng.integers(0, len(codewords_bits), count)
        codes = np.empty((count, bits // 8), np.uint8)
        for start in range(0, count, 100_000):  # in blocks: 1M x 64 random floats would be 256 MB
            block = classes[start : start + 100_000]
            flips = rng.random((len(block), bits), dtype=np.float32) < flip
            codes[start : start + len(block)] = np.packbits(codewords_bits[block] ^ flips, axis=1)
    names = [str(c) for c in range(len(codewords_bits))]
    return Database(np.arange(count, dtype=np.int64), codes, [f"synthetic/{i}.png" for i in range(count)],
                    [names[c] for c in classes], names, "synthetic")


def register(uri: str, onnx: Path, databases: dict[str, Database], work: Path) -> None:
    params = tracking.MlflowParams(experiment=NAME, tracking_uri=uri)
    client = tracking.client(uri)
    from adalabelhash.onnx_runtime import open_session

    size = open_session(onnx, device="cpu").get_inputs()[0].shape[2]
    model = tracking.log_onnx_model(tracking.start_run(params, {}, {}, "encoder"), onnx, [], image_size=size)
    client.create_registered_model(NAME)
    for alias, database in databases.items():
        ref = replace(tracking.start_run(params, {}, {}, alias), model_uri=model.model_uri)
        write_database(database, work / alias / ARTIFACT_PATH)
        tracking.log_artifacts(ref, [work / alias / ARTIFACT_PATH], ARTIFACT_PATH)
        version = client.create_model_version(NAME, model.model_uri, run_id=ref.run_id,
                                              model_id=model.model_uri.split("/", 1)[1]).version
        client.set_registered_model_alias(NAME, alias, version)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, work: Path, uri: str, alias: str, options: list[str]):
        import requests

        (work / "params.yaml").write_text(f"promote: {{model_name: {NAME}}}\nmlflow: {{tracking_uri: '{uri}'}}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adalabelhash.cli", "serve", "--params", "params.yaml", "--alias", alias,
             "--port", str(self.port), "--poll-seconds", "3600", *options],
            cwd=work, stdout=open(work / f"serve-{alias}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / f"serve-{alias}.log").read_text()[-2000:])
            time.sleep(0.5)

    def batches(self) -> tuple[float, float]:
        """(queries, search calls) answered so far, from the service's batch-size histogram."""
        import requests

        text = requests.get(f"{self.url}/metrics", timeout=10).text
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("adalabelhash_batch_size_")}
        return value.get("adalabelhash_batch_size_sum", 0.0), value.get("adalabelhash_batch_size_count", 0.0)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


def raw_calls(model, codes: np.ndarray, k: int):
    """The same work in-process: faiss search of a stored code; decode + ORT encode + faiss search."""
    import faiss

    from adalabelhash.codes import pack_codes
    from adalabelhash.data.images import decode_rgb
    from adalabelhash.preprocess import fit_image

    index = faiss.IndexBinaryFlat(8 * codes.shape[1])
    index.add(codes)

    def search(position):
        faiss.omp_set_num_threads(1)  # per calling thread, as the service does
        index.search(codes[position : position + 1], k)

    def encode_search(data):
        faiss.omp_set_num_threads(1)
        real = model.encode(fit_image(decode_rgb(data, "q"), model.image_size)[None])
        index.search(pack_codes(real), k)

    def batched(positions):  # 8 stored codes in one faiss call: would batching pay?
        faiss.omp_set_num_threads(1)
        index.search(codes[positions], k)

    return search, encode_search, batched


def compare(model, service: Service, database: Database, images: list[bytes], k: int, requests_per_run: int,
            repeats: int) -> dict:
    """Raw and served, one configuration after the other, so load drift hits both alike."""
    positions = np.random.default_rng(7).choice(len(database), 64, replace=False).tolist()
    raw_id, raw_image, raw_batched = raw_calls(model, database.codes, k)
    ids = [int(database.ids[p]) for p in positions]
    out = {"raw": {}, "service": {}}

    import psutil

    server = psutil.Process(service.proc.pid)  # the service's own CPU time: the client's is not its cost
    workers = server.children()  # with --processes N: the worker processes under uvicorn's supervisor
    clocks = {"raw": time.process_time, "service": lambda: sum(sum(p.cpu_times()[:2]) for p in [server, *workers])}

    def loop_cpu():  # CPU seconds of the main threads, where the event loops run
        return sum(next(t.user_time + t.system_time for t in p.threads() if t.id == p.pid) for p in workers or [server])

    def measured(side, call, items, clients):
        if side == "raw":
            return timed_calls(call, items, clients, clocks[side])
        before, loop_before = service.batches(), loop_cpu()
        run = timed_requests(service.port, items, clients, clocks[side])
        after, loop_after = service.batches(), loop_cpu()
        # queries per search call (with --processes N, /metrics is one worker's: not recorded)
        run["mean_batch"] = None if workers else round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2)
        # the event loop's own share (HTTP, routing, answers); the rest is the search and decode threads
        run["loop_cpu_ms_per_query"] = round(1000 * (loop_after - loop_before) / len(items), 3)
        return run

    def best(side, call, items, clients):  # the machine is shared: keep the fastest of `repeats` runs
        return max((measured(side, call, items, clients) for _ in range(repeats)), key=lambda run: run["qps"])

    for clients in (1, 8):
        items = [positions[i % len(positions)] for i in range(requests_per_run)]
        pictures = [images[i % len(images)] for i in range(requests_per_run)]
        runs = {("raw", "id"): (raw_id, items),
                ("service", "id"): (None, [get_request(f"/search/{ids[positions.index(p)]}?k={k}") for p in items]),
                ("raw", "image"): (raw_image, pictures),
                ("service", "image"): (None, [upload_request(f"/search?k={k}", picture) for picture in pictures])}
        for (side, kind), (call, work) in runs.items():
            out[side][f"{kind}_c{clients}"] = best(side, call, work, clients)
    groups = [positions[i : i + 8] for i in range(0, 64, 8)] * max(1, requests_per_run // 64)
    batched = best("raw", raw_batched, groups, 1)
    out["raw"]["id_batched8_c1"] = {"qps": round(8 * batched["qps"], 1),
                                    "cpu_ms_per_query": round(batched["cpu_ms_per_query"] / 8, 3)}
    out["service_over_raw_qps"] = {key: round(out["service"][key]["qps"] / out["raw"][key]["qps"], 3)
                                   for key in out["service"]}
    # throughput at saturation goes as 1 / CPU per query: the overhead ratio the load moves least
    out["raw_over_service_cpu"] = {key: round(out["raw"][key]["cpu_ms_per_query"] / out["service"][key]["cpu_ms_per_query"], 3)
                                   for key in out["service"]}
    return out


def ivf_sweep(codes: np.ndarray, queries: np.ndarray, k: int, nlist: int, nprobes: list[int]) -> list[dict]:
    """Tie-aware recall@k (a hit: distance within the exact k-th distance) and queries/s, one query a call."""
    import faiss

    faiss.omp_set_num_threads(1)
    bits = 8 * codes.shape[1]
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(codes)
    started = time.perf_counter()
    exact = np.stack([flat.search(q[None], k)[0][0] for q in queries])
    flat_qps = len(queries) / (time.perf_counter() - started)
    quantizer = faiss.IndexBinaryFlat(bits)
    ivf = faiss.IndexBinaryIVF(quantizer, bits, nlist)
    sample = np.random.default_rng(0).choice(len(codes), min(len(codes), 64 * nlist), replace=False)
    ivf.train(codes[np.sort(sample)])
    ivf.add(codes)
    rows = [{"index": "flat", "recall": 1.0, "qps": round(flat_qps, 1), "speedup": 1.0}]
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        started = time.perf_counter()
        found = [ivf.search(q[None], k) for q in queries]
        qps = len(queries) / (time.perf_counter() - started)
        hits = [np.sum((i[0] >= 0) & (d[0] <= e[-1])) for (d, i), e in zip(found, exact)]
        rows.append({"index": f"ivf{nlist}", "nprobe": nprobe, "recall": round(float(np.mean(hits)) / k, 4),
                     "qps": round(qps, 1), "speedup": round(qps / flat_qps, 2)})
    ties = [int(np.sum(np.bitwise_count(np.bitwise_xor(codes.view(np.uint64)[:, 0], q.view(np.uint64)[0])) == e[-1]))
            for q, e in zip(queries[:20], exact[:20])] if codes.shape[1] == 8 else []
    if ties:
        rows[0]["codes_tied_at_kth"] = [min(ties), max(ties)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True, help="build/ of a finished pipeline run")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--million", type=int, default=1_000_000, help="synthetic database size")
    parser.add_argument("--requests", type=int, default=600, help="requests per measured run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest is kept")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--serve-options", default="", help="extra `adalabelhash serve` options, e.g. '--search-workers 2'")
    args = parser.parse_args()

    from adalabelhash.data.manifest import Manifest
    from adalabelhash.metrics import own_codeword_distance
    from adalabelhash.serving.index import IndexParams
    from adalabelhash.serving.loader import load_version

    load_start = os.getloadavg()
    work = HERE / "runs" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    manifest_path = args.build / "prepare" / "manifest.parquet"
    digits = database_from_encoded(args.build / "encode", manifest_path)
    codewords = np.load(args.build / "codewords" / "codewords.npy").astype(np.uint8)
    labels = Manifest.load(manifest_path).label_matrix()[digits.ids]
    flip = float(own_codeword_distance(digits.codes, np.packbits(codewords, axis=1), labels).mean()) / digits.bits
    databases = {"digits": digits,
                 "clustered": synthetic(codewords, flip, args.million, 1, uniform=False),
                 "uniform": synthetic(codewords, flip, args.million, 2, uniform=True)}
    register(uri, args.build / "onnx" / "model.onnx", databases, work)

    manifest = Manifest.load(manifest_path)
    query_rows = manifest.indices("query")[:: max(1, len(manifest.indices("query")) // 50)][:50]
    images = [(args.data_root / manifest.frame["path"].iloc[i]).read_bytes() for i in query_rows]
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "loadavg_at_start": [round(x, 2) for x in load_start]},
               "k": args.k, "serve_options": args.serve_options, "bits": digits.bits, "requests_per_run": args.requests, "repeats": args.repeats, "flip_rate": round(flip, 4), "cases": {}}
    for alias, database in databases.items():
        model = load_version(uri, NAME, str(list(databases).index(alias) + 1), IndexParams(), threads=1)  # as served
        service = Service(work, uri, alias, args.serve_options.split())
        try:
            results["cases"][alias] = {"codes": len(database),
                                       **compare(model, service, database, images, args.k, args.requests, args.repeats)}
        finally:
            service.stop()
        print(alias, json.dumps(results["cases"][alias]), flush=True)
        if len(database) >= 100_000:
            queries = database.codes[np.random.default_rng(8).choice(len(database), 100, replace=False)]
            nprobes = [4, 16, 64] if alias == "clustered" else [16, 64, 256]
            results["cases"][alias]["ivf"] = ivf_sweep(database.codes, queries, args.k, 1024, nprobes)
            print(alias, "ivf", json.dumps(results["cases"][alias]["ivf"]), flush=True)
        del model
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
