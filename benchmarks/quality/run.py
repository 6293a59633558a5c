"""Retrieval quality on CIFAR-10: AdaLabelHash vs frozen codewords vs CSQ, through the pipeline's own steps.

One call = one (protocol, method, bits) run: prepare -> validate -> train -> export-codewords ->
convert-onnx -> encode -> evaluate, each the step function `dvc repro` runs, logged to MLflow
(experiment `adalabelhash-cifar10-quality`). The result row is appended to results.jsonl;
`--table` prints the results and the codeword-group tables (markdown) from it; `--readme` writes
them into README.md between its table markers.

    python benchmarks/quality/run.py --protocol I --method adalabelhash --bits 48 --epochs 30
    python benchmarks/quality/run.py --protocol II --method csq --bits 48 --preset gpu    # CUDA machine
    python benchmarks/quality/run.py ... -S convert_onnx.flip_average=true --from-run RUN --tag T  # RUN's model, re-encoded
    python benchmarks/quality/run.py --table
    python benchmarks/quality/run.py --readme
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # params paths (.cache/cifar10) are relative to the repository

import yaml  # noqa: E402

RUNS = HERE / "runs"
RESULTS = HERE / "results.jsonl"
TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
# Where the codes sit (components.evaluate.code_structure), recorded with each row.
STRUCTURE = ("query_codeword_accuracy", "query_codeword_distance", "within_class_distance", "across_class_distance")


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for section, values in layer.items():
            out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def run_name(args) -> str:
    """The row's name: its directory under runs/, its results.jsonl `run` and its MLflow run name."""
    return f"{args.protocol}-{args.method}-{args.bits}-{args.preset}" + (f"-{args.tag}" if args.tag else "")


def build_params(args) -> dict:
    from adalabelhash.params import load_params
    from pipelines.cli import apply_overrides

    presets = yaml.safe_load((HERE / "presets.yaml").read_text())
    base = load_params(REPO / "params.yaml")
    base.pop("kfp", None)
    params = merged(base, presets["protocols"][args.protocol], presets["methods"][args.method],
                    presets["presets"][args.preset], {k: presets[k] for k in ("evaluate", "export_codewords")},
                    {"train": {"bits": args.bits, "epochs": args.epochs},
                     "mlflow": {"experiment": "adalabelhash-cifar10-quality", "run_name": run_name(args),
                                "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{RUNS / 'mlflow.db'}")}})
    return apply_overrides(params, args.set or [])


def prepared(params: dict, protocol: str) -> tuple[Path, Path]:
    """The protocol's manifest and passed validation, built once and reused by every run.

    A gate report carried without its manifest (to a GPU machine, say) gets the manifest rebuilt;
    train refuses it unless that is the dataset version the gate passed."""
    from adalabelhash.params import parse_section
    from components.get_data import get_data
    from components.prepare import PrepareParams, prepare
    from components.validate import ValidateParams, validate

    root = Path(params["prepare"]["root"])
    if not root.is_dir():
        get_data("cifar10", root, tarball=TARBALL if TARBALL.is_file() else None)
    work = RUNS / f"prepare-{protocol}"
    manifest, gate = work / "prepare" / "manifest.parquet", work / "validate"
    if not manifest.is_file():
        prepare(parse_section(PrepareParams, params["prepare"], "prepare"), manifest.parent)
    if not (gate / "validation.json").is_file():
        validate(parse_section(ValidateParams, params["validate"], "validate"), manifest, gate, root)
    return manifest, gate


