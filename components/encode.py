"""Step `encode`: bulk-encode the query and database images with onnxruntime.

Work is cut into fixed-size shards of the manifest rows that are queries or database items.
Each shard is written atomically with the model and dataset it belongs to, so a killed run
resumes without redoing finished shards, and one shard can be encoded on another machine
(`--shard I`, the Kubeflow ParallelFor) and merged later (`--merge`). Decoding runs in a
thread pool a few batches ahead of inference so the model is never waiting for JPEGs.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np


@dataclass(frozen=True)
class EncodeParams:
    """params.yaml `encode:`."""

    batch_size: int = 128
    shard_size: int = 10000  # images per shard: the unit of resuming and of parallel encoding
    decode_threads: int = 4
    ort_threads: int = 0  # onnxruntime intra-op threads; 0 = onnxruntime's default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # execution provider (adalabelhash/onnx_runtime.py)

    def __post_init__(self):
        for name in ("batch_size", "shard_size", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ort_threads < 0:
            raise ValueError(f"ort_threads must be >= 0, got {self.ort_threads}")


@dataclass(frozen=True)
class ShardPlan:
    ids: np.ndarray  # manifest row ids to encode: every query or database row, in manifest order
    shard_size: int

    @property
    def num_shards(self) -> int:
        return max(1, -(-len(self.ids) // self.shard_size))

    def shard_ids(self, index: int) -> np.ndarray:
        return self.ids[index * self.shard_size : (index + 1) * self.shard_size]


def plan_shards(params: EncodeParams, manifest) -> ShardPlan:
    frame = manifest.frame
    ids = np.flatnonzero((frame["query"] | frame["database"]).to_numpy())
    return ShardPlan(ids, params.shard_size)


def encode_shards(params: EncodeParams, onnx_path: Path, manifest_path: Path, data_root: str | Path, shards_dir: Path,
                  only: Sequence[int] | None = None) -> dict:
    """Encode the shards (all, or `only` these indices) that are not already done; return counts."""
    from tqdm.auto import tqdm

    from adalabelhash.data.manifest import Manifest
    from adalabelhash.errors import UserError
    from adalabelhash.onnx_runtime import open_session

    manifest = Manifest.load(manifest_path)
    plan = plan_shards(params, manifest)
    indices = range(plan.num_shards) if only is None else only
    bad = [i for i in indices if not 0 <= i < plan.num_shards]
    if bad:
        raise UserError(f"shard index {bad[0]} out of range: this manifest has {plan.num_shards} shards")
    session = open_session(onnx_path, threads=params.ort_threads or None, device=params.device)
    size = session.get_inputs()[0].shape[2]
    key = shard_key(onnx_path, manifest.fingerprint())
    files = manifest.files(data_root)
    done = skipped = 0
    waited = inferred = 0.0  # seconds waiting for decoded batches vs running the model
    for index in indices:
        target = shard_path(shards_dir, index, plan.num_shards)
        ids = plan.shard_ids(index)
        if _shard_is_complete(target, key, ids):
            skipped += 1
            continue
        codes, reals = [], []
        batches = iter_decoded_batches([files[i] for i in ids], size, params.batch_size, params.decode_threads)
        progress = tqdm(total=len(ids), desc=f"shard {index + 1}/{plan.num_shards}", unit="img", leave=False, disable=None)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - start
            if batch is None:
                break
            start = time.perf_counter()
            real = session.run(None, {session.get_inputs()[0].name: batch})[0]
            codes.append(_pack(real))
            reals.append(real)
            inferred += time.perf_counter() - start
            progress.update(len(batch))
        progress.close()
        # queries keep their real-valued codes too: the asymmetric rerank of `evaluate` needs them
        query_real = np.concatenate(reals)[manifest.frame["query"].to_numpy()[ids]].astype(np.float32)
        _save_shard(target, key, ids, np.concatenate(codes), query_real, session.get_providers()[0])
        done += 1
    return {"shards": plan.num_shards, "encoded": done, "skipped": skipped, "images": int(len(plan.ids)),
            "provider": session.get_providers()[0],
            # decode keeps up when the model rarely waits for it
            "decode_wait_seconds": round(waited, 2), "inference_seconds": round(inferred, 2)}


def merge_shards(params: EncodeParams, onnx_path: Path, manifest_path: Path, shards_dirs: Sequence[Path], out_dir: Path) -> dict:
    """Collect every shard (from one or several directories) into codes.npz + database.faiss."""
    import faiss

    from adalabelhash.data.manifest import Manifest
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import atomic_directory, write_json

    manifest = Manifest.load(manifest_path)
    plan = plan_shards(params, manifest)
    key = shard_key(onnx_path, manifest.fingerprint())
    found = {p.name: p for d in shards_dirs for p in Path(d).glob("shard-*.npz")}
    codes, query_real, providers = [], [], set()
    for index in range(plan.num_shards):
        name = shard_path(Path("."), index, plan.num_shards).name
        if name not in found or not _shard_is_complete(found[name], key, plan.shard_ids(index)):
            raise UserError(f"shard {index + 1}/{plan.num_shards} is missing or belongs to another model/dataset: encode it first")
        with np.load(found[name]) as shard:
            codes.append(shard["codes"])
            providers.add(str(shard["provider"]) if "provider" in shard else "not recorded")  # shards before 2026-12-06
            query_real.append(shard["query_real"])
    codes, query_real = np.concatenate(codes), np.concatenate(query_real)
    database = manifest.frame["database"].to_numpy()[plan.ids]
    index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(codes.shape[1] * 8))
    index.add_with_ids(codes[database], plan.ids[database].astype(np.int64))
    summary = {
        "images": int(len(plan.ids)),
        "queries": int(manifest.frame["query"].to_numpy()[plan.ids].sum()),
        "database": int(database.sum()),
        "bits": int(codes.shape[1] * 8),
        "shards": plan.num_shards,
        "providers": sorted(providers),  # the onnxruntime execution providers that encoded the shards
        "dataset_fingerprint": manifest.fingerprint(),
    }
    with atomic_directory(out_dir) as tmp:
        np.savez(tmp / "codes.npz", ids=plan.ids, codes=codes, query_real=query_real)
        faiss.write_index_binary(index, str(tmp / "database.faiss"))
        write_json(tmp / "encode_summary.json", summary)
    return summary


def encode(params: EncodeParams, onnx_path: Path, manifest_path: Path, data_root: str | Path, shards_dir: Path, out_dir: Path) -> dict:
    """All shards (resuming finished ones), then the merge: what DVC runs."""
    progress = encode_shards(params, onnx_path, manifest_path, data_root, shards_dir)
    summary = merge_shards(params, onnx_path, manifest_path, [shards_dir], out_dir)
    return {**summary, "encoded_shards": progress["encoded"], "resumed_shards": progress["skipped"],
            "decode_wait_seconds": progress["decode_wait_seconds"], "inference_seconds": progress["inference_seconds"]}


def load_encoded(encoded_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(manifest row ids, packed codes) from a merged encode output. codes.npz also holds
    `query_real`: the real-valued (tanh) codes of the rows of `ids` that are queries, in order."""
    from adalabelhash.errors import UserError

    path = Path(encoded_dir) / "codes.npz"
    if not path.is_file():
        raise UserError(f"{path}: not found; run the encode step first")
    data = np.load(path)
    return data["ids"], data["codes"]


