"""The promotion gate against a real MLflow tracking store and registry (sqlite; and one real server)."""

import json
import socket
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
from mlflow import MlflowClient

from adalabelhash import tracking
from adalabelhash.errors import UserError
from components.promote import CHALLENGER, CHAMPION, PromoteParams, decide, promote

DATASET = "a" * 64
NO_CHAMPION = {"version": None, "value": None, "dataset_fingerprint": DATASET}


def scored(version, value, dataset=DATASET, recorded=None):
    """score.json of the score-champion step: champion `version` re-scored at `value` on `dataset`."""
    return {"version": version, "value": value, "dataset_fingerprint": dataset, "champion": {"recorded": recorded}}


def test_gate_decisions_as_a_pure_function():
    params = PromoteParams(min_map=0.5, min_gain=0.02)
    assert decide(params, 0.7, DATASET, None) | {"reasons": None} == {
        "challenger": True, "champion": True, "applied": True, "reasons": None}
    champion = {"version": "3", "value": 0.69, "recorded": 0.95, "dataset": DATASET}
    assert not decide(params, 0.70, DATASET, champion)["champion"]  # 0.70 < 0.69 + 0.02
    better = decide(params, 0.72, DATASET, champion)  # beats the re-scored 0.69, not the recorded 0.95
    assert better["champion"] and "champion v3 0.6900 re-scored on this data, 0.9500 on its own data" in better["reasons"][1]
    stale = decide(params, 0.9, "b" * 64, champion)  # a score of other data: not comparable
    assert not stale["champion"] and "not comparable" in stale["reasons"][1]
    low = decide(params, 0.4, DATASET, None)
    assert not low["challenger"] and not low["champion"] and "0.4000 < min_map 0.5" in low["reasons"][0]
    assert not decide(replace(params, mode="dry_run"), 0.9, DATASET, None)["applied"]


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory, trained):
    """One sqlite tracking store (creating its tables takes seconds); a run per call, each with the real ONNX model."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    params = tracking.MlflowParams(experiment="gate-tests", tracking_uri=uri)

    def new_run(name="run") -> tracking.RunRef:
        ref = tracking.start_run(params, {"train": {"bits": 16}}, {"dataset.fingerprint": DATASET}, name)
        return tracking.log_onnx_model(ref, trained["onnx"], [], image_size=16)

    return uri, new_run


@pytest.fixture
def store(sqlite_store, request):
    """The shared store, and a registered model name of this test's own."""
    uri, new_run = sqlite_store
    return uri, new_run, request.node.name.split("[")[0][5:40]


def metrics_file(path, value, dataset=DATASET):
    path.write_text(json.dumps({"mAP": value, "mAP_at_100": value, "bits": 16, "dataset_fingerprint": dataset}))
    return path


def aliases(uri, name):
    model = MlflowClient(uri, uri).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_gate_promotes_refuses_keeps_champion_and_dry_run_changes_nothing(store, tmp_path):
    uri, new_run, name = store
    params = PromoteParams(model_name=name, min_map=0.5)
    client = MlflowClient(uri, uri)
    first = promote(params, metrics_file(tmp_path / "m1.json", 0.80), new_run("first"), tmp_path / "p1", NO_CHAMPION)
    assert first["champion"] and first["challenger"] and aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "1"}
    version = client.get_model_version(name, "1")
    assert version.tags["mAP"] == "0.800000" and version.tags["dataset.fingerprint"] == DATASET
    assert version.tags["gate.verdict"] == "champion" and version.run_id and version.tags["bits"] == "16"
    assert version.tags["gate.compared_with"] == ""
    assert json.loads((tmp_path / "p1" / "decision.json").read_text())["version"] == "1"

    refused = promote(replace(params, min_map=0.99), metrics_file(tmp_path / "m2.json", 0.85), new_run(), tmp_path / "p2",
                      scored("1", 0.80))
    assert not refused["challenger"] and not refused["champion"]
    assert aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "1"}  # v2 registered, no alias
    assert client.get_model_version(name, "2").tags["gate.verdict"] == "rejected"

    worse = promote(params, metrics_file(tmp_path / "m3.json", 0.70), new_run(), tmp_path / "p3", scored("1", 0.80))
    assert worse["challenger"] and not worse["champion"]
    assert aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "3"}

    # New data: v1 recorded 0.80 on its own data but scores 0.65 on this one, where the new model has 0.70.
    new_data = promote(params, metrics_file(tmp_path / "m4.json", 0.70, "b" * 64), new_run(), tmp_path / "p4",
                       scored("1", 0.65, "b" * 64, recorded=0.80))
    assert new_data["champion"] and aliases(uri, name) == {CHAMPION: "4", CHALLENGER: "4"}
    tags = client.get_model_version(name, "4").tags
    assert tags["gate.compared_with"] == "1" and tags["gate.champion_rescored"] == "0.650000"
    assert tags["gate.champion_recorded"] == "0.800000" and "0.6500 re-scored on this data" in tags["gate.reasons"]
    assert client.get_model_version(name, "1").tags["gate.verdict"] == "champion"  # what the gate did then

    stale = promote(params, metrics_file(tmp_path / "m5.json", 0.99, "b" * 64), new_run(), tmp_path / "p5",
                    scored("1", 0.65, "b" * 64))  # scored against v1, but v4 holds @champion now
    assert stale["challenger"] and not stale["champion"] and "not comparable" in stale["reasons"][-1]
    assert aliases(uri, name) == {CHAMPION: "4", CHALLENGER: "5"}

    before = len(client.search_model_versions(f"name='{name}'"))
    dry = promote(replace(params, mode="dry_run"), metrics_file(tmp_path / "m6.json", 0.99, "b" * 64), new_run(),
                  tmp_path / "p6", scored("4", 0.70, "b" * 64))
    assert dry["champion"] and not dry["applied"] and dry["version"] is None  # would promote, did nothing
    assert len(client.search_model_versions(f"name='{name}'")) == before
    assert aliases(uri, name) == {CHAMPION: "4", CHALLENGER: "5"}