def run(args) -> dict:
    from adalabelhash.params import parse_section
    from components.convert_onnx import ConvertOnnxParams, convert_onnx_tracked
    from components.encode import EncodeParams, encode
    from components.evaluate import EvaluateParams, evaluate_tracked
    from components.export_codewords import ExportCodewordsParams, export_codewords_tracked
    from components.train import train_tracked

    params = build_params(args)
    manifest, validation = prepared(params, args.protocol)
    root = Path(params["prepare"]["root"])
    name = run_name(args)
    work = RUNS / name
    if args.from_run:
        reuse_checkpoints(params, manifest, RUNS / args.from_run, work)
    started = time.perf_counter()
    summary, ref = train_tracked(params, manifest, root, validation, work / "train", work / "checkpoints",
                                 cache_dir=REPO / ".cache" / "decoded", source="benchmarks/quality")
    codewords, ref = export_codewords_tracked(parse_section(ExportCodewordsParams, params["export_codewords"],
                                                            "export_codewords"), work / "train" / "model.pt",
                                              work / "codewords", ref)
    _, ref = convert_onnx_tracked(parse_section(ConvertOnnxParams, params["convert_onnx"], "convert_onnx"),
                                  work / "train", manifest, root, work / "codewords", work / "onnx", ref)
    encoded_at = time.perf_counter()
    encoded = encode(parse_section(EncodeParams, params["encode"], "encode"),
           work / "onnx" / "model.onnx", manifest, root, work / "shards", work / "encode")
    encode_seconds = time.perf_counter() - encoded_at
    metrics, ref = evaluate_tracked(parse_section(EvaluateParams, params["evaluate"], "evaluate"), work / "encode",
                                    manifest, root, work / "evaluate", work / "codewords" / "codewords.npy", ref)
    row = {
        "run": name, "protocol": args.protocol, "method": args.method, "bits": args.bits, "preset": args.preset,
        "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores; trained on {summary['hardware']}",
        "backbone": params["train"]["backbone"], "image_size": params["train"]["image_size"],
        "epochs": summary["epochs_run"], "best_epoch": summary["best_epoch"], "val_mAP": summary["best_value"],
        "train_minutes": round(summary["epoch_seconds_total"] / 60, 1),
        "resumed_from_epoch": summary["resumed_from_epoch"], "encode_minutes": round(encode_seconds / 60, 1),
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
        "encode_inference_s": encoded["inference_seconds"], "encode_decode_wait_s": encoded["decode_wait_seconds"],
        "overrides": args.set or [], "from_run": args.from_run, "mlflow_run_id": ref.run_id,
        **{k: metrics[k] for k in ("mAP", "mAP_stable", "mAP_at_1000", "mAP_at_1000_stable", "P_at_1000",
                                   "P_radius_2", "queries", "database", *STRUCTURE)},
        "codeword_groups": codewords.get("groups", {}),
        "group_separation": group_separation(work / "codewords" / "distances.csv", params["export_codewords"]["groups"]),
        "nearest_pairs": codewords["nearest_pairs"][:5],
    }
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2))
    return row


def reuse_checkpoints(params: dict, manifest: Path, source: Path, work: Path) -> None:
    """Start from `source`'s checkpoints, so that training resumes after its last epoch: the same
    trained model, taken through other export/convert/encode/evaluate settings without training again.
    Refused unless `source` was trained with these train settings on this dataset version."""
    from adalabelhash.data.manifest import Manifest
    from adalabelhash.params import parse_section
    from adalabelhash.train_config import TrainConfig

    if not source.is_dir():
        sys.exit(f"--from-run: no run '{source.name}' in {source.parent}")
    identity = parse_section(TrainConfig, params["train"], "train").identity(Manifest.load(manifest).fingerprint())
    checkpoint = source / "checkpoints" / identity / "last.pt"
    if not checkpoint.is_file():
        sys.exit(f"--from-run: {checkpoint} not found ({source.name} was not trained with these train settings)")
    if work.exists():
        sys.exit(f"--from-run: {work} exists; pick another --tag")
    shutil.copytree(checkpoint.parent, work / "checkpoints" / identity)


def read_distances(distances_csv: Path):
    """export-codewords' distances.csv -> (class names, C x C Hamming distances)."""
    import numpy as np

    classes = distances_csv.read_text().splitlines()[0].split(",")[1:]
    return classes, np.loadtxt(distances_csv, delimiter=",", skiprows=1, usecols=range(1, len(classes) + 1)).astype(int)


def group_separation(distances_csv: Path, groups: dict[str, list[str]]) -> dict:
    """How far apart the two class groups' codewords are, and how often a random split of the classes
    into groups of the same sizes is at least as far apart (exact over every split: a p-value)."""
    import itertools

    import numpy as np

    classes, distances = read_distances(distances_csv)
    first, second = groups.values()
    pairs = list(itertools.combinations(range(len(classes)), 2))

    def gap(members: set[int]) -> float:  # mean distance across the groups - mean within them
        across = [distances[a, b] for a, b in pairs if (a in members) != (b in members)]
        within = [distances[a, b] for a, b in pairs if (a in members) == (b in members)]
        return float(np.mean(across) - np.mean(within))

    observed = gap({classes.index(name) for name in first})
    splits = [gap(set(split)) for split in itertools.combinations(range(len(classes)), len(first))]
    return {"gap": round(observed, 2), "p_value": round(sum(g >= observed - 1e-9 for g in splits) / len(splits), 3),
            "splits": len(splits), "sizes": [len(first), len(second)]}


FIGURES = {  # run -> what its heatmap shows
    "II-adalabelhash-48-cpu-e16": "protocol II, learned codewords (AdaLabelHash, 16 epochs)",
    "II-frozen-48-cpu-e8": "protocol II, frozen codewords (fixed centres)",
    "I-adalabelhash-48-cpu-head": "protocol I, learned codewords (96 px, 30 epochs)",
}