def load_query_real(encoded_dir: Path) -> np.ndarray:
    """The queries' real-valued codes, float32 (queries, K), in the order of the query rows of `ids`."""
    from adalabelhash.errors import UserError

    with np.load(Path(encoded_dir) / "codes.npz") as data:
        if "query_real" not in data.files:
            raise UserError(f"{encoded_dir}/codes.npz has no real-valued query codes: run the encode step again")
        return data["query_real"]


def iter_decoded_batches(paths: Sequence[Path], size: int, batch_size: int, threads: int) -> Iterator[np.ndarray]:
    """Model-ready float batches, decoded by a thread pool that stays `threads` batches ahead
    (a thread per batch: its objects, under a URL root, are fetched together)."""
    from concurrent.futures import ThreadPoolExecutor

    from adalabelhash.preprocess import load_batch, to_model_input

    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        ahead = iter(starts)
        for _ in range(threads + 1):
            start = next(ahead, None)
            if start is not None:
                pending.append(pool.submit(load_batch, paths[start : start + batch_size], size))
        while pending:
            future = pending.popleft()
            start = next(ahead, None)
            if start is not None:
                pending.append(pool.submit(load_batch, paths[start : start + batch_size], size))
            yield to_model_input(future.result())


def shard_key(onnx_path: Path, dataset_fingerprint: str) -> str:
    digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    return f"{digest[:16]}-{dataset_fingerprint[:16]}"


