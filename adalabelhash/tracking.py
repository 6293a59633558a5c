"""MLflow tracking: one MLflow run per pipeline run, shared by every step.

`train` starts the run (all of params.yaml as params, git commit and dataset version as
tags) and writes a run reference (`mlflow_run.json`) into its output; each later step
attaches to its upstream step's reference and writes its own for the steps after it (in
Kubeflow the reference travels as a string). MLflow params cannot change, so a step whose
params.yaml section no longer matches the run's params (e.g. `dvc exp run -S evaluate.radius=0`
reruns only `evaluate`) continues in a *derived* run: a copy of the params, tags and metrics,
tagged `adalabelhash.derived_from`, with this step's new params. Nothing here is
imported by the step functions themselves: the CLI and the Kubeflow wrappers do the logging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from adalabelhash.errors import UserError
from adalabelhash.params import flatten

RUN_FILE = "mlflow_run.json"

# Fail in seconds, not minutes, when the tracking server is down (MLflow's defaults retry
# with exponential backoff for several minutes). Users can still override both.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


@dataclass(frozen=True)
class MlflowParams:
    """params.yaml `mlflow:`."""

    enabled: bool = True
    experiment: str = "adalabelhash"
    # null: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in the working directory)
    tracking_uri: Optional[str] = None
    run_name: Optional[str] = None  # null: "<backbone>-<bits>bits"; name runs to tell them apart in the UI


@dataclass(frozen=True)
class RunRef:
    """Which MLflow run a step logs to; `run_id` None means tracking is off."""

    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    experiment_id: Optional[str] = None
    model_uri: Optional[str] = None  # the logged ONNX model, once convert-onnx has run

    def save(self, out_dir: Path) -> None:
        from adalabelhash.fileio import write_json

        write_json(Path(out_dir) / RUN_FILE, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "RunRef":
        from adalabelhash.fileio import read_json

        path = Path(path)
        if path.suffix != ".json":  # a step's output directory
            path = path / RUN_FILE
        if not path.is_file():
            raise UserError(f"{path}: no MLflow run reference; run the upstream step first")
        return cls(**read_json(path))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunRef":
        return cls(**json.loads(text)) if text else cls()


def resolve_tracking_uri(params: MlflowParams) -> str:
    import mlflow

    return params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def client(ref_or_uri: RunRef | str):
    from mlflow import MlflowClient

    uri = ref_or_uri if isinstance(ref_or_uri, str) else ref_or_uri.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def reachable(call: Callable, what: str, uri: str, write: bool = False):
    """Run an MLflow call; a dead server or a refused request becomes one clear line.

    `write`: the call changes the registry. When the server stops answering mid-call nobody knows
    whether it took effect, and the message says so instead of claiming it failed.
    """
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        return call()
    except (MlflowException, RequestException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if write and _no_answer(exc):
            raise UserError(f"MLflow at {uri}: {what}: no answer from the server, so it may or may not have taken "
                            f"effect ({first[:200]}); run promote again to re-apply the gate") from None
        raise UserError(f"MLflow at {uri}: {what} failed: {first[:300]}") from None


def _no_answer(exc: Exception) -> bool:
    """A lost connection (the request may have been applied), not an answer refusing it."""
    from requests.exceptions import ConnectionError, Timeout

    if isinstance(exc, (ConnectionError, Timeout)):
        return True
    text = str(exc)
    return any(marker in text for marker in ("Max retries exceeded", "Connection aborted", "RemoteDisconnected",
                                             "Connection refused", "Read timed out"))


def start_run(params: MlflowParams, all_params: dict, tags: dict[str, str], run_name: str) -> RunRef:
    """Create the pipeline's run in the experiment, with every param and the provenance tags."""
    if not params.enabled:
        return RunRef()
    uri = resolve_tracking_uri(params)
    mlflow_client = client(uri)

    def create():
        experiment = mlflow_client.get_experiment_by_name(params.experiment)
        if experiment is None:
            try:
                experiment_id = mlflow_client.create_experiment(params.experiment)
            except Exception:  # created concurrently by another run
                experiment_id = mlflow_client.get_experiment_by_name(params.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags)
        _log_params(mlflow_client, run.info.run_id, flatten(all_params))
        return RunRef(run.info.run_id, uri, experiment_id)

    return reachable(create, "starting a run", uri)


def continue_run(ref: RunRef, section: str, section_params: dict) -> RunRef:
    """The run to log this step into: `ref`, or a derived run if this step's params changed."""
    if ref.run_id is None:
        return ref
    mlflow_client = client(ref)
    run = reachable(lambda: mlflow_client.get_run(ref.run_id), f"reading run {ref.run_id}", ref.tracking_uri)
    wanted = {k: _param_value(v) for k, v in flatten({section: section_params}).items()}
    logged = run.data.params
    changed = {k: v for k, v in wanted.items() if k in logged and logged[k] != v}
    missing = {k: v for k, v in wanted.items() if k not in logged}
    if missing and not changed:
        reachable(lambda: _log_params(mlflow_client, ref.run_id, missing), "logging params", ref.tracking_uri)
    if not changed:
        return ref
    return reachable(lambda: _derive(mlflow_client, ref, run, wanted), "deriving a run", ref.tracking_uri)


