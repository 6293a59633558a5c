"""Step `evaluate`: retrieval quality of the encoded queries against the encoded database.

The headline numbers use the tie-aware policy (the expectation over all orders of items at
equal Hamming distance); the peer-comparable stable-sort variant is reported beside them
with a `_stable` suffix, and with `rerank: N` the asymmetric rerank of the top N with a
`_rerank` suffix (metrics.reranked_average_precision). See adalabelhash/metrics.py for the exact definitions.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adalabelhash.tracking import RunRef


@dataclass(frozen=True)
class EvaluateParams:
    """params.yaml `evaluate:`."""

    topk: list[int] = field(default_factory=lambda: [1000])  # mAP@k cut-offs (clipped to the database)
    precision_at: list[int] = field(default_factory=lambda: [100, 1000])  # P@N
    radius: int = 2  # precision within this Hamming radius
    stable_seed: int = 0  # database permutation of the peer-comparable stable-sort variant
    pr_points: int = 64  # sampled cut-offs of the precision@N / recall@N curve
    examples: int = 6  # queries shown in the retrieval-examples grid
    example_k: int = 10  # results per query in the grid
    rerank: int = 0  # > 0: also mAP / mAP@k with the top `rerank` reordered by the queries' real-valued codes (0: off)

    def __post_init__(self):
        if any(k < 1 for k in [*self.topk, *self.precision_at]) or self.radius < 0:
            raise ValueError("topk and precision_at must be >= 1, radius >= 0")
        if self.examples < 0 or self.example_k < 1 or self.pr_points < 2 or self.rerank < 0:
            raise ValueError("examples must be >= 0, example_k >= 1, pr_points >= 2, rerank >= 0")


def evaluate(params: EvaluateParams, encoded_dir: Path, manifest_path: Path, data_root: str | Path | None, out_dir: Path,
             codewords_path: Path | None = None) -> dict:
    """Outputs: metrics.json, pr_radius.csv, pr_at_n.csv (DVC plots), pr.png, examples.png."""
    import numpy as np

    from adalabelhash.data.manifest import Manifest
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import atomic_directory, write_json
    from adalabelhash.metrics import retrieval_metrics
    from components.encode import load_encoded

    manifest = Manifest.load(manifest_path)
    ids, codes = load_encoded(encoded_dir)
    frame = manifest.frame
    labels = manifest.label_matrix()
    is_query = frame["query"].to_numpy()[ids]
    is_db = frame["database"].to_numpy()[ids]
    if not is_query.any() or not is_db.any():
        raise UserError(f"{encoded_dir}: needs encoded queries and database items (found {is_query.sum()} and {is_db.sum()})")
    q_ids, db_ids = ids[is_query], ids[is_db]
    q_codes, db_codes = codes[is_query], codes[is_db]
    q_labels, db_labels = labels[q_ids], labels[db_ids]
    options = dict(topk=params.topk, precision_at=params.precision_at, radius=params.radius)
    expected = retrieval_metrics(q_codes, q_labels, db_codes, db_labels, pr_points=params.pr_points, **options)
    stable = retrieval_metrics(q_codes, q_labels, db_codes, db_labels, tie_policy="stable", seed=params.stable_seed,
                               pr_points=2, **options)

    scalar_keys = ["mAP", *[f"mAP_at_{k}" for k in params.topk], *[f"P_at_{p}" for p in params.precision_at],
                   f"P_radius_{params.radius}"]
    metrics = {key: round(expected[key], 6) for key in scalar_keys}
    metrics.update({f"{key}_stable": round(stable[key], 6) for key in scalar_keys if key.startswith("mAP")})
    if params.rerank:  # beside the headline, which stays Hamming-only so the promotion gate compares like with like
        from adalabelhash.metrics import reranked_average_precision
        from components.encode import load_query_real

        reranked = reranked_average_precision(load_query_real(encoded_dir), q_labels, db_codes, db_labels,
                                              rerank=params.rerank, topk=params.topk)
        metrics.update({f"{key}_rerank": round(value, 6) for key, value in reranked.items()})
    codewords = np.load(codewords_path) if codewords_path is not None else None
    if codewords is not None and codewords.shape != (len(manifest.classes), codes.shape[1] * 8):
        raise UserError(f"{codewords_path}: codewords of shape {codewords.shape} do not fit "
                        f"{len(manifest.classes)} classes x {codes.shape[1] * 8} bits")
    metrics.update(code_structure(q_codes, q_labels, db_codes, db_labels, codewords))
    metrics.update({
        "bits": expected["bits"],
        "queries": expected["queries"],
        "database": expected["database"],
        "zero_relevant_queries": expected["zero_relevant_queries"],
        "empty_radius_queries": expected["empty_radius_queries"],
        "stable_seed": params.stable_seed,
        "dataset_fingerprint": manifest.fingerprint(),
    })

    with atomic_directory(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        _write_curve(tmp / "pr_radius.csv", expected["pr_radius"], ["radius", "precision", "recall"])
        _write_curve(tmp / "pr_at_n.csv", expected["pr_at_n"], ["n", "precision", "recall"])
        plot_curves(expected, tmp / "pr.png")
        if params.examples and data_root is not None:
            examples_grid(manifest, data_root, q_ids, q_codes, db_ids, db_codes, params, tmp / "examples.png")
    return metrics


def code_structure(q_codes, q_labels, db_codes, db_labels, codewords=None) -> dict:
    """Where the codes sit, in mean Hamming distances: within a class and across classes (database),
    and, given the {0, 1} codewords, the queries' nearest-codeword accuracy and distance to their own."""
    import numpy as np

    from adalabelhash.metrics import class_code_spread, nearest_codeword_classify, own_codeword_distance

    spread = class_code_spread(db_codes, db_labels)
    out = {"within_class_distance": round(spread["within"], 4), "across_class_distance": round(spread["across"], 4)}
    if codewords is not None:
        packed = np.packbits(codewords, axis=1)
        predicted = nearest_codeword_classify(q_codes, packed)
        out["query_codeword_accuracy"] = round(float((q_labels[np.arange(len(q_codes)), predicted] > 0).mean()), 6)
        out["query_codeword_distance"] = round(float(own_codeword_distance(q_codes, packed, q_labels).mean()), 4)
    return out


