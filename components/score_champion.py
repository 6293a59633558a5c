"""Step `score-champion`: the current `@champion` re-scored on this run's evaluation split.

A champion's recorded mAP was measured on the data of its day, and scheduled retraining runs
because the data changed. So the gate compares challenger and champion on the same queries and
database: this step downloads the champion's ONNX encoder from the registry, encodes this run's
queries and database with it (the encode step's code and sharding: each model ranks with its own
codes, so another code length, image size or backbone is fine) and computes the evaluate step's
metrics with the evaluate step's code.

Two halves, because DVC caches on files only:
  resolve  which version to compare with -> champion.json (one registry call; DVC runs it always)
  score    that version on this manifest  -> score.json (DVC caches it on champion.json + manifest)
When the current champion is this run's own model (this run promoted it), the version to compare
with stays the one it was compared with then (version tag `gate.compared_with`), so a second
`dvc repro` resolves the same champion and re-scores nothing.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

from components.encode import EncodeParams
from components.evaluate import EvaluateParams
from components.promote import CHAMPION, PromoteParams

CHAMPION_FILE, SCORE_FILE, MODEL_DIR = "champion.json", "score.json", "champion_model"


def resolve(params: PromoteParams, tracking_uri: str, own_model_uri: str | None = None) -> tuple[dict, str]:
    """(the registry version this run's model is compared with: version None if none, a note saying why).

    The record holds only what identifies that version, so an unchanged answer is an unchanged file.
    """
    from adalabelhash import tracking

    client = tracking.client(tracking_uri)
    current = tracking.reachable(lambda: champion_version(client, params.model_name), "reading @champion", tracking_uri)
    note = "no current champion" if current is None else f"@champion is v{current.version}"
    if current is not None and own_model_uri and model_id(current) == model_id_of_uri(own_model_uri):
        compared = current.tags.get("gate.compared_with", "")
        note = f"@champion v{current.version} is this run's own model, compared with " + (
            f"v{compared}" if compared else "no champion before it")
        current = None if not compared else tracking.reachable(
            lambda: client.get_model_version(params.model_name, compared), f"reading v{compared}", tracking_uri)
    if current is None:
        return {"model_name": params.model_name, "version": None}, note
    recorded = current.tags.get(params.metric)
    return {"model_name": params.model_name, "version": str(current.version), "run_id": current.run_id,
            "model_uri": f"models:/{params.model_name}/{current.version}",
            "recorded": float(recorded) if recorded else None,
            "recorded_dataset": current.tags.get("dataset.fingerprint", "")}, note


def resolve_tracked(params: PromoteParams, mlflow_params, own_model_uri: str | None = None) -> tuple[dict, str, str]:
    """resolve() against the pipeline's tracking URI: (record, note, uri); no registry when MLflow is off."""
    from adalabelhash import tracking

    uri = tracking.resolve_tracking_uri(mlflow_params)
    if not mlflow_params.enabled:
        return {"model_name": params.model_name, "version": None}, "mlflow.enabled is false: no registry", uri
    return (*resolve(params, uri, own_model_uri), uri)


def score(encode_params: EncodeParams, evaluate_params: EvaluateParams, champion: dict, manifest_path: Path,
          data_root: str | Path, out_dir: Path, tracking_uri: str, metric: str = "mAP") -> dict:
    """Encode this run's queries and database with the champion's encoder and evaluate them.

    Writes score.json (and the champion's model files, which the monitor step reads) atomically:
    a champion that cannot be downloaded or scored is one error and leaves no output.
    """
    from adalabelhash.data.manifest import Manifest
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import atomic_directory, write_json
    from components.encode import encode
    from components.evaluate import evaluate

    fingerprint = Manifest.load(manifest_path).fingerprint()
    result = {"champion": champion, "version": champion.get("version"), "metric": metric,
              "dataset_fingerprint": fingerprint, "value": None}
    with atomic_directory(out_dir) as tmp:
        if champion.get("version") is None:
            write_json(tmp / SCORE_FILE, result)
        else:
            where = f"champion v{champion['version']} ({champion['model_uri']})"
            model_dir = download_model(champion["model_uri"], tmp / MODEL_DIR, tracking_uri, where)
            try:
                encode(encode_params, model_dir / "model.onnx", manifest_path, data_root, tmp / "shards", tmp / "encoded")
                metrics = evaluate(replace(evaluate_params, examples=0), tmp / "encoded", manifest_path, None,
                                   tmp / "evaluation")
            except UserError as exc:
                raise UserError(f"{where} cannot be scored on this data: {exc}") from None
            shutil.rmtree(tmp / "shards")
            shutil.rmtree(tmp / "encoded")
            result.update(value=metrics[metric], metrics=metrics)
            write_json(tmp / SCORE_FILE, result)
    return result


def download_model(model_uri: str, destination: Path, tracking_uri: str, where: str) -> Path:
    """The registered model's files (model.onnx, codewords) into `destination`."""
    import mlflow

    from adalabelhash import tracking
    from adalabelhash.errors import UserError

    destination.mkdir(parents=True)
    tracking.reachable(lambda: mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination),
                                                                   tracking_uri=tracking_uri),
                       f"downloading {where}", tracking_uri)
    if not (destination / "model.onnx").is_file():
        raise UserError(f"{where} has no model.onnx: it cannot be scored")
    return destination


