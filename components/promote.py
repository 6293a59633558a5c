"""Step `promote`: register the evaluated ONNX model and gate its aliases on mAP.

Gate (aliases only; registry stages are deprecated):
  challenger  mAP >= min_map
  champion    challenger, and mAP >= (current @champion's mAP) + min_gain on the same dataset
              version, or there is no champion yet; and mode is `enabled`
`dry_run` decides and reports but changes nothing in the registry. The champion alias is the
last thing that moves, after the current champion is read again and compared once more, so
an error anywhere before it (server gone, bad metrics file) leaves the previous champion in
place, and of two racing promotions the weaker one backs off.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class PromoteParams:
    """params.yaml `promote:`."""

    model_name: str = "adalabelhash"  # registered model name
    mode: Literal["enabled", "dry_run"] = "enabled"
    metric: str = "mAP"  # mAP over the full ranking (tie-aware) on the evaluation queries
    min_map: float = 0.5  # below this: registered, no alias
    min_gain: float = 0.0  # a new champion must beat the current one by at least this

    def __post_init__(self):
        if not 0 <= self.min_map <= 1 or self.min_gain < 0:
            raise ValueError("min_map must be in [0, 1] and min_gain >= 0")
        if not self.model_name.strip():
            raise ValueError("model_name must not be empty")


def decide(params: PromoteParams, value: float, dataset: str, champion: dict | None) -> dict:
    """The gate as a pure function: which aliases this version earns, and why."""
    reasons = []
    challenger = value >= params.min_map
    reasons.append(f"{params.metric} {value:.4f} {'>=' if challenger else '<'} min_map {params.min_map}")
    champion_ok = False
    if challenger:
        if champion is None:
            champion_ok = True
            reasons.append("no current champion")
        elif champion["dataset"] != dataset:
            reasons.append(f"champion v{champion['version']} was evaluated on dataset {champion['dataset'][:12]}, "
                           f"this one on {dataset[:12]}: not comparable, champion kept")
        else:
            needed = champion["value"] + params.min_gain
            champion_ok = value >= needed
            reasons.append(f"{params.metric} {value:.4f} {'>=' if champion_ok else '<'} champion v{champion['version']} "
                           f"{champion['value']:.4f} + min_gain {params.min_gain}")
    if params.mode == "dry_run":
        reasons.append("dry_run: registry left unchanged")
    return {
        "challenger": challenger,
        "champion": challenger and champion_ok,
        "applied": params.mode == "enabled",
        "reasons": reasons,
    }


def promote(params: PromoteParams, metrics_path: Path, ref, out_dir: Path) -> dict:
    """Register `ref.model_uri` as a new version, apply the gate, write decision.json."""
    from adalabelhash import tracking
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import read_json, write_json

    metrics = read_json(metrics_path)
    value = metrics.get(params.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise UserError(f"{metrics_path}: '{params.metric}' must be a number in [0, 1], got {value!r}")
    dataset = metrics.get("dataset_fingerprint")
    if not isinstance(dataset, str):
        raise UserError(f"{metrics_path}: no dataset_fingerprint: cannot compare with the champion")
    if ref.run_id is None or ref.model_uri is None:
        raise UserError("promote needs MLflow: the run has no logged ONNX model (is mlflow.enabled false?)")

    client = tracking.client(ref)
    uri = ref.tracking_uri
    champion = tracking.reachable(lambda: _champion(client, params), "reading the champion", uri)
    decision = decide(params, float(value), dataset, champion)
    run = tracking.reachable(lambda: client.get_run(ref.run_id), "reading the run", uri)
    tags = {
        params.metric: f"{value:.6f}",
        "bits": str(metrics.get("bits")),
        "dataset.fingerprint": dataset,
        "git.commit": run.data.tags.get("mlflow.source.git.commit", "unknown"),
        "run_id": ref.run_id,
        **{k: f"{v:.6f}" for k, v in metrics.items() if k.startswith("mAP_at_") and isinstance(v, float)},
    }
    result = {
        "model_name": params.model_name,
        "version": None,
        "metric": params.metric,
        "value": float(value),
        "dataset": dataset,
        "champion_before": champion,
        **decision,
        "params": asdict(params),
    }
    if decision["applied"]:
        version = tracking.reachable(lambda: _register(client, params.model_name, ref, tags), "registering the model", uri)
        result["version"] = version
        decision_tags = {"gate.challenger": decision["challenger"], "gate.champion": decision["champion"],
                         "gate.reasons": " | ".join(decision["reasons"])}
        tracking.reachable(lambda: [client.set_model_version_tag(params.model_name, version, k, str(v))
                                    for k, v in decision_tags.items()], "tagging the version", uri)
        if decision["challenger"]:
            tracking.reachable(lambda: client.set_registered_model_alias(params.model_name, CHALLENGER, version),
                               "setting @challenger", uri)
        if decision["champion"]:
            result["champion"] = tracking.reachable(
                lambda: _move_champion(client, params, version, float(value), dataset, result), "moving @champion", uri)
    write_json(Path(out_dir) / "decision.json", result)
    return result


def _champion(client, params: PromoteParams) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(params.model_name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return {
        "version": str(version.version),
        "value": float(version.tags.get(params.metric, "nan")),
        "dataset": version.tags.get("dataset.fingerprint", ""),
    }


def _register(client, name: str, ref, tags: dict) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="AdaLabelHash image encoder (ONNX): image -> K-bit code")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # MLflow 3 logged models live at models:/<model_id>; the server wants the id said explicitly
    model_id = ref.model_uri.split("/", 1)[1] if ref.model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, ref.model_uri, run_id=ref.run_id, tags=tags, model_id=model_id)
    return str(version.version)


def _move_champion(client, params: PromoteParams, version: str, value: float, dataset: str, result: dict) -> bool:
    """Compare with the champion as it is *now* (another promotion may have moved it), then move."""
    current = _champion(client, params)
    again = decide(params, value, dataset, current)
    if not again["champion"]:
        result["reasons"].append(f"champion changed to v{current['version']} meanwhile: " + again["reasons"][-1])
        client.set_model_version_tag(params.model_name, version, "gate.champion", "False")
        return False
    client.set_registered_model_alias(params.model_name, CHAMPION, version)
    return True


def promote_tracked(params: PromoteParams, metrics_path: Path, upstream, out_dir: Path) -> dict:
    from adalabelhash import tracking

    ref = upstream if isinstance(upstream, tracking.RunRef) else tracking.RunRef.load(upstream)
    result = promote(params, metrics_path, ref, out_dir)
    tracking.set_tags(ref, {"promote.decision": "champion" if result["champion"] else
                            "challenger" if result["challenger"] else "rejected",
                            "promote.version": result["version"], "promote.mode": params.mode})
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `promote:`")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics.json of the evaluate step")
    parser.add_argument("--run", required=True, type=Path, help="mlflow_run.json of the evaluate step (or its directory)")
    parser.add_argument("--out", required=True, type=Path, help="directory for decision.json")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.params import load_section

    params = load_section(PromoteParams, "promote", args.params)
    result = promote_tracked(params, args.metrics, args.run, args.out)
    verdict = "champion" if result["champion"] else "challenger" if result["challenger"] else "no alias"
    where = f"{params.model_name} v{result['version']}" if result["version"] else f"{params.model_name} (dry run)"
    print(f"promote: {where} -> {verdict}: " + "; ".join(result["reasons"]))