def _write_curve(path: Path, curve: dict, columns: list[str]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*(curve[c] for c in columns)))


def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    pr = result["pr_radius"]
    left.plot(pr["recall"], pr["precision"], marker=".")
    left.set(xlabel="recall", ylabel="precision", title="PR by Hamming radius", xlim=(0, 1.02), ylim=(0, 1.02))
    at_n = result["pr_at_n"]
    right.plot(at_n["n"], at_n["precision"])
    right.set(xlabel="N (returned items)", ylabel="precision@N", title="precision@N (tie-aware)", ylim=(0, 1.02))
    right.set_xscale("log")
    fig.suptitle(f"{result['bits']} bits, mAP {result['mAP']:.3f}, {result['queries']} queries", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def examples_grid(manifest, data_root: str | Path, q_ids, q_codes, db_ids, db_codes, params: EvaluateParams, path: Path) -> None:
    """Rows: a query then its top-k database images; wrong results (no shared label) framed red."""
    import numpy as np
    from PIL import Image, ImageDraw

    from adalabelhash.metrics import hamming_distances
    from adalabelhash.preprocess import load_image

    cell, border = 72, 4
    labels = manifest.label_matrix()
    picks = np.linspace(0, len(q_ids) - 1, min(params.examples, len(q_ids))).round().astype(int)
    distances = hamming_distances(q_codes[picks], db_codes)
    k = min(params.example_k, len(db_ids))
    canvas = Image.new("RGB", ((k + 1) * (cell + border) + border, len(picks) * (cell + border) + border), "white")
    draw = ImageDraw.Draw(canvas)
    files = manifest.files(data_root)
    for row, (pick, dist) in enumerate(zip(picks, distances)):
        top = np.argsort(dist, kind="stable")[:k]
        query = q_ids[pick]
        items = [(query, "gray")] + [
            (db_ids[t], "green" if (labels[query] & labels[db_ids[t]]).any() else "red") for t in top
        ]
        for col, (item, colour) in enumerate(items):
            x, y = border + col * (cell + border), border + row * (cell + border)
            draw.rectangle([x - border // 2, y - border // 2, x + cell + border // 2 - 1, y + cell + border // 2 - 1], fill=colour)
            thumb = Image.fromarray(load_image(files[item], cell - 2 * border))
            canvas.paste(thumb, (x + border, y + border))
    canvas.save(path)


def evaluate_tracked(params: EvaluateParams, encoded_dir: Path, manifest_path: Path, data_root: str | Path | None,
                     out_dir: Path, codewords_path: Path | None, upstream) -> tuple[dict, "RunRef"]:
    from adalabelhash import tracking

    ref = tracking.attach(upstream, "evaluate", params)
    with tracking.step_status(ref):
        metrics = evaluate(params, encoded_dir, manifest_path, data_root, out_dir, codewords_path)
        tracking.log_metrics(ref, {k: v for k, v in metrics.items() if k not in ("stable_seed",)})
        tracking.log_artifacts(ref, sorted(Path(out_dir).glob("*")), "evaluation")
        log_database(ref, encoded_dir, manifest_path)
    ref.save(out_dir)
    return metrics, ref


def log_database(ref: "RunRef", encoded_dir: Path, manifest_path: Path) -> None:
    """The database codes with ids, labels and paths, into the run the registered version points at
    (promote registers this step's run), so `serve` needs nothing but the tracking URI."""
    if ref.run_id is None:
        return
    import tempfile

    from adalabelhash import tracking
    from adalabelhash.database import ARTIFACT_PATH, database_from_encoded, write_database

    with tempfile.TemporaryDirectory() as tmp:
        write_database(database_from_encoded(encoded_dir, manifest_path), Path(tmp) / ARTIFACT_PATH)
        tracking.log_artifacts(ref, [Path(tmp) / ARTIFACT_PATH], ARTIFACT_PATH)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `evaluate:`")
    parser.add_argument("--run", required=True, type=Path, help="mlflow_run.json of the upstream step (or its directory)")
    parser.add_argument("--encoded", required=True, type=Path, help="output directory of the encode step")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--data-root", help="images (directory or URL), for the retrieval-examples grid")
    parser.add_argument("--codewords", type=Path, help="codewords.npy from export-codewords: adds query codeword accuracy")
    parser.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section

    params = load_section(EvaluateParams, "evaluate", args.params)
    m, _ = evaluate_tracked(params, args.encoded, args.manifest, args.data_root, args.out, args.codewords, args.run)
    extra = "".join(f", {k} {m[k]:.4f}" for k in m if k.startswith("mAP_at_") and not k.endswith("stable"))
    print(f"{m['bits']} bits, {m['queries']} queries x {m['database']} database: mAP {m['mAP']:.4f}{extra} "
          f"(stable-sort {m['mAP_stable']:.4f}) -> {args.out}/metrics.json")
