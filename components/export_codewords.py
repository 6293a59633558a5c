"""Step `export-codewords`: the learned label space, as files a person can read.

The codewords are the model's label space: what related classes share shows up as small
Hamming distances between their binarised codewords. This step saves them and the evidence.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adalabelhash.tracking import RunRef


@dataclass(frozen=True)
class ExportCodewordsParams:
    """params.yaml `export_codewords:`."""

    nearest_pairs: int = 10  # how many closest class pairs to list
    # Optional semantic grouping to test the codewords against, e.g. CIFAR-10
    # {vehicles: [airplane, automobile, ship, truck], animals: [bird, cat, ...]}
    groups: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.nearest_pairs < 1:
            raise ValueError(f"nearest_pairs must be >= 1, got {self.nearest_pairs}")


def export_codewords(params: ExportCodewordsParams, model_path: Path, out_dir: Path) -> dict:
    """Outputs: codewords.npy (C x K bits), codewords.json, distances.csv, heatmap.png, nearest_pairs.json."""
    import numpy as np

    from adalabelhash.codes import binarize
    from adalabelhash.fileio import atomic_directory, write_json
    from adalabelhash.metrics import codeword_distance_matrix, nearest_class_pairs
    from adalabelhash.model import codewords_numpy, load_model

    loaded = load_model(model_path)
    names = loaded.class_names
    soft = codewords_numpy(loaded.model)
    bits = binarize(soft)
    distances = codeword_distance_matrix(bits)
    pairs = nearest_class_pairs(distances, names, params.nearest_pairs)
    groups = group_distances(distances, names, params.groups)
    summary = {
        "classes": len(names),
        "bits": int(bits.shape[1]),
        "min_distance": int(distances[~np.eye(len(names), dtype=bool)].min()),
        "mean_distance": float(distances[~np.eye(len(names), dtype=bool)].mean()),
        # how close the soft codewords are to cube vertices (1.0 = saturated)
        "mean_abs_codeword": float(np.abs(soft).mean()),
        "nearest_pairs": [{"a": a, "b": b, "distance": int(d)} for a, b, d in pairs],
        **({"groups": groups} if groups else {}),
    }
    with atomic_directory(out_dir) as tmp:
        np.save(tmp / "codewords.npy", bits)
        write_json(tmp / "codewords.json", {
            "bits": int(bits.shape[1]),
            "codewords": {name: "".join(map(str, row)) for name, row in zip(names, bits)},
            "soft_codewords": {name: [round(float(v), 4) for v in row] for name, row in zip(names, soft)},
        })
        _write_matrix_csv(tmp / "distances.csv", distances, names)
        write_json(tmp / "codeword_summary.json", summary)
        plot_heatmap(distances, names, tmp / "heatmap.png", title=f"Hamming distance between {bits.shape[1]}-bit codewords")
    return summary


def group_distances(distances, names: list[str], groups: dict) -> dict:
    """Mean codeword distance within each group and across groups (a test of semantic structure)."""
    import numpy as np

    if not groups:
        return {}
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({c for members in groups.values() for c in members} - set(index))
    if unknown:
        from adalabelhash.errors import UserError

        raise UserError(f"export_codewords.groups names unknown classes: {', '.join(unknown)}")
    member = {index[c]: g for g, members in groups.items() for c in members}
    within: dict[str, list[int]] = {g: [] for g in groups}
    across: list[int] = []
    for i in member:
        for j in member:
            if i < j:
                (within[member[i]] if member[i] == member[j] else across).append(int(distances[i, j]))
    result = {f"within_{g}": float(np.mean(v)) for g, v in within.items() if v}
    if across:
        result["across_groups"] = float(np.mean(across))
    return result


def _write_matrix_csv(path: Path, matrix, names: list[str]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *names])
        for name, row in zip(names, matrix):
            writer.writerow([name, *map(int, row)])


def plot_heatmap(distances, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(distances, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(distances[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if distances[i, j] < distances.max() / 2 else "black")
    fig.colorbar(image, ax=ax, label="Hamming distance")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_codewords_tracked(params: ExportCodewordsParams, model_path: Path, out_dir: Path, upstream) -> tuple[dict, "RunRef"]:
    from adalabelhash import tracking

    ref = tracking.attach(upstream, "export_codewords", params)
    with tracking.step_status(ref):
        summary = export_codewords(params, model_path, out_dir)
        metrics = {"codeword_min_distance": summary["min_distance"], "codeword_mean_distance": summary["mean_distance"],
                   "codeword_mean_abs": summary["mean_abs_codeword"]}
        metrics.update({f"codeword_{k}": v for k, v in summary.get("groups", {}).items()})
        tracking.log_metrics(ref, metrics)
        tracking.log_artifacts(ref, sorted(Path(out_dir).glob("*")), "codewords")
    ref.save(out_dir)
    return summary, ref


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `export_codewords:`")
    parser.add_argument("--model", required=True, type=Path, help="output directory of the train step")
    parser.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section

    params = load_section(ExportCodewordsParams, "export_codewords", args.params)
    summary, _ = export_codewords_tracked(params, args.model / "model.pt", args.out, args.model)
    pairs = ", ".join(f"{p['a']}-{p['b']} ({p['distance']})" for p in summary["nearest_pairs"][:5])
    print(f"{summary['classes']} codewords of {summary['bits']} bits -> {args.out}; nearest pairs: {pairs}")
