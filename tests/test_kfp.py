"""The Kubeflow pipeline: committed YAML, agreement with params.yaml/dvc.yaml, a whole local run,
and the REST calls `adalabelhash kfp submit|schedule` make through the real kfp.Client."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from adalabelhash.cli import main
from adalabelhash.params import load_params
from pipelines import config
from pipelines.pipeline import PACKAGE, PARAMS, REPO, build_pipeline, compile_pipeline

TRACKING = "http://mlflow.example:5000"  # submit refuses a null tracking URI; nothing contacts it


def load_docs(path: Path) -> list[dict]:
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    docs[0].pop("sdkVersion", None)
    return docs


def test_committed_yaml_is_up_to_date(tmp_path):
    assert main(["kfp", "compile", "--out", str(tmp_path / "pipeline.yaml")]) == 0
    compiled, committed = (yaml.safe_dump_all(load_docs(p)) for p in (tmp_path / "pipeline.yaml", PACKAGE))
    diff = "".join(difflib.unified_diff(committed.splitlines(True), compiled.splitlines(True), "committed", "compiled"))
    assert not diff, f"stale pipelines/adalabelhash_pipeline.yaml: run `make pipeline`\n{diff[:5000]}"


# --- params.yaml, dvc.yaml and the pipeline parameters ---------------------------------------

# Stages that read other steps' sections (promote, encode, evaluate) rather than one of their own.
STAGES_OF_OTHER_SECTIONS = {"champion", "score_champion"}


def disagreements(params: dict, dvc: dict, spec: dict) -> list[str]:
    """Every way params.yaml, dvc.yaml and the compiled pipeline's parameters disagree."""
    problems = []
    struct = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()
              if p["parameterType"] == "STRUCT"}
    steps = set(params) - {"kfp"}
    if steps != set(struct):
        problems.append(f"step sections {sorted(steps)} != pipeline dict parameters {sorted(struct)}")
    for name in sorted(steps & set(struct)):
        values = params[name] or {}
        if struct[name] != {k: v for k, v in values.items() if v is not None}:
            problems.append(f"pipeline default of {name} {struct[name]} != params.yaml {values}")
        if name in config.SECTIONS:
            field_defaults = {f.name: f.default for f in dataclasses.fields(config.section_class(name))}
            problems += [f"{name}.{key} is null in params.yaml but defaults to {field_defaults.get(key)!r}"
                         for key, value in values.items() if value is None and field_defaults.get(key) is not None]
    for stage, body in dvc["stages"].items():
        if stage not in struct and stage not in STAGES_OF_OTHER_SECTIONS:
            problems.append(f"dvc stage {stage} has no pipeline parameter of its name")
        for entry in body.get("params", []):
            for key in entry if isinstance(entry, dict) else [entry]:
                if key.split(".")[0] not in params:
                    problems.append(f"dvc stage {stage} reads params section {key.split('.')[0]}, not in params.yaml")
    return problems


@pytest.fixture(scope="module")
def sources():
    return load_params(PARAMS), yaml.safe_load((REPO / "dvc.yaml").read_text()), load_docs(PACKAGE)[0]


def test_params_dvc_and_pipeline_agree(sources):
    assert disagreements(*sources) == []


def test_disagreements_are_found(sources):
    params, dvc, spec = sources
    changed = copy.deepcopy(params)
    changed["train"]["epochs"] += 1
    assert any("pipeline default of train" in p for p in disagreements(changed, dvc, spec))
    missing = {k: v for k, v in params.items() if k != "promote"}
    assert any("step sections" in p for p in disagreements(missing, dvc, spec))
    extra_stage = copy.deepcopy(dvc)
    extra_stage["stages"]["search"] = {"cmd": "true", "params": ["search"]}
    found = disagreements(params, extra_stage, spec)
    assert any("dvc stage search has no pipeline parameter" in p for p in found)
    assert any("reads params section search" in p for p in found)


def test_dict_parameters_survive_protobuf_numbers():
    train = config.section("train", {"epochs": 10.0, "lr": 1.0, "head_lr": 0.5})
    assert (train.epochs, type(train.epochs), train.lr, type(train.lr)) == (10, int, 1.0, float)
    assert config.section("evaluate", {"topk": [100.0]}).topk == [100]
    assert config.to_parameter("train", {"epochs": 3, "head_lr": None}) == {"epochs": 3}


