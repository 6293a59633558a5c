"""`adalabelhash get-data`: materialise a raw image source under data/ (tracked by data.dvc).

No params.yaml section: this runs by hand (or as the first Kubeflow component) before
`dvc add`, and its only choices are which source and where from, given on the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SOURCES = ("digits", "cifar10")


def get_data(source: str, out: str | Path, tarball: str | Path | None = None,
             cache_dir: str | Path = ".cache/torchvision") -> dict[str, Any]:
    """Write `source` as an ImageFolder tree at `out` (replaced whole, atomically)."""
    from adalabelhash.data import fetch
    from adalabelhash.errors import UserError

    if source == "digits":
        if tarball:
            raise UserError("--tarball applies to cifar10 only (digits ship with scikit-learn)")
        return fetch.write_digits(out)
    if source == "cifar10":
        return fetch.extract_cifar10_tarball(tarball, out) if tarball else fetch.download_cifar10(out, cache_dir)
    raise UserError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=SOURCES, help="digits: offline, bundled with scikit-learn; "
                        "cifar10: from --tarball, else downloaded by torchvision")
    parser.add_argument("--out", required=True, help="target directory, e.g. data/digits (replaced whole)")
    parser.add_argument("--tarball", help="cifar10 only: ImageFolder tarball, e.g. "
                        "../shared/datasets/cifar10-jpeg.tar.gz (no download)")
    parser.add_argument("--cache-dir", default=".cache/torchvision",
                        help="cifar10 without --tarball: where torchvision keeps its download")


def run(args: argparse.Namespace) -> None:
    summary = get_data(args.source, args.out, args.tarball, args.cache_dir)
    print(f"get-data {summary['source']}: {summary['images']:,} images -> {summary['out']}")
