"""The service's batcher without HTTP: 8 asyncio clients send id queries (stored codes, k=100)
straight to `Batcher.search` over a database written by run.py, with 1 or more search threads.
What the scan can do when nothing but the batching sits between the queries and faiss.

  python benchmarks/serve/batcher_inprocess.py --database benchmarks/serve/runs/<run>/clustered/database --workers 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from adalabelhash.database import load_database  # noqa: E402
from adalabelhash.serving.batcher import Batcher  # noqa: E402
from adalabelhash.serving.index import CodeIndex  # noqa: E402


def measure(version, codes: np.ndarray, workers: int, clients: int, k: int) -> dict:
    import uvloop

    batcher = Batcher(workers=workers)
    batcher.start()

    async def run():
        next_query = iter(range(len(codes) + clients))

        async def client():
            while (i := next(next_query)) < len(codes):
                await batcher.search(version, k, code=codes[i])

        await asyncio.gather(*(client() for _ in range(clients)))

    try:
        started, cpu = time.perf_counter(), time.process_time()
        uvloop.run(run())
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        batcher.stop()
    return {"workers": workers, "qps": round(len(codes) / wall), "cpu_ms_per_query": round(1000 * cpu / len(codes), 3),
            "loadavg": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=Path, required=True, help="a database/ folder (run.py writes them under runs/)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queries", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()

    database = load_database(args.database)

    class Version:  # what the batcher uses of a served version for id queries
        index = CodeIndex(database.codes)

    codes = database.codes[np.random.default_rng(7).choice(len(database), args.queries)]
    for workers in args.workers:
        print(measure(Version(), codes, workers, args.clients, args.k), flush=True)


if __name__ == "__main__":
    main()