def test_deployment_settings_reach_the_compiled_spec(tmp_path):
    params = load_params(PARAMS)
    params["train"] = {**params["train"], "processes": 2}
    params["kfp"] = {**params["kfp"], "train_gpus": 2, "gpu_node_selector": {"gpu": "a100"},
                     "encode_parallelism": 3, "retries": 1, "data_pvc": "raw-data", "checkpoints_pvc": "ckpt",
                     "mlflow_secret": "mlflow-creds", "mlflow_secret_keys": ["MLFLOW_TRACKING_TOKEN"]}
    spec, platform = load_docs(compile_pipeline(tmp_path / "p.yaml", build_pipeline(params)))
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-model"]["container"]
    assert train["image"] == config.GPU_IMAGE
    assert train["resources"]["accelerator"]["resourceCount"] == "2"
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert executors["exec-encode-shard"]["container"]["image"] == config.IMAGE
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-model"]["nodeSelector"] == {"labels": {"gpu": "a100"}}
    assert k8s["exec-train-model"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                      "effect": "NoSchedule"}]
    # the data PVC is mounted wherever images are read, and nowhere else (they never travel as artifacts)
    mounts = {name: {m["constant"]: m["mountPath"] for m in executor.get("pvcMount", [])} for name, executor in k8s.items()}
    assert {name for name, m in mounts.items() if m.get("raw-data") == "/mnt/data"} == {
        "exec-prepare-dataset", "exec-validate-dataset", "exec-score-champion", "exec-monitor-data", "exec-train-model",
        "exec-convert-onnx", "exec-encode-shard", "exec-evaluate-retrieval"}
    assert mounts["exec-train-model"]["ckpt"] == "/mnt/checkpoints"
    for executor in ("exec-train-model", "exec-evaluate-retrieval", "exec-promote-model"):
        assert k8s[executor]["secretAsEnv"][0]["secretName"] == "mlflow-creds"
        assert k8s[executor]["secretAsEnv"][0]["keyToEnv"] == [{"secretKey": "MLFLOW_TRACKING_TOKEN",
                                                                "envVar": "MLFLOW_TRACKING_TOKEN"}]
        assert k8s[executor]["secretAsEnv"][0]["optional"] is True  # a key the secret lacks stays unset
    branch = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert branch["for-loop-3"]["iteratorPolicy"] == {"parallelismLimit": 3}
    assert branch["train-model"]["retryPolicy"]["maxRetryCount"] == 1
    assert branch["promote-model"]["cachingOptions"] == {} and "retryPolicy" not in branch["promote-model"]


def test_committed_pipeline_never_caches_promote():
    spec = load_docs(PACKAGE)[0]
    tasks = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert tasks["promote-model"]["cachingOptions"] == {}  # enableCache false is protobuf's default: omitted
    assert tasks["train-model"]["cachingOptions"] == {"enableCache": True}
    assert spec["root"]["dag"]["tasks"]["prepare-dataset"]["inputs"]["parameters"]["data_version"] == {
        "componentInputParameter": "data_version"}


@pytest.mark.parametrize("settings, message", [
    ({"retries": -1}, "must be >= 0"),
    ({"retry_backoff": "1m"}, "retry_backoff"),
    ({"gpu_tolerations": [{"key": "x", "operatr": "Exists"}]}, "gpu_tolerations"),
    ({"gpus": 1}, "unknown key(s) gpus"),
])
def test_bad_deployment_settings(settings, message):
    from adalabelhash.errors import UserError

    params = load_params(PARAMS)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_pipeline({**params, "kfp": {**params["kfp"], **settings}})


# --- the whole pipeline through kfp.local ----------------------------------------------------

def run_local(tmp_path: Path, *overrides: str, root: str = "kfp", data_root: Path | None = None,
              force: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    args = [sys.executable, "-m", "adalabelhash.cli", "kfp", "run-local", "--pipeline-root", str(tmp_path / root)]
    for override in overrides:
        args += ["-S", override]
    if data_root is not None:
        args += ["--data-root", str(data_root)]
    if force:
        args.append("--force-retrain")
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def executor_output(task_dir: Path) -> dict:
    return json.loads((task_dir / "executor_output.json").read_text())


@pytest.fixture(scope="module")
def scheduled_runs(tmp_path_factory, digits_root):
    """Three runs of the pipeline on one registry, as a schedule would start them: the first data
    version (no champion: trains), the same data again (nothing new: stops after the drift report),
    and a shifted version (images inverted: drift, trains, compared with the re-scored champion)."""
    from PIL import Image, ImageOps

    tmp_path = tmp_path_factory.mktemp("scheduled")
    inverted = tmp_path / "digits-inverted"
    for image in sorted(digits_root.rglob("*.png")):
        target = inverted / image.relative_to(digits_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(image).convert("L")).save(target)
    settings = ("prepare.source=imagefolder", "train.epochs=2", "encode.shard_size=600", "promote.min_map=0.3")
    runs = {}
    for name, data in (("first", digits_root), ("unchanged", digits_root), ("inverted", inverted)):
        result = run_local(tmp_path, *settings, root=name, data_root=data)
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-3000:]
        (runs[name],) = (tmp_path / name).glob("adalabelhash-*")
    return tmp_path, runs