def figures() -> None:
    """README figures from the runs' own outputs: codeword heatmaps with titles, the examples grid as JPEG."""
    from PIL import Image

    from components.export_codewords import plot_heatmap

    out = HERE / "figures"
    out.mkdir(exist_ok=True)
    for name, title in FIGURES.items():
        classes, distances = read_distances(RUNS / name / "codewords" / "distances.csv")
        plot_heatmap(distances, classes, out / f"codewords-{name}.png", title=title)
    examples = Image.open(RUNS / "I-adalabelhash-48-cpu-head" / "evaluate" / "examples.png").convert("RGB")
    examples.save(out / "examples-I-adalabelhash-48-cpu-head.jpg", quality=85)


def table() -> str:
    """Markdown table of results.jsonl: per protocol and code length, the compared rows first, tuning after."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    kind = {"r160": 0, "r128": 1, "head": 2, "flip": 3, "e16": 3, "e8": 4, "e4": 5, "cheap": 6}
    lines = ["| protocol | bits | method | px | epochs | train min | mAP (tie-aware) | mAP (stable) | mAP@1000 | P@1000 | P r<=2 | codeword acc. | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["protocol"], r["bits"], kind.get(r["run"].rsplit("-", 1)[-1], len(kind)), r["run"])):
        lines.append(f"| {r['protocol']} | {r['bits']} | {r['method']} | {r['image_size']} | {r['epochs']} | {r['train_minutes']} | "
                     f"{r['mAP']:.4f} | {r['mAP_stable']:.4f} | {r['mAP_at_1000']:.4f} | {r['P_at_1000']:.4f} | "
                     f"{r['P_radius_2']:.4f} | {r['query_codeword_accuracy']:.3f} | {r['run']} |")
    lines += ["", "| run | mean codeword distance within vehicles | within animals | across | gap (p) | nearest pairs "
                  "| queries to own codeword | codes within a class | across classes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["protocol"], r["bits"], r["run"])):
        groups = r["codeword_groups"]
        pairs = ", ".join(f"{p['a']}-{p['b']} {p['distance']}" for p in r["nearest_pairs"][:3])
        separation = r["group_separation"]
        gap = f"{separation['gap']:.2f} ({separation['p_value']:.3f})"
        spread = " | ".join(f"{r[k]:.1f}" for k in STRUCTURE[1:])
        lines.append(f"| {r['run']} | {groups['within_vehicles']:.1f} | {groups['within_animals']:.1f} | "
                     f"{groups['across_groups']:.1f} | {gap} | {pairs} | {spread} |")
    return "\n".join(lines)


def write_readme_tables(readme: Path) -> None:
    """Replace each `<!-- NAME table: ... -->` ... `<!-- end NAME table -->` block of the README with the fresh table."""
    from adalabelhash.fileio import write_text

    text = readme.read_text()
    for name, body in zip(("results", "codewords"), table().split("\n\n")):
        pattern = rf"(<!-- {name} table:[^\n]*-->\n).*?(<!-- end {name} table -->)"
        text, replaced = re.subn(pattern, lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.S)
        if not replaced:
            sys.exit(f"{readme}: no '<!-- {name} table: ... -->' ... '<!-- end {name} table -->' markers")
    write_text(readme, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["I", "II"])
    parser.add_argument("--method", choices=["adalabelhash", "frozen", "csq"])
    parser.add_argument("--bits", type=int, choices=[16, 32, 48, 64])
    parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tag", help="suffix for the run name (e.g. a tuning variant)")
    parser.add_argument("-S", "--set", action="append", help="params override SECTION.KEY=VALUE (repeatable)")
    parser.add_argument("--from-run", help="start from this run's checkpoints (same train settings): no training, "
                                           "its model through the other steps again (e.g. -S convert_onnx.flip_average=true)")
    parser.add_argument("--table", action="store_true", help="print the results table (markdown)")
    parser.add_argument("--readme", action="store_true", help="write the tables into README.md (between its table markers)")
    parser.add_argument("--figures", action="store_true", help="write the README figures from runs/ into figures/")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    if args.readme:
        write_readme_tables(HERE / "README.md")
        return
    if args.figures:
        figures()
        return
    if not (args.protocol and args.method and args.bits):
        parser.error("--protocol, --method and --bits are required (or --table / --readme / --figures)")
    if not TARBALL.is_file() and not (REPO / ".cache" / "cifar10").is_dir():
        sys.exit(f"skipped: {TARBALL} is absent (see ../shared/datasets/README.md)")
    run(args)


if __name__ == "__main__":
    main()
