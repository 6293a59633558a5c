"""Speed of our tie-aware mAP vs the peer's per-query loop (DeepHash-pytorch `CalcTopMap`).

    python benchmarks/metric_speed/run.py            # 10,000 queries x 50,000 items, 64 bits

Same process, same data. Ours: medians over repeats (after one warm-up) of `average_precision`
(full-ranking tie-aware AP per query) and of `retrieval_metrics` (that plus mAP@1000, P@N,
radius precision and both PR curves); peak memory from tracemalloc. The peer and our stable
policy are timed once on a subset of queries and scaled linearly to all of them (their cost
is the same for every query).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from adalabelhash.codes import pack_bits  # noqa: E402
from adalabelhash.metrics import CHUNK_MB, average_precision, retrieval_metrics  # noqa: E402


def make_data(n: int, classes: int, bits: int, rng, centres, flip: float = 0.1, confused: float = 0.15):
    """Codes near class centres: each bit flipped with prob `flip`; a `confused` share of
    items sits near another class's centre (so that mAP is well below 1)."""
    labels = rng.integers(0, classes, n)
    centre = np.where(rng.random(n) < confused, rng.integers(0, classes, n), labels)
    bits_ = centres[centre] ^ (rng.random((n, bits)) < flip)
    return bits_.astype(np.uint8), np.eye(classes, dtype=np.uint8)[labels]


# ---- the peer, as in swuxyj/DeepHash-pytorch utils/tools.py (tqdm dropped) ----
def CalcHammingDist(B1, B2):
    q = B2.shape[1]
    distH = 0.5 * (q - np.dot(B1, B2.transpose()))
    return distH


def CalcTopMap(rB, qB, retrievalL, queryL, topk):
    num_query = queryL.shape[0]
    topkmap = 0
    for iter in range(num_query):
        gnd = (np.dot(queryL[iter, :], retrievalL.transpose()) > 0).astype(np.float32)
        hamm = CalcHammingDist(qB[iter, :], rB)
        ind = np.argsort(hamm)
        gnd = gnd[ind]

        tgnd = gnd[0:topk]
        tsum = np.sum(tgnd).astype(int)
        if tsum == 0:
            continue
        count = np.linspace(1, tsum, tsum)

        tindex = np.asarray(np.where(tgnd == 1)) + 1.0
        topkmap_ = np.mean(count / (tindex))
        topkmap = topkmap + topkmap_
    topkmap = topkmap / num_query
    return topkmap


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--database", type=int, default=50_000)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-queries", type=int, default=500)
    ap.add_argument("--stable-queries", type=int, default=1000)
    ap.add_argument("--chunk-mb", type=float, default=CHUNK_MB)
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 2, (args.classes, args.bits)).astype(bool)
    q_bits, q_labels = make_data(args.queries, args.classes, args.bits, rng, centres)
    db_bits, db_labels = make_data(args.database, args.classes, args.bits, rng, centres)
    q_codes, db_codes = pack_bits(q_bits), pack_bits(db_bits)
    data = (q_codes, q_labels, db_codes, db_labels)

    map_time, map_runs = median_time(lambda: average_precision(*data, chunk_mb=args.chunk_mb).mean(), args.repeats)
    all_time, all_runs = median_time(lambda: retrieval_metrics(*data, chunk_mb=args.chunk_mb), args.repeats)
    tracemalloc.start()
    result = retrieval_metrics(*data, chunk_mb=args.chunk_mb)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    sub = args.stable_queries
    t0 = time.perf_counter()
    retrieval_metrics(q_codes[:sub], q_labels[:sub], db_codes, db_labels, tie_policy="stable", chunk_mb=args.chunk_mb)
    stable_time = (time.perf_counter() - t0) * args.queries / sub

    sub = args.peer_queries
    qB = (2.0 * q_bits[:sub] - 1).astype(np.float32)
    rB = (2.0 * db_bits - 1).astype(np.float32)
    t0 = time.perf_counter()
    peer_map = CalcTopMap(rB, qB, db_labels.astype(np.float32), q_labels[:sub].astype(np.float32), args.database)
    peer_time = (time.perf_counter() - t0) * args.queries / sub
    sub_map = average_precision(q_codes[:sub], q_labels[:sub], db_codes, db_labels).mean()

    def runs(times):
        return f"(runs: {', '.join(f'{t:.3f}' for t in times)})"

    rows = [
        ("data", f"{args.queries} queries x {args.database} items, {args.bits} bits, {args.classes} classes"),
        ("ours: tie-aware mAP, average_precision (median)", f"{map_time:.3f} s  {runs(map_runs)}"),
        ("ours: all metrics, retrieval_metrics (median)", f"{all_time:.3f} s  {runs(all_runs)}"),
        ("ours: peak traced memory, retrieval_metrics", f"{peak_mb:.1f} MiB"),
        (f"ours: stable policy, {args.stable_queries} queries scaled", f"{stable_time:.1f} s"),
        (f"peer: CalcTopMap, {sub} queries scaled", f"{peer_time:.1f} s"),
        ("speed-up, peer / ours tie-aware mAP", f"{peer_time / map_time:.0f}x"),
        ("mAP, ours, all queries", f"{result['mAP']:.4f}"),
        (f"mAP on the first {sub} queries: ours / peer", f"{sub_map:.4f} / {peer_map:.4f}"),
        ("machine", f"{os.cpu_count()} cores, 1-min load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f}"),
        ("numpy, python", f"{np.__version__}, {platform.python_version()}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