def shard_path(shards_dir: Path, index: int, count: int) -> Path:
    return Path(shards_dir) / f"shard-{index:05d}-of-{count:05d}.npz"


def _pack(codes: np.ndarray) -> np.ndarray:
    from adalabelhash.codes import pack_codes

    return pack_codes(codes)


def _shard_is_complete(path: Path, key: str, ids: np.ndarray) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as shard:
            # a shard from before queries kept their real-valued codes is encoded again
            return str(shard["key"]) == key and np.array_equal(shard["ids"], ids) and "query_real" in shard.files
    except (OSError, ValueError, KeyError):
        return False  # a foreign or damaged file: encode the shard again


def _save_shard(path: Path, key: str, ids: np.ndarray, codes: np.ndarray, query_real: np.ndarray,
                provider: str) -> None:
    from adalabelhash.fileio import atomic_output

    with atomic_output(path) as tmp:
        np.savez(tmp, key=np.array(key), ids=ids, codes=codes, query_real=query_real, provider=np.array(provider))


def tag_providers(onnx_path: Path, summary: dict) -> None:
    """Record the encoding providers on the model's MLflow run (convert-onnx's reference, beside model.onnx)."""
    from adalabelhash import tracking

    run_file = Path(onnx_path).parent / tracking.RUN_FILE
    if run_file.is_file():
        tracking.set_tags(tracking.RunRef.load(run_file), {"encode.providers": ", ".join(summary["providers"])})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `encode:`")
    parser.add_argument("--onnx", required=True, type=Path, help="model.onnx from convert-onnx")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--data-root", help="directory or URL (s3://...) the manifest paths are relative to")
    parser.add_argument("--shards-dir", required=True, type=Path, help="finished shards, kept for resuming")
    parser.add_argument("--out", type=Path, help="merged output: codes.npz, database.faiss")
    parser.add_argument("--shard", type=int, action="append", help="encode only this shard index (repeatable); no merge")
    parser.add_argument("--merge", action="store_true", help="only merge finished shards (from --shards-dir)")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.errors import UserError
    from adalabelhash.params import load_section

    params = load_section(EncodeParams, "encode", args.params)
    if args.merge or args.shard is None:
        if args.out is None:
            raise UserError("--out is required unless only encoding --shard")
    if not args.merge and args.data_root is None:
        raise UserError("--data-root is required to encode images")
    if args.merge:
        summary = merge_shards(params, args.onnx, args.manifest, [args.shards_dir], args.out)
    elif args.shard is not None:
        summary = encode_shards(params, args.onnx, args.manifest, args.data_root, args.shards_dir, only=args.shard)
        print(f"encoded {summary['encoded']} shard(s) on {summary['provider']}, {summary['skipped']} already done "
              f"-> {args.shards_dir}")
        return
    else:
        summary = encode(params, args.onnx, args.manifest, args.data_root, args.shards_dir, args.out)
    tag_providers(args.onnx, summary)
    print(f"{summary['queries']} queries + {summary['database']} database images, {summary['bits']} bits, "
          f"{summary['shards']} shard(s) on {', '.join(summary['providers'])} -> {args.out}")
    if "inference_seconds" in summary:
        print(f"  model {summary['inference_seconds']:.1f} s, waiting for decoded images {summary['decode_wait_seconds']:.1f} s")
