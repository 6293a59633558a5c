"""Local-disk reading of the steps that now read a batch's files together: encode's decoded
batches (4 threads, batches of 128) and the training loader's `DecodedFiles` batches (64 rows).

    PYTHONPATH=<checkout> python benchmarks/scale/local_decode.py DIGITS_DIR [--repeats 7]

Times each over every PNG under DIGITS_DIR (the digits: 1,797) and prints the median; run it with
PYTHONPATH at two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import adalabelhash
    from adalabelhash.streaming import DecodedFiles
    from components.encode import iter_decoded_batches

    paths = sorted(args.root.rglob("*.png"))
    files = DecodedFiles(paths, 32)
    steps = {
        "encode batches": lambda: sum(len(b) for b in iter_decoded_batches(paths, 32, 128, 4)),
        "DecodedFiles rows": lambda: sum(len(files.rows(list(range(s, min(s + 64, len(paths))))))
                                         for s in range(0, len(paths), 64)),
    }
    print(f"{len(paths)} images, package {Path(adalabelhash.__file__).parents[1]}")
    for name, step in steps.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            assert step() == len(paths)
            times.append(time.perf_counter() - start)
        print(f"{name}: median {statistics.median(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