def test_one_model_one_version_and_the_gate_re_applied(store, tmp_path):
    uri, new_run, name = store
    client = MlflowClient(uri, uri)
    params = PromoteParams(model_name=name, min_map=0.5)
    promote(params, metrics_file(tmp_path / "m0.json", 0.60), new_run(), tmp_path / "p0", NO_CHAMPION)
    ref = new_run("retrained")
    first = promote(params, metrics_file(tmp_path / "m1.json", 0.70), ref, tmp_path / "p1", scored("1", 0.60))
    assert first["champion"] and first["version"] == "2"
    again = promote(params, metrics_file(tmp_path / "m1.json", 0.70), ref, tmp_path / "p2", scored("1", 0.60))
    assert again["version"] == "2" and again["champion"] and "already v2" in again["reasons"][-1]
    assert len(client.search_model_versions(f"name='{name}'")) == 2  # no duplicate registered
    stricter = promote(replace(params, min_gain=0.2), metrics_file(tmp_path / "m1.json", 0.70), ref, tmp_path / "p3",
                       scored("1", 0.60))  # `dvc exp run -S promote.min_gain=0.2`: v2 no longer earns it
    assert stricter["version"] == "2" and not stricter["champion"]
    assert aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "2"}
    assert client.get_model_version(name, "2").tags["gate.verdict"] == "challenger"
    assert "moved back from v2 to v1" in client.get_model_version(name, "2").tags["gate.reasons"]


def test_bad_metrics_file_changes_nothing(store, tmp_path):
    uri, new_run, name = store
    ref = new_run()
    promote(PromoteParams(model_name=name), metrics_file(tmp_path / "good.json", 0.8), ref, tmp_path / "ok", NO_CHAMPION)
    (tmp_path / "bad.json").write_text('{"mAP": "high"}')
    with pytest.raises(UserError, match="'mAP' must be a number in \\[0, 1\\]"):
        promote(PromoteParams(model_name=name), tmp_path / "bad.json", ref, tmp_path / "out", NO_CHAMPION)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        promote(PromoteParams(model_name=name), tmp_path / "broken.json", ref, tmp_path / "out", NO_CHAMPION)
    assert len(MlflowClient(uri, uri).search_model_versions(f"name='{name}'")) == 1
    assert not (tmp_path / "out").exists()


def test_unreachable_server_is_one_clear_error_and_no_change(store, tmp_path):
    uri, new_run, name = store
    ref = new_run()
    promote(PromoteParams(model_name=name), metrics_file(tmp_path / "m.json", 0.8), ref, tmp_path / "ok", NO_CHAMPION)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    gone = replace(ref, tracking_uri=dead)
    with pytest.raises(UserError, match=f"MLflow at {dead}: looking up this model's version failed"):
        promote(PromoteParams(model_name=name), metrics_file(tmp_path / "m2.json", 0.9), gone, tmp_path / "out",
                scored("1", 0.8))
    assert aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "1"} and not (tmp_path / "out").exists()


def test_racing_promotions_end_with_a_champion_that_passed(store, tmp_path):
    uri, new_run, name = store
    promote(PromoteParams(model_name=name), metrics_file(tmp_path / "m0.json", 0.60), new_run(), tmp_path / "p0", NO_CHAMPION)
    values = (0.75, 0.70, 0.40, 0.65)  # three pass the gate, one does not
    refs = [new_run(f"racer{i}") for i in range(len(values))]
    results, errors = {}, []

    def racer(i, value):
        try:
            results[i] = promote(PromoteParams(model_name=name), metrics_file(tmp_path / f"r{i}.json", value), refs[i],
                                 tmp_path / f"r{i}", scored("1", 0.60))  # every racer re-scored the same champion
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(i, v)) for i, v in enumerate(values)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    champion = MlflowClient(uri, uri).get_model_version_by_alias(name, CHAMPION)
    # The registry has no compare-and-set: which passing racer wins depends on timing, but the
    # champion is always one that passed the gate and beat the champion it replaced.
    assert float(champion.tags["mAP"]) in (0.75, 0.70, 0.65) and champion.tags["gate.verdict"] == "champion"
    assert not results[2]["challenger"] and not results[2]["champion"]
