"""Step `promote`: register the evaluated ONNX model and gate its aliases on mAP.

Gate (aliases only; registry stages are deprecated):
  challenger  mAP >= min_map
  champion    challenger, and mAP >= (the current @champion's mAP re-scored on this run's data by
              the score-champion step) + min_gain, or there is no champion yet; mode `enabled`
`dry_run` decides and reports but changes nothing in the registry.

One model, one version: promoting the same run's model again (e.g. `dvc exp run -S
promote.min_gain=0.01`) re-applies the gate to its existing version instead of registering a copy;
a version that no longer passes gives its aliases back. The champion alias moves last, after the
current champion is read again: if it is no longer the version that was re-scored (another
promotion moved it), this run's scores are not comparable and the champion stays. The aliases
are the registry's state; the version's gate tags (verdict, reasons, the champion it was compared
with and both numbers) are written after the aliases moved and record what happened, so a
promotion cut off half-way (server gone) leaves no claim behind, and running it again completes it.
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
    """The gate as a pure function: which aliases this version earns, and why.

    `champion`: None (there is none), or the score-champion step's numbers: `version`, `value` (its
    metric re-scored on dataset `dataset`), `recorded` (its metric on its own data, for the record).
    """
    reasons = []
    challenger = value >= params.min_map
    reasons.append(f"{params.metric} {value:.4f} {'>=' if challenger else '<'} min_map {params.min_map}")
    champion_ok = False
    if challenger:
        if champion is None:
            champion_ok = True
            reasons.append("no current champion")
        elif champion["dataset"] != dataset:
            reasons.append(f"champion v{champion['version']} was re-scored on dataset {champion['dataset'][:12]}, "
                           f"this model evaluated on {dataset[:12]}: not comparable, champion kept")
        else:
            needed = champion["value"] + params.min_gain
            champion_ok = value >= needed
            recorded = champion.get("recorded")
            own = "" if recorded is None else f", {recorded:.4f} on its own data"
            reasons.append(f"{params.metric} {value:.4f} {'>=' if champion_ok else '<'} champion v{champion['version']} "
                           f"{champion['value']:.4f} re-scored on this data{own}, + min_gain {params.min_gain}")
    if params.mode == "dry_run":
        reasons.append("dry_run: registry left unchanged")
    return {
        "challenger": challenger,
        "champion": challenger and champion_ok,
        "applied": params.mode == "enabled",
        "reasons": reasons,
    }


def scored_champion(score: dict) -> dict | None:
    """score.json of the score-champion step -> decide()'s `champion` (None: there was none)."""
    from adalabelhash.errors import UserError

    if score.get("version") is None:
        return None
    if not isinstance(score.get("value"), (int, float)) or not isinstance(score.get("dataset_fingerprint"), str):
        raise UserError(f"champion score of v{score['version']} has no value or dataset: run score-champion again")
    return {"version": str(score["version"]), "value": float(score["value"]),
            "recorded": (score.get("champion") or {}).get("recorded"), "dataset": score["dataset_fingerprint"]}


