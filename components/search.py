"""`adalabelhash search IMAGE... -k 10`: nearest database images from the faiss binary index.

Serving path: image -> model.onnx -> bits -> faiss IndexBinaryFlat (exact Hamming k-NN).
Items at equal distance come in ascending database position (faiss's k-selection breaks
ties by id); the metrics in `evaluate` never depend on that order. The HTTP service with
batching and alias following is `adalabelhash serve` (adalabelhash/serving/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def search(images: list[Path], onnx_path: Path, encoded_dir: Path, manifest_path: Path, k: int = 10) -> list[dict]:
    """For each query image: the k nearest database items (manifest id, path, labels, distance)."""
    import faiss
    import numpy as np

    from adalabelhash.codes import pack_codes
    from adalabelhash.data.manifest import Manifest
    from adalabelhash.errors import UserError
    from adalabelhash.onnx_runtime import open_session
    from adalabelhash.preprocess import load_image, to_model_input

    if k < 1:
        raise UserError(f"-k must be >= 1, got {k}")
    index_path = Path(encoded_dir) / "database.faiss"
    if not index_path.is_file():
        raise UserError(f"{index_path}: not found; run the encode step first")
    manifest = Manifest.load(manifest_path)
    session = open_session(onnx_path)
    size = session.get_inputs()[0].shape[2]
    batch = to_model_input(np.stack([load_image(p, size) for p in images]))
    codes = pack_codes(session.run(None, {session.get_inputs()[0].name: batch})[0])
    index = faiss.read_index_binary(str(index_path))
    if index.d != codes.shape[1] * 8:
        raise UserError(f"{index_path}: index has {index.d}-bit codes but {onnx_path} gives {codes.shape[1] * 8}")
    distances, ids = index.search(codes, min(k, index.ntotal))
    frame, classes, labels = manifest.frame, manifest.classes, manifest.label_matrix()
    return [
        {
            "query": str(image),
            "results": [
                {"id": int(i), "path": frame["path"].iloc[i], "distance": int(d),
                 "labels": [classes[c] for c in np.flatnonzero(labels[i])]}
                for d, i in zip(row_d, row_i) if i >= 0
            ],
        }
        for image, row_d, row_i in zip(images, distances, ids)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="query image files")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--onnx", type=Path, default=Path("build/onnx/model.onnx"))
    parser.add_argument("--encoded", type=Path, default=Path("build/encode"), help="output of the encode step")
    parser.add_argument("--manifest", type=Path, default=Path("build/prepare/manifest.parquet"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> None:
    answers = search(args.images, args.onnx, args.encoded, args.manifest, args.k)
    if args.json:
        print(json.dumps(answers, indent=2))
        return
    for answer in answers:
        print(answer["query"])
        for rank, hit in enumerate(answer["results"], 1):
            print(f"  {rank:>3}  d={hit['distance']:<3} {','.join(hit['labels']):<20} {hit['path']}  (id {hit['id']})")