@pytest.mark.slow
def test_local_run_end_to_end(scheduled_runs, digits_root):
    tmp_path, runs = scheduled_runs
    run = runs["first"]
    dataset = run / "prepare-dataset" / "dataset"
    assert [p.name for p in dataset.rglob("*") if p.is_file()] == ["manifest.parquet"]  # the images stay where they are
    metadata = executor_output(run / "prepare-dataset")["artifacts"]["dataset"]["artifacts"][0]["metadata"]
    assert metadata["images"] == 1797 and metadata["data_root"] == str(digits_root)
    copies = [p for p in run.rglob("*.png") if re.fullmatch(r"\d{4}\.png", p.name)]  # no step copied an image
    assert copies == [], copies[:5]
    assert executor_output(run / "validate-dataset")["parameterValues"]["Output"] is True
    assert "<html" in (run / "validate-dataset" / "data_docs").read_text().lower()
    assert json.loads((run / "score-champion" / "champion" / "score.json").read_text())["version"] is None
    assert executor_output(run / "monitor-data")["parameterValues"] == {"Output": True}
    assert (run / "monitor-data" / "trigger_reason").read_text() == "new data"

    shards = sorted(run.glob("for-loop-*-iteration-*/encode-shard/shards/shard-*.npz"))
    assert [p.name for p in shards] == [f"shard-{i:05d}-of-00003.npz" for i in range(3)]
    merged = json.loads((run / "merge-shards" / "encoded" / "encode_summary.json").read_text())
    assert (merged["shards"], merged["images"], merged["queries"] + merged["database"]) == (3, 1797, 1797)

    logged = executor_output(run / "evaluate-retrieval")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    metrics = json.loads((run / "evaluate-retrieval" / "evaluation" / "metrics.json").read_text())
    assert logged["mAP"] == metrics["mAP"] and logged["queries"] == 200
    assert 0.3 < metrics["mAP"] <= 1 and 0 <= metrics["mAP_stable"] <= 1  # chance is ~0.1 (10 classes)

    decision = json.loads((run / "promote-model" / "decision" / "decision.json").read_text())
    assert decision["applied"] and decision["version"] == "1" and decision["challenger"] and decision["champion"]
    assert (run / "promote-model" / "report").read_text().startswith("# Promotion: champion")

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version(decision["model_name"], "1")
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.tags["mlflow.source.name"] == "kfp" and mlflow_run.data.tags["trigger_reason"] == "new data"
    assert mlflow_run.data.params["train.epochs"] == "2" and mlflow_run.data.metrics["mAP"] == metrics["mAP"]
    logged_files = {f.path for f in client.list_artifacts(version.run_id, "monitor")}
    assert logged_files == {"monitor/drift.json", "monitor/report.html"}
    # what `serve` loads: the database the version's run holds, merged from the three shard tasks
    from adalabelhash.database import load_database

    served = load_database(client.download_artifacts(version.run_id, "database", str(tmp_path / "served")))
    assert (len(served), served.bits) == (merged["database"], 32) and served.labels[0] in served.classes


@pytest.mark.slow
def test_scheduled_run_on_unchanged_data_skips_training(scheduled_runs):
    _, runs = scheduled_runs
    run = runs["unchanged"]
    score = json.loads((run / "score-champion" / "champion" / "score.json").read_text())
    assert score["version"] == "1" and 0.3 < score["value"] <= 1  # the champion, re-scored
    assert executor_output(run / "monitor-data")["parameterValues"] == {"Output": False}
    assert (run / "monitor-data" / "trigger_reason").read_text() == "schedule"
    drift = json.loads((run / "monitor-data" / "drift" / "drift.json").read_text())
    assert drift["reasons"] == [] and not drift["new_data"]
    assert "<html" in (run / "monitor-data" / "report").read_text().lower()
    assert not (run / "train-model").exists() and not (run / "promote-model").exists()