def promote(params: PromoteParams, metrics_path: Path, ref, out_dir: Path, score: dict) -> dict:
    """Register `ref.model_uri` (or find its version), apply the gate, write decision.json.

    `score`: the score-champion step's score.json (the champion re-scored on this run's data).
    """
    from adalabelhash import tracking
    from adalabelhash.errors import UserError
    from adalabelhash.fileio import read_json, write_json
    from components.score_champion import champion_version

    metrics = read_json(metrics_path)
    value = metrics.get(params.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise UserError(f"{metrics_path}: '{params.metric}' must be a number in [0, 1], got {value!r}")
    dataset = metrics.get("dataset_fingerprint")
    if not isinstance(dataset, str):
        raise UserError(f"{metrics_path}: no dataset_fingerprint: cannot compare with the champion")
    if ref.run_id is None or ref.model_uri is None:
        raise UserError("promote needs MLflow: the run has no logged ONNX model (is mlflow.enabled false?)")

    champion = scored_champion(score)
    decision = decide(params, float(value), dataset, champion)
    client, uri, name = tracking.client(ref), ref.tracking_uri, params.model_name
    reachable = tracking.reachable
    existing = reachable(lambda: _version_of_model(client, name, ref.model_uri), "looking up this model's version", uri)
    current = reachable(lambda: champion_version(client, name), "reading the champion", uri)
    result = {
        "model_name": name,
        "version": existing,
        "metric": params.metric,
        "value": float(value),
        "dataset": dataset,
        "champion_before": None if current is None else str(current.version),
        "compared_with": champion,
        **decision,
        "params": asdict(params),
    }
    if champion is None and existing is not None and result["champion_before"] == existing:
        result["reasons"] = [r.replace("no current champion", f"v{existing} holds @champion, with no champion "
                                       "before it") for r in result["reasons"]]
    if decision["champion"] and not _still_comparable(current, champion, existing):
        _not_comparable(result, current)
    if decision["applied"]:
        run = reachable(lambda: client.get_run(ref.run_id), "reading the run", uri)
        tags = {
            params.metric: f"{value:.6f}",
            "bits": str(metrics.get("bits")),
            "dataset.fingerprint": dataset,
            "git.commit": run.data.tags.get("mlflow.source.git.commit", "unknown"),
            "run_id": ref.run_id,
            **{k: f"{v:.6f}" for k, v in metrics.items() if k.startswith("mAP_at_") and isinstance(v, float)},
        }
        if existing is None:
            result["version"] = reachable(lambda: _register(client, name, ref, tags), "registering the model", uri, write=True)
        else:
            result["reasons"].append(f"this model is already v{existing}: gate re-applied to it, nothing registered")
        version = result["version"]
        reachable(lambda: _apply_aliases(client, params, version, champion, result), "moving the aliases", uri, write=True)
        reachable(lambda: _write_gate_tags(client, name, version, champion, result), "tagging the version", uri, write=True)
    write_json(Path(out_dir) / "decision.json", result)
    return result


def _still_comparable(current, champion: dict | None, own_version: str | None) -> bool:
    """Is @champion still the version that was re-scored (or already this model's own version)?"""
    now = None if current is None else str(current.version)
    if own_version is not None and now == own_version:
        return True
    return now == (None if champion is None else champion["version"])


def _not_comparable(result: dict, current) -> None:
    scored = result["compared_with"]
    now = "no champion" if current is None else f"v{current.version}"
    result["champion"] = False
    result["reasons"].append(f"@champion is {now} now, not the {'no champion' if scored is None else 'v' + scored['version']} "
                             "this model was compared with: not comparable, champion kept (run again to re-score)")


def _apply_aliases(client, params: PromoteParams, version: str, champion: dict | None, result: dict) -> None:
    """Aliases as the decision says, champion last; a version that no longer passes gives them back."""
    from components.score_champion import champion_version

    name = params.model_name
    holds = set(client.get_model_version(name, version).aliases)
    if result["challenger"]:
        client.set_registered_model_alias(name, CHALLENGER, version)
    elif CHALLENGER in holds:
        client.delete_registered_model_alias(name, CHALLENGER)
    current = champion_version(client, name)  # read again: another promotion may have moved it
    if result["champion"]:
        if not _still_comparable(current, champion, version):
            _not_comparable(result, current)
        elif current is None or str(current.version) != version:
            client.set_registered_model_alias(name, CHAMPION, version)
    elif current is not None and str(current.version) == version:
        # promoted before, refused now (e.g. a higher min_gain): the champion it was compared with returns
        if champion is not None:
            client.set_registered_model_alias(name, CHAMPION, champion["version"])
            result["reasons"].append(f"@champion moved back from v{version} to v{champion['version']}")
        else:
            client.delete_registered_model_alias(name, CHAMPION)
            result["reasons"].append(f"@champion removed from v{version}")


def _write_gate_tags(client, name: str, version: str, champion: dict | None, result: dict) -> None:
    """After the aliases moved: what the gate did, read back from the registry, never what it meant to do.

    `gate.verdict` is champion only when the version held @champion once the aliases were set (the
    aliases are the state; a later promotion moving them does not make this record untrue). A
    promotion cut off before this point leaves no verdict, and running it again completes it.
    """
    holds = set(client.get_model_version(name, version).aliases)
    result["champion"] = CHAMPION in holds
    verdict = "champion" if CHAMPION in holds else "challenger" if result["challenger"] else "rejected"
    tags = {"gate.verdict": verdict, "gate.reasons": " | ".join(result["reasons"]),
            "gate.compared_with": "" if champion is None else champion["version"]}
    if champion is not None:
        tags["gate.champion_rescored"] = f"{champion['value']:.6f}"
        tags["gate.champion_recorded"] = "" if champion.get("recorded") is None else f"{champion['recorded']:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _version_of_model(client, name: str, model_uri: str) -> str | None:
    """The registry version already made from this logged model, if any (one model, one version)."""
    from mlflow.exceptions import MlflowException

    from components.score_champion import model_id, model_id_of_uri

    wanted = model_id_of_uri(model_uri)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    matches = [v for v in versions if (wanted and model_id(v) == wanted) or v.source == model_uri]
    return str(min(int(v.version) for v in matches)) if matches else None


def _register(client, name: str, ref, tags: dict) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="AdaLabelHash image encoder (ONNX): image -> K-bit code")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # MLflow 3 logged models live at models:/<model_id>; the server wants the id said explicitly
    from components.score_champion import model_id_of_uri

    version = client.create_model_version(name, ref.model_uri, run_id=ref.run_id, tags=tags,
                                          model_id=model_id_of_uri(ref.model_uri))
    return str(version.version)