def champion_version(client, name: str):
    """The ModelVersion holding @champion, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def model_id(version) -> str | None:
    """The logged model a registry version was made from (MLflow 3: `m-...`)."""
    return version.model_id or model_id_of_uri(version.source or "")


def model_id_of_uri(uri: str) -> str | None:
    return uri.split("/", 1)[1] if uri.startswith("models:/m-") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `promote:`, `encode:`, `evaluate:`, `mlflow:`")
    parser.add_argument("--resolve", action="store_true", help="only resolve the version to compare with -> OUT/champion.json")
    parser.add_argument("--run", type=Path, help="with --resolve: mlflow_run.json of convert-onnx (this run's own model)")
    parser.add_argument("--champion", type=Path, help="champion.json of --resolve (default: resolve now)")
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--data-root", help="directory or URL (s3://...) the manifest paths are relative to")
    parser.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> None:
    from adalabelhash import tracking
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import atomic_directory, read_json, write_json
    from adalabelhash.params import load_section

    promote_params = load_section(PromoteParams, "promote", args.params)
    mlflow_params = load_section(tracking.MlflowParams, "mlflow", args.params)
    if args.resolve or args.champion is None:
        own = tracking.RunRef.load(args.run).model_uri if args.run else None
        champion, note, uri = resolve_tracked(promote_params, mlflow_params, own)
    else:
        uri = tracking.resolve_tracking_uri(mlflow_params)
        champion = read_json(args.champion)
        note = "no champion" if champion.get("version") is None else f"champion v{champion['version']}"
    if args.resolve:
        with atomic_directory(args.out) as tmp:
            write_json(tmp / CHAMPION_FILE, champion)
        print(f"score-champion: {note} -> {args.out / CHAMPION_FILE}")
        return
    if args.manifest is None or args.data_root is None:
        raise UserError("--manifest and --data-root are required to score the champion")
    result = score(load_section(EncodeParams, "encode", args.params), load_section(EvaluateParams, "evaluate", args.params),
                   champion, args.manifest, args.data_root, args.out, uri, promote_params.metric)
    if result["version"] is None:
        print(f"score-champion: {note}: nothing to re-score -> {args.out / SCORE_FILE}")
    else:
        recorded = champion.get("recorded")
        print(f"score-champion: {promote_params.model_name} v{result['version']} re-scored on this data: "
              f"{result['metric']} {result['value']:.4f} (recorded on its own data: "
              f"{'unknown' if recorded is None else f'{recorded:.4f}'}) -> {args.out / SCORE_FILE}")
