"""`adalabelhash retrain [--if-drift]`: the local retraining loop, the thing to put in cron.

It brings the manifest up to date (`dvc repro validate`: prepare and the data gate), re-scores the
current @champion on that data and runs the drift report against it (the same step functions as
the DVC stages and the Kubeflow pipeline), then runs the whole `dvc repro` when the report says
so (drift, or a new dataset version with monitor.retrain_on_new_data), or always without
`--if-drift`. The trained run carries the reason as its MLflow tag `trigger_reason`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

TRIGGER_ENV = "ADALABELHASH_TRIGGER_REASON"  # read by the train step's provenance tags


def retrain(params_path: Path, out_dir: Path, if_drift: bool, force: bool) -> dict:
    """The monitor verdict (out_dir/monitor) and, when it says so, a `dvc repro`."""
    from adalabelhash import tracking
    from adalabelhash.params import load_params, load_section, parse_section
    from components.encode import EncodeParams
    from components.evaluate import EvaluateParams
    from components.monitor import MonitorParams, monitor_champion, summary_line
    from components.promote import PromoteParams
    from components.score_champion import resolve_tracked, score

    params = load_params(params_path)  # every section checked before anything runs
    monitor_params = load_section(MonitorParams, "monitor", params_path)
    promote_params = load_section(PromoteParams, "promote", params_path)
    mlflow_params = load_section(tracking.MlflowParams, "mlflow", params_path)
    root = str((params.get("prepare") or {}).get("root", "data/digits"))  # a directory or a URL, never a Path
    _dvc(["repro", "validate"])
    manifest = Path("build/prepare/manifest.parquet")
    champion, note, uri = resolve_tracked(promote_params, mlflow_params)
    print(f"retrain: {note}")
    score(parse_section(EncodeParams, params.get("encode"), "encode"),
          parse_section(EvaluateParams, params.get("evaluate"), "evaluate"), champion, manifest, root,
          out_dir / "score_champion", uri, promote_params.metric)
    drift = monitor_champion(monitor_params, out_dir / "score_champion", manifest, root, out_dir / "monitor", force)
    print(summary_line(drift, out_dir / "monitor"))
    for reason in drift["reasons"]:
        print(f"  {reason['section']}: {reason['message']}")
    if if_drift and not drift["retrain"]:
        print("retrain: nothing new: training skipped")
        return {**drift, "trained": False}
    reason = drift["trigger_reason"] if if_drift or force else "manual"
    _dvc(["repro"], {TRIGGER_ENV: reason})
    return {**drift, "trained": True, "trigger_reason": reason}


def _dvc(args: list[str], env: dict | None = None) -> None:
    from adalabelhash.errors import UserError

    try:
        done = subprocess.run(["dvc", *args], env={**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})})
    except FileNotFoundError:
        raise UserError("dvc is not on PATH (make venv installs it into .venv/bin)") from None
    if done.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed (exit {done.returncode}); its output is above")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--if-drift", action="store_true", help="train only when the drift report says so")
    parser.add_argument("--force", action="store_true", help="train whatever the report says (trigger_reason: forced)")
    parser.add_argument("--out", type=Path, default=Path("build/retrain"), help="the champion's score and the report")


def run(args: argparse.Namespace) -> None:
    retrain(args.params, args.out, args.if_drift, args.force)
