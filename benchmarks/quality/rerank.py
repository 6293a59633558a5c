"""What the asymmetric rerank does to mAP: the `evaluate` metrics of one encode output, Hamming
only (tie-aware) and with the top N reranked by the queries' real-valued codes.

  python benchmarks/quality/rerank.py --encoded build/encode --manifest build/prepare/manifest.parquet \
      --rerank 100 1000 --topk 100 1000

Needs an encode output from a version that keeps the queries' real-valued codes (codes.npz
`query_real`). Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    from dataclasses import replace

    from components.evaluate import EvaluateParams, evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoded", type=Path, required=True, help="output of the encode step")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--rerank", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--topk", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", type=Path, default=Path(".cache/rerank-eval"))
    args = parser.parse_args()
    params = EvaluateParams(topk=args.topk, precision_at=[10], examples=0)
    for rerank in (0, *args.rerank):
        started = time.perf_counter()
        metrics = evaluate(replace(params, rerank=rerank), args.encoded, args.manifest, None, args.out / str(rerank))
        keys = [k for k in metrics if k.startswith("mAP") and not k.endswith("_stable")]
        print(json.dumps({"rerank": rerank, "seconds": round(time.perf_counter() - started, 1),
                          "queries": metrics["queries"], "database": metrics["database"], "bits": metrics["bits"],
                          **{k: metrics[k] for k in keys}}), flush=True)


if __name__ == "__main__":
    main()