def promote_tracked(params: PromoteParams, metrics_path: Path, upstream, out_dir: Path, score: dict) -> dict:
    """promote(), then the run says what happened: decision, version, and both numbers on the same data."""
    from adalabelhash import tracking

    ref = upstream if isinstance(upstream, tracking.RunRef) else tracking.RunRef.load(upstream)
    result = promote(params, metrics_path, ref, out_dir, score)
    champion = result["compared_with"]
    verdict = "champion" if result["champion"] else "challenger" if result["challenger"] else "rejected"
    prefix = "promote." if result["applied"] else "promote.dry_run."
    tags = {f"{prefix}decision": verdict, f"{prefix}version": result["version"], "promote.mode": params.mode,
            f"{prefix}compared_with": "none" if champion is None else f"v{champion['version']}",
            f"{prefix}reasons": " | ".join(result["reasons"])}
    tracking.set_tags(ref, tags)
    if champion is not None:
        numbers = {f"champion_{params.metric}_rescored": champion["value"]}
        if champion.get("recorded") is not None:
            numbers[f"champion_{params.metric}_recorded"] = champion["recorded"]
        tracking.log_metrics(ref, numbers)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `promote:`")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics.json of the evaluate step")
    parser.add_argument("--run", required=True, type=Path, help="mlflow_run.json of the evaluate step (or its directory)")
    parser.add_argument("--champion-score", required=True, type=Path, help="score.json of the score-champion step")
    parser.add_argument("--out", required=True, type=Path, help="directory for decision.json")


def run(args: argparse.Namespace) -> None:
    from adalabelhash.fileio import read_json
    from adalabelhash.params import load_section

    params = load_section(PromoteParams, "promote", args.params)
    result = promote_tracked(params, args.metrics, args.run, args.out, read_json(args.champion_score))
    print(summary_line(result))


def summary_line(result: dict) -> str:
    verdict = "champion" if result["champion"] else "challenger" if result["challenger"] else "no alias"
    name = result["model_name"]
    where = f"{name} v{result['version']}" if result["version"] else f"{name} (dry run)"
    return f"promote: {where} -> {verdict}: " + "; ".join(result["reasons"])
