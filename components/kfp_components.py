"""Kubeflow Pipelines components: one thin lightweight component per step.

KFP serialises only each function's body, so every import lives inside it; the bodies call
the same step functions as `dvc repro`, from the package installed in the image
(pipelines/config.py). Directories travel as typed artifacts. The prepared `Dataset` holds
manifest.parquet and its metadata names the data root, never a copy of the images: every step
that reads images reads them there (`config.image_root`: the data PVC mounted in that step, a
bucket URL, or the embedded digits generated in the pod), and an encode shard reads only its own
rows. The MLflow run reference travels between steps as a JSON string (RunRef.to_json()). Helpers the bodies share
live in pipelines/config.py: at run time kfp.dsl has no `component`, so this module cannot be
imported there.
"""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.config import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_dataset(prepare: dict, data_root: str, data_version: str, dataset: Output[Dataset]):
    """Write manifest.parquet into `dataset`; its metadata names where the images stay.

    `digits` is generated in the pod (no external data); other sources are read at `data_root`,
    a path mounted in the pod (the data PVC) or a bucket URL (`s3://...`), and never copied.
    `data_version` is an input so that KFP's cache key changes when the data does.
    """
    import dataclasses

    from adalabelhash.data.paths import require_directory
    from adalabelhash.errors import UserError
    from components.prepare import prepare as build_manifest
    from pipelines.config import embedded_digits, section

    params = section("prepare", prepare)
    if params.source == "digits":
        root, data_root = embedded_digits(), ""
    elif not data_root:
        raise UserError(f"prepare.source {params.source} reads the data_root pipeline parameter (a directory "
                        "mounted in the pod or a bucket URL, s3://...), which is empty")
    else:
        require_directory(data_root, "data_root pipeline parameter", " (a directory mounted in the pod or a bucket URL)")
        root = data_root
    summary = build_manifest(dataclasses.replace(params, root=root), dataset.path)
    dataset.metadata.update({"source": params.source, "images": summary["images"], "classes": summary["classes"],
                             "fingerprint": summary["fingerprint"], "data_version": data_version,
                             "data_root": data_root})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_dataset(validate: dict, dataset: Input[Dataset], report: Output[Artifact],
                     data_docs: Output[HTML]) -> bool:
    """The data gate. It returns pass/fail instead of failing, so that the Data Docs of a failed
    gate are published (a failed task publishes nothing); the pipeline stops on False."""
    import shutil
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME
    from adalabelhash.data.validation import DOCS_NAME
    from components.validate import GateFailed, validate as check
    from pipelines.config import image_root, section

    try:
        summary = check(section("validate", validate), Path(dataset.path) / MANIFEST_NAME, report.path,
                        image_root(dataset.metadata))
    except GateFailed as exc:
        print(exc.details)
        summary = exc.summary
    shutil.copyfile(Path(report.path) / DOCS_NAME, data_docs.path)
    report.metadata.update({k: summary[k] for k in ("success", "expectations", "failed", "images", "fingerprint")})
    return bool(summary["success"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_gate_failed(report: Input[Artifact]):
    """Fail the pipeline with the gate's failures (the Else branch of the data gate)."""
    from pathlib import Path

    from adalabelhash.data.validation import REPORT_NAME, format_failures
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import read_json

    result = read_json(Path(report.path) / REPORT_NAME)
    print(format_failures(result["failures"], result["summary"]["expectations"]))
    raise UserError(f"data gate failed: {result['summary']['failed']} of {result['summary']['expectations']} "
                    "expectations; see the data_docs artifact of the validate step")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_model(prepare: dict, validate: dict, train: dict, mlflow: dict, dataset: Input[Dataset],
                validation: Input[Artifact], checkpoint_dir: str, model: Output[Model]) -> str:
    """Train; start the pipeline's MLflow run and return its reference.

    `checkpoint_dir` ("" for none) is a mounted volume: a retried task resumes from the last epoch.
    With `train.processes` > 1, train_tracked launches torchrun in this pod (DDP, one process per GPU).
    """
    import dataclasses
    from pathlib import Path

    from adalabelhash import tracking
    from adalabelhash.data.manifest import MANIFEST_NAME
    from components.train import train_tracked
    from pipelines.config import image_root, section

    sections = {"prepare": prepare, "validate": validate, "train": train, "mlflow": mlflow}
    all_params = {name: dataclasses.asdict(section(name, values)) for name, values in sections.items()}
    summary, ref = train_tracked(all_params, Path(dataset.path) / MANIFEST_NAME, image_root(dataset.metadata),
                                 Path(validation.path), Path(model.path),
                                 checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None, source="kfp")
    if dataset.metadata.get("data_version"):
        tracking.set_tags(ref, {"dataset.data_version": dataset.metadata["data_version"]})
    model.metadata.update({"framework": "pytorch", **{k: summary[k] for k in (
        "backbone", "bits", "monitor", "best_value", "best_epoch", "epochs_run", "dataset_fingerprint")}})
    return ref.to_json()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export_codewords(export_codewords: dict, model: Input[Model], run: str, codewords: Output[Artifact],
                     summary: Output[Markdown]) -> str:
    """The binarised codewords, their distances and heatmap; a readable summary."""
    from pathlib import Path

    from adalabelhash.tracking import RunRef
    from components.export_codewords import export_codewords_tracked
    from pipelines.config import section

    result, ref = export_codewords_tracked(section("export_codewords", export_codewords), Path(model.path) / "model.pt",
                                           Path(codewords.path), RunRef.from_json(run))
    lines = [f"# Codewords: {result['classes']} classes x {result['bits']} bits", "",
             f"Hamming distance between classes: min {result['min_distance']}, mean {result['mean_distance']:.2f}; "
             f"mean |codeword| {result['mean_abs_codeword']:.3f} (1 = saturated)", "",
             "| class | class | distance |", "|---|---|---|"]
    lines += [f"| {p['a']} | {p['b']} | {p['distance']} |" for p in result["nearest_pairs"]]
    lines += [f"\n{name}: {value:.2f}" for name, value in result.get("groups", {}).items()]
    Path(summary.path).write_text("\n".join(lines) + "\n")
    codewords.metadata.update({k: result[k] for k in ("classes", "bits", "min_distance")})
    return ref.to_json()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def convert_onnx(convert_onnx: dict, monitor: dict, model: Input[Model], dataset: Input[Dataset],
                 codewords: Input[Artifact], run: str, onnx_model: Output[Model]) -> str:
    """model.onnx with its bit-parity check; logged to MLflow as the model promote registers, with
    its reference profile (the monitor step's baseline once it is champion) beside it."""
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME
    from adalabelhash.tracking import RunRef
    from components.convert_onnx import convert_onnx_tracked
    from pipelines.config import image_root, section

    report, ref = convert_onnx_tracked(section("convert_onnx", convert_onnx), Path(model.path),
                                       Path(dataset.path) / MANIFEST_NAME, image_root(dataset.metadata),
                                       Path(codewords.path), Path(onnx_model.path), RunRef.from_json(run),
                                       section("monitor", monitor))
    onnx_model.metadata.update({"framework": "onnx", "mlflow_model_uri": ref.model_uri,
                                **{k: report[k] for k in ("bits", "image_size", "bit_agreement")}})
    return ref.to_json()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def score_champion(promote: dict, encode: dict, evaluate: dict, mlflow: dict, dataset: Input[Dataset],
                   champion: Output[Artifact]):
    """The current @champion re-scored on this run's data (its encoder from the registry, the encode and
    evaluate code): what monitor and promote compare with. Never cached: it reads the registry."""
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME
    from components.score_champion import resolve_tracked, score
    from pipelines.config import image_root, section

    promote_params = section("promote", promote)
    found, note, uri = resolve_tracked(promote_params, section("mlflow", mlflow))
    print(f"score-champion: {note}")
    result = score(section("encode", encode), section("evaluate", evaluate), found, Path(dataset.path) / MANIFEST_NAME,
                   image_root(dataset.metadata), Path(champion.path), uri, promote_params.metric)
    champion.metadata.update({"version": result["version"] or "", "value": result["value"] or 0.0})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def monitor_data(monitor: dict, dataset: Input[Dataset], champion: Input[Artifact], force_retrain: bool,
                 drift: Output[Artifact], report: Output[HTML], trigger_reason: dsl.OutputPath(str)) -> bool:
    """The drift report of this dataset version against the champion, and whether to train: on drift,
    on a new dataset version, or when forced (`trigger_reason`: drift, new data, forced, schedule).

    (The verdict is the return value: kfp.local skips a dsl.If on a NamedTuple output.)"""
    import shutil
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME
    from components.monitor import REPORT_NAME, monitor_champion, summary_line
    from pipelines.config import image_root, section

    result = monitor_champion(section("monitor", monitor), Path(champion.path), Path(dataset.path) / MANIFEST_NAME,
                              image_root(dataset.metadata), Path(drift.path), force=force_retrain)
    print(summary_line(result, Path(drift.path)))
    shutil.copyfile(Path(drift.path) / REPORT_NAME, report.path)
    drift.metadata.update({"retrain": result["retrain"], "trigger_reason": result["trigger_reason"],
                           "reasons": len(result["reasons"])})
    Path(trigger_reason).write_text(result["trigger_reason"])
    return result["retrain"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_shards(encode: dict, dataset: Input[Dataset]) -> List[int]:
    """The shard indices to encode (encode.shard_size images each): the ParallelFor items."""
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME, Manifest
    from components.encode import plan_shards as plan
    from pipelines.config import section

    return list(range(plan(section("encode", encode), Manifest.load(Path(dataset.path) / MANIFEST_NAME)).num_shards))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def encode_shard(encode: dict, onnx_model: Input[Model], dataset: Input[Dataset], shard: int,
                 shards: Output[Artifact]):
    """Encode one shard of the query and database images with onnxruntime: it reads only its own rows."""
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME
    from components.encode import encode_shards
    from pipelines.config import image_root, section

    encode_shards(section("encode", encode), Path(onnx_model.path) / "model.onnx", Path(dataset.path) / MANIFEST_NAME,
                  image_root(dataset.metadata), Path(shards.path), only=[int(shard)])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_shards(encode: dict, onnx_model: Input[Model], dataset: Input[Dataset], shards: Input[List[Artifact]],
                 encoded: Output[Dataset]):
    """All shards -> codes.npz + database.faiss (it refuses a missing or foreign shard)."""
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME
    from components.encode import merge_shards as merge, tag_providers
    from pipelines.config import section

    onnx_path = Path(onnx_model.path) / "model.onnx"
    summary = merge(section("encode", encode), onnx_path, Path(dataset.path) / MANIFEST_NAME,
                    [Path(s.path) for s in shards], Path(encoded.path))
    tag_providers(onnx_path, summary)
    encoded.metadata.update({k: summary[k] for k in ("images", "queries", "database", "bits", "shards", "providers")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_retrieval(evaluate: dict, encoded: Input[Dataset], dataset: Input[Dataset], codewords: Input[Artifact],
                       run: str, evaluation: Output[Artifact], metrics: Output[Metrics]) -> str:
    """Retrieval metrics (files, MLflow, and KFP's Metrics view) and the PR / examples plots."""
    from pathlib import Path

    from adalabelhash.data.manifest import MANIFEST_NAME
    from adalabelhash.tracking import RunRef
    from components.evaluate import evaluate_tracked
    from pipelines.config import image_root, section

    result, ref = evaluate_tracked(section("evaluate", evaluate), Path(encoded.path), Path(dataset.path) / MANIFEST_NAME,
                                   image_root(dataset.metadata), Path(evaluation.path), Path(codewords.path) / "codewords.npy",
                                   RunRef.from_json(run))
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "stable_seed":
            metrics.log_metric(key, value)
    return ref.to_json()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_model(promote: dict, evaluation: Input[Artifact], champion: Input[Artifact], drift: Input[Artifact],
                  trigger_reason: str, run: str, decision: Output[Artifact], report: Output[Markdown]):
    """Register the ONNX model and gate its aliases against the re-scored champion (never cached: it
    changes the registry); the run gets the drift report and why it was trained."""
    from pathlib import Path

    from adalabelhash import tracking
    from adalabelhash.fileio import read_json
    from components.monitor import DRIFT_NAME, REPORT_NAME
    from components.promote import promote_tracked
    from components.score_champion import SCORE_FILE
    from pipelines.config import section

    params, ref = section("promote", promote), tracking.RunRef.from_json(run)
    tracking.log_artifacts(ref, [Path(drift.path) / DRIFT_NAME, Path(drift.path) / REPORT_NAME], "monitor")
    tracking.set_tags(ref, {"trigger_reason": trigger_reason})
    result = promote_tracked(params, Path(evaluation.path) / "metrics.json", ref, Path(decision.path),
                             read_json(Path(champion.path) / SCORE_FILE))
    verdict = "champion" if result["champion"] else "challenger" if result["challenger"] else "no alias"
    version = f"v{result['version']}" if result["version"] else "(dry run, not registered)"
    lines = [f"# Promotion: {verdict}", "", f"{result['model_name']} {version}: {result['metric']} {result['value']:.4f}", ""]
    Path(report.path).write_text("\n".join(lines + [f"- {reason}" for reason in result["reasons"]]) + "\n")
    decision.metadata.update({"verdict": verdict, "version": result["version"] or "", "value": result["value"]})