@pytest.mark.slow
def test_scheduled_run_on_drifted_data_trains_and_compares_fairly(scheduled_runs):
    tmp_path, runs = scheduled_runs
    run = runs["inverted"]
    assert executor_output(run / "monitor-data")["parameterValues"] == {"Output": True}
    assert (run / "monitor-data" / "trigger_reason").read_text() == "drift"
    drift = json.loads((run / "monitor-data" / "drift" / "drift.json").read_text())
    assert {r["section"] for r in drift["reasons"]} >= {"data", "codes"}
    score = json.loads((run / "score-champion" / "champion" / "score.json").read_text())
    decision = json.loads((run / "promote-model" / "decision" / "decision.json").read_text())
    assert decision["compared_with"]["version"] == "1" and decision["compared_with"]["value"] == score["value"]
    assert decision["dataset"] == score["dataset_fingerprint"]  # both numbers on the same data

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    tags = client.get_run(client.get_model_version(decision["model_name"], decision["version"]).run_id).data.tags
    assert tags["trigger_reason"] == "drift" and tags["promote.compared_with"] == "v1"


@pytest.mark.slow
def test_local_run_stops_at_a_failed_data_gate(tmp_path):
    result = run_local(tmp_path, "validate.min_side=16")  # digits are 8x8
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: local run failed")
    assert "data gate failed" in result.stdout
    (run,) = (tmp_path / "kfp").glob("adalabelhash-*")
    assert executor_output(run / "validate-dataset")["parameterValues"]["Output"] is False
    assert (run / "validate-dataset" / "data_docs").is_file()  # the report of the failure is published
    assert not (run / "train-model").exists()


# --- submit and schedule against a recording KFP API -----------------------------------------

class FakeKfp:
    """A KFP v2beta1 REST API that records what it is asked and answers minimal valid JSON."""

    def __init__(self):
        self.calls: list[dict] = []
        self.token: str | None = None  # set: requests without this bearer token get HTTP 401
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.calls.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                   "auth": self.headers.get("Authorization"), "body": body})
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self.send(401, {"error": "Unauthorized", "code": 16})
                routes = {
                    ("GET", "/apis/v2beta1/healthz"): lambda: {"multi_user": False},
                    ("GET", "/apis/v2beta1/experiments"): lambda: {},
                    ("POST", "/apis/v2beta1/experiments"): lambda: {"experiment_id": "exp-1", **body},
                    ("POST", "/apis/v2beta1/runs"): lambda: {"run_id": "run-1", "display_name": body["display_name"]},
                    ("POST", "/apis/v2beta1/recurringruns"): lambda: {"recurring_run_id": "rr-1",
                                                                      "display_name": body["display_name"]},
                }
                route = routes.get((self.command, url.path))
                self.send(200, route()) if route else self.send(404, {"error": "not found"})

            def send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def posted(self, path: str) -> list[dict]:
        return [c["body"] for c in self.calls if c["method"] == "POST" and c["path"] == path]


@pytest.fixture
def kfp_api(monkeypatch):
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    fake = FakeKfp()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def sent_spec(body: dict) -> dict:
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)  # the client nests it when there is a platform spec


def expected_arguments(**changes) -> dict:
    params = load_params(PARAMS)
    arguments = {name: {k: v for k, v in (params[name] or {}).items() if v is not None} for name in config.SECTIONS}
    for name, values in changes.items():
        arguments[name].update(values)
    data_dvc = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["md5"]
    return {**arguments, "data_root": "", "data_version": data_dvc, "force_retrain": False}


def test_submit_sends_the_pipeline_and_parameters(kfp_api, capsys):
    code = main(["kfp", "submit", "--host", kfp_api.url, "--experiment", "nightly", "--run-name", "r1",
                 "-S", f"mlflow.tracking_uri={TRACKING}", "-S", "train.epochs=3", "-S", "evaluate.topk=[10, 50]"])
    assert code == 0, capsys.readouterr().err
    assert "submitted run run-1 (r1) to experiment nightly" in capsys.readouterr().out
    (experiment,) = kfp_api.posted("/apis/v2beta1/experiments")
    assert experiment["display_name"] == "nightly"
    (run,) = kfp_api.posted("/apis/v2beta1/runs")
    assert run["display_name"] == "r1" and run["experiment_id"] == "exp-1"
    assert sent_spec(run) == load_docs(PACKAGE)[0] | {"sdkVersion": sent_spec(run)["sdkVersion"]}
    assert run["runtime_config"]["parameters"] == expected_arguments(
        train={"epochs": 3}, evaluate={"topk": [10, 50]}, mlflow={"tracking_uri": TRACKING})