def _derive(mlflow_client, ref: RunRef, run, new_params: dict) -> RunRef:
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k in _KEPT_SYSTEM_TAGS}
    tags["adalabelhash.derived_from"] = ref.run_id
    name = f"{run.info.run_name}-rerun"
    derived = mlflow_client.create_run(run.info.experiment_id, run_name=name, tags=tags)
    _log_params(mlflow_client, derived.info.run_id, {**run.data.params, **new_params})
    from mlflow.entities import Metric

    for key in run.data.metrics:
        history = mlflow_client.get_metric_history(ref.run_id, key)
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in history]
        for start in range(0, len(metrics), 1000):
            mlflow_client.log_batch(derived.info.run_id, metrics=metrics[start : start + 1000])
    print(f"mlflow: params changed since run {ref.run_id}; logging to derived run {derived.info.run_id}")
    return replace(ref, run_id=derived.info.run_id)


_KEPT_SYSTEM_TAGS = {"mlflow.source.git.commit", "mlflow.source.name", "mlflow.source.type", "mlflow.user"}


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def _log_params(mlflow_client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v) if not isinstance(v, str) else v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(ref: RunRef, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of `metrics` (MLflow names: no '@')."""
    if ref.run_id is None:
        return
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    reachable(lambda: client(ref).log_batch(ref.run_id, metrics=batch), "logging metrics", ref.tracking_uri)


def epoch_logger(ref: RunRef) -> Callable[[int, dict], None]:
    """A training callback: every epoch's metrics, with the epoch as MLflow step."""
    def log(epoch: int, metrics: dict) -> None:
        log_metrics(ref, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

    return log


def log_artifacts(ref: RunRef, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    if ref.run_id is None:
        return
    mlflow_client = client(ref)
    for path in paths:
        path = Path(path)
        if path.is_dir():
            reachable(lambda: mlflow_client.log_artifacts(ref.run_id, str(path), artifact_path), f"uploading {path}", ref.tracking_uri)
        elif path.is_file():
            reachable(lambda: mlflow_client.log_artifact(ref.run_id, str(path), artifact_path), f"uploading {path}", ref.tracking_uri)


def set_tags(ref: RunRef, tags: dict[str, Any]) -> None:
    if ref.run_id is None:
        return
    mlflow_client = client(ref)
    reachable(lambda: [mlflow_client.set_tag(ref.run_id, k, str(v)) for k, v in tags.items()], "setting tags", ref.tracking_uri)


def provenance_tags(dataset_fingerprint: str, source: str) -> dict[str, str]:
    """Git commit and dataset version, as tags the MLflow UI shows and the registry copies."""
    tags = {"dataset.fingerprint": dataset_fingerprint, "mlflow.source.name": source}
    commit = _git(["rev-parse", "HEAD"])
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git(["status", "--porcelain", "--untracked-files=no"])))
    data_md5 = data_dvc_md5()
    if data_md5:
        tags["dataset.data_dvc_md5"] = data_md5
    trigger = os.environ.get("ADALABELHASH_TRIGGER_REASON")  # set by `adalabelhash retrain`
    if trigger:
        tags["trigger_reason"] = trigger
    return tags


def data_dvc_md5(path: Path = Path("data.dvc")) -> str | None:
    """The md5 DVC recorded for data/ (the dataset version a team pushes and pulls)."""
    import yaml

    try:
        outs = yaml.safe_load(Path(path).read_text()).get("outs", [])
        return outs[0].get("md5") if outs else None
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_onnx_model(ref: RunRef, onnx_path: Path, extra_files: list[Path], image_size: int) -> RunRef:
    """Log model.onnx as an MLflow model (signature, explicit pip requirements) + codewords beside it."""
    if ref.run_id is None:
        return ref
    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import infer_signature

    example = np.zeros((1, 3, image_size, image_size), np.float32)
    from adalabelhash.onnx_runtime import open_session

    session = open_session(onnx_path, device="cpu")
    signature = infer_signature(example, session.run(None, {session.get_inputs()[0].name: example})[0])
    requirements = [f"onnx=={_version('onnx')}", f"onnxruntime=={_version('onnxruntime')}", f"numpy=={_version('numpy')}"]

    def log():
        mlflow.set_tracking_uri(ref.tracking_uri)
        with mlflow.start_run(run_id=ref.run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name="model", signature=signature, pip_requirements=requirements,
                onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False,
                extra_files=[str(p) for p in extra_files if Path(p).is_file()],
            )
        return info.model_uri

    return replace(ref, model_uri=reachable(log, "logging the ONNX model", ref.tracking_uri))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return version("onnxruntime-gpu") if package == "onnxruntime" else "unknown"


def attach(upstream: RunRef | Path, section: str, section_params: Any) -> RunRef:
    """The run a later step logs into: its upstream step's run, derived if the section changed."""
    ref = upstream if isinstance(upstream, RunRef) else RunRef.load(upstream)
    if dataclass_like(section_params):
        section_params = asdict(section_params)
    return continue_run(ref, section, section_params)


def dataclass_like(obj: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


class step_status:
    """Mark the run FINISHED after a step that succeeded, FAILED after one that raised, KILLED after
    Ctrl-C or SIGTERM (what `kill` and Kubernetes send), so no run stays RUNNING forever."""

    def __init__(self, ref: RunRef):
        self.ref = ref
        self.previous_sigterm = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self.ref

    def __exit__(self, exc_type, exc, tb):
        if self.previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self.previous_sigterm)
        if self.ref.run_id is not None:
            status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            try:
                if status == "FAILED":  # why, on the run itself (e.g. a GPU pod that found no usable GPU)
                    client(self.ref).set_tag(self.ref.run_id, "adalabelhash.error", f"{exc_type.__name__}: {exc}"[:5000])
                client(self.ref).set_terminated(self.ref.run_id, status)
            except Exception:  # never hide the step's own error behind a tracking error
                if exc_type is None:
                    raise
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)
