"""Id queries against N separate `adalabelhash serve` processes (each with cores / N search
threads), the 8 client connections spread over them, beside raw faiss with 8 threads: what a
process per core would buy over one process whose event loop hands every query to a search
thread and back. Uses a store that run.py wrote (its databases are registered there).

  python benchmarks/serve/processes.py --work benchmarks/serve/runs/<run> --alias clustered --processes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from adalabelhash.database import load_database  # noqa: E402
from benchmarks.serve.load import get_request, run_load  # noqa: E402
from benchmarks.serve.run import Service, raw_calls, timed_calls  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a run folder of run.py (mlflow.db, <alias>/database)")
    parser.add_argument("--alias", default="clustered")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()

    database = load_database(args.work / args.alias / "database")
    positions = np.random.default_rng(7).choice(len(database), args.requests).tolist()
    requests = [get_request(f"/search/{int(database.ids[p])}?k={args.k}") for p in positions]
    raw_search, _, _ = raw_calls(None, database.codes, args.k)
    work = args.work.resolve()  # the services run in it: a relative store path would point elsewhere
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cores = len(os.sched_getaffinity(0))
    for processes in args.processes:
        options = ["--search-workers", str(max(1, cores // processes))]
        services = [Service(work, uri, args.alias, options) for _ in range(processes)]
        try:
            ports = [s.port for s in services]
            run_load(ports, requests[:200], args.clients)  # warm up
            for _ in range(args.repeats):
                raw = timed_calls(raw_search, positions, args.clients)["qps"]
                load = run_load(ports, requests, args.clients)
                served = len(requests) / load["wall"]
                print(json.dumps({"processes": processes, "options": " ".join(options), "raw_qps": raw,
                                  "service_qps": round(served, 1), "service_over_raw": round(served / raw, 3),
                                  "loadavg": round(os.getloadavg()[0], 2)}), flush=True)
        finally:
            for service in services:
                service.stop()


if __name__ == "__main__":
    main()