def test_schedule_creates_a_recurring_run(kfp_api, capsys):
    code = main(["kfp", "schedule", "--host", kfp_api.url, "--cron", "0 0 2 * * *", "--name", "nightly-retrain",
                 "-S", f"mlflow.tracking_uri={TRACKING}"])
    assert code == 0, capsys.readouterr().err
    (recurring,) = kfp_api.posted("/apis/v2beta1/recurringruns")
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert (recurring["max_concurrency"], recurring["no_catchup"], recurring["mode"]) == (1, True, "ENABLE")
    assert recurring["display_name"] == "nightly-retrain" and recurring["experiment_id"] == "exp-1"
    assert recurring["runtime_config"]["parameters"] == expected_arguments(mlflow={"tracking_uri": TRACKING})
    root_tasks = sent_spec(recurring)["root"]["dag"]["tasks"]
    assert root_tasks["prepare-dataset"]["cachingOptions"] == {}  # no cache: new data under the same version


def test_token_is_sent_as_bearer(kfp_api, capsys):
    kfp_api.token = "s3cret"
    code = main(["kfp", "submit", "--host", kfp_api.url, "--token", "s3cret", "-S", f"mlflow.tracking_uri={TRACKING}"])
    assert code == 0, capsys.readouterr().err
    assert {c["auth"] for c in kfp_api.calls} == {"Bearer s3cret"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "KFP_TOKEN"}
    return subprocess.run([sys.executable, "-m", "adalabelhash.cli", "kfp", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unreachable_host_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    line = one_error(cli("submit", "--host", f"http://127.0.0.1:{port}", "-S", f"mlflow.tracking_uri={TRACKING}"))
    assert line == f"error: KFP API at http://127.0.0.1:{port} is unreachable (Connection refused)"


def test_missing_token_is_one_line(kfp_api):
    kfp_api.token = "s3cret"
    line = one_error(cli("submit", "--host", kfp_api.url, "-S", f"mlflow.tracking_uri={TRACKING}"))
    assert line == (f"error: KFP API at {kfp_api.url} answered HTTP 401: it needs a token; "
                    "pass --token or set KFP_TOKEN")
    calls = len(kfp_api.calls)
    line = one_error(cli("schedule", "--host", kfp_api.url, "--auth", "--cron", "0 0 2 * * *",
                         "-S", f"mlflow.tracking_uri={TRACKING}"))
    assert line == "error: --auth: no token; pass --token or set KFP_TOKEN" and len(kfp_api.calls) == calls


@pytest.mark.parametrize("args, message", [
    (["-S", "trian.epochs=3"], "-S trian.epochs=3: unknown section 'trian'"),
    (["-S", "train.epoch=3"], "params train: unknown key(s) epoch"),
    (["-S", "train.epochs=[3"], "-S train.epochs=[3: value is not valid YAML"),
    (["-S", "train.epochs=three"], "params train.epochs: expected int, got 'three'"),
    (["-S", "train.epochs"], "expected SECTION.KEY=VALUE"),
    (["-S", "kfp.train_gpus=1"], "kfp.* is applied when the pipeline is compiled"),
    (["--cron", "0 2 * * *"], "expected 6 fields, got 5 (KFP's cron has a seconds field first"),
    (["--cron", "0 0 25 * * *"], "bad hour field '25'"),
    (["--cron", "0 0 2 ? * MON-FRI/0"], "bad day of week field"),
    ([], "mlflow.tracking_uri is null"),
])
def test_bad_input_is_one_line_before_any_request(kfp_api, capsys, args, message):
    base = ["kfp", "schedule", "--host", kfp_api.url]
    if "--cron" not in args:
        base += ["--cron", "0 0 2 * * MON-FRI"]
    if args and "mlflow" not in " ".join(args):
        base += ["-S", f"mlflow.tracking_uri={TRACKING}"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert kfp_api.calls == []


@pytest.mark.parametrize("cron", ["0 0 2 * * *", "*/30 * * * * ?", "0 15 10 ? * MON-FRI", "0 0 0 1 JAN,JUL *", "@daily"])
def test_good_cron_expressions(cron):
    from pipelines.cli import check_cron

    assert check_cron(cron) == cron
