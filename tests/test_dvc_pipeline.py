"""`dvc repro` of the real dvc.yaml in a temporary copy of the repository, logging to a real MLflow store."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_project(root: Path, data: dict[str, Path], train: dict, **sections) -> dict[str, str]:
    """A git checkout of this repository in `root` with `data` copied in and params.yaml edited; its env."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for target, source in data.items():
        shutil.copytree(source, root / target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(train)
    for name, values in sections.items():
        params[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tracking_db = root.parent / "mlflow.db"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tracking_db}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "copy"], root, env)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_root):
    """A git + DVC checkout of this repository with the digits data in place, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("repo")
    env = copy_project(root, {"data/digits": digits_root}, {"epochs": 2, "threads": 2})
    first = run(["dvc", "repro"], root, env)
    return {"root": root, "env": env, "uri": env["MLFLOW_TRACKING_URI"], "first": first}


def test_repro_builds_every_output(project):
    root = project["root"]
    metrics = json.loads((root / "build/evaluate/metrics.json").read_text())
    assert 0.2 < metrics["mAP"] <= 1 and 0 < metrics["mAP_at_100"] <= 1 and metrics["bits"] == 32
    assert metrics["queries"] == 200 and metrics["database"] == 1597
    codes = np.load(root / "build/encode/codes.npz")
    assert codes["codes"].shape == (1797, 4) and codes["codes"].dtype == np.uint8
    assert json.loads((root / "build/onnx/parity.json").read_text())["passed"] is True
    assert json.loads((root / "build/validate/validation.json").read_text())["summary"]["success"] is True
    for png in ("build/codewords/heatmap.png", "build/evaluate/pr.png", "build/evaluate/examples.png",
                "build/train/curves.png"):
        assert (root / png).read_bytes()[:4] == b"\x89PNG", png
    decision = json.loads((root / "build/promote/decision.json").read_text())
    assert decision["champion"] and decision["version"] == "1"


def test_data_dvc_matches_the_regenerated_digits(project):
    status = run(["dvc", "status", "data.dvc"], project["root"], project["env"])
    assert "changed" not in status.stdout, status.stdout


def test_mlflow_run_holds_params_curves_artifacts_and_model(project):
    root, uri = project["root"], project["uri"]
    ref = json.loads((root / "build/evaluate/mlflow_run.json").read_text())
    client = MlflowClient(uri, uri)
    run_ = client.get_run(ref["run_id"])
    assert run_.info.run_name == "small_cnn-32bits"  # mlflow.run_name null: backbone and bits
    params = run_.data.params
    assert params["train.bits"] == "32" and params["prepare.source"] == "digits" and params["evaluate.radius"] == "2"
    assert run_.data.tags["dataset.fingerprint"] == json.loads((root / "build/evaluate/metrics.json").read_text())[
        "dataset_fingerprint"]
    assert run_.data.tags["mlflow.source.git.commit"] and run_.data.tags["dataset.data_dvc_md5"]
    assert run_.data.tags["train.hardware"].startswith("cpu: ")  # what trained it, for comparing runs
    assert len(client.get_metric_history(ref["run_id"], "train_loss")) == 2
    assert {"mAP", "mAP_at_100", "P_radius_2", "onnx_bit_agreement", "codeword_min_distance"} <= set(run_.data.metrics)
    listed = {f.path for d in ("validation", "codewords", "evaluation", "database")
              for f in client.list_artifacts(ref["run_id"], d)}
    assert {"validation/validation.json", "validation/data_docs.html", "codewords/heatmap.png",
            "evaluation/pr.png", "evaluation/examples.png",
            "database/codes.npz", "database/items.parquet", "database/database.json"} <= listed  # what `serve` loads
    champion = client.get_model_version_by_alias("adalabelhash", "champion")
    assert champion.run_id == ref["run_id"] and champion.tags["bits"] == "32"


def ran_stages(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_second_repro_does_nothing(project):
    out = run(["dvc", "repro"], project["root"], project["env"]).stdout
    # Only the registry question is asked again (always_changed); its unchanged answer re-runs nothing.
    assert ran_stages(out) == {"champion"} and "score_champion' didn't change" in out, out


def test_retrain_if_drift_skips_training_on_unchanged_data(project):
    root, env = project["root"], project["env"]
    out = run(["adalabelhash", "retrain", "--if-drift"], root, env).stdout
    assert "no retraining needed (trigger: schedule" in out and "training skipped" in out, out
    assert "Running stage" not in out  # prepare and the gate were up to date
    drift = json.loads((root / "build/retrain/monitor/drift.json").read_text())
    assert drift["retrain"] is False and drift["reasons"] == [] and drift["new_data"] is False


def test_changed_param_reruns_only_what_depends_on_it(project):
    root, env = project["root"], project["env"]
    text = (root / "params.yaml").read_text().replace("radius: 2", "radius: 1")
    (root / "params.yaml").write_text(text)
    out = run(["dvc", "repro"], root, env).stdout
    # score_champion reads the evaluate section; monitor logs its report into the derived run
    assert ran_stages(out) == {"evaluate", "champion", "score_champion", "monitor", "promote"}, out
    metrics = json.loads((root / "build/evaluate/metrics.json").read_text())
    assert "P_radius_1" in metrics
    # MLflow params are immutable: the re-evaluation went to a derived run
    derived = json.loads((root / "build/evaluate/mlflow_run.json").read_text())["run_id"]
    original = json.loads((root / "build/onnx/mlflow_run.json").read_text())["run_id"]
    run_ = MlflowClient(project["uri"]).get_run(derived)
    assert derived != original and run_.data.tags["adalabelhash.derived_from"] == original
    assert run_.data.params["evaluate.radius"] == "1" and "train_loss" in run_.data.metrics


def test_exp_run_with_64_bits_and_a_promotion_refused(project):
    root, env = project["root"], project["env"]
    client = MlflowClient(project["uri"], project["uri"])
    versions = len(client.search_model_versions("name='adalabelhash'"))
    champion = client.get_model_version_by_alias("adalabelhash", "champion").version
    run(["dvc", "exp", "run", "-S", "train.bits=64", "-S", "promote.min_map=0.99", "-S", "mlflow.run_name=wide-codes"],
        root, env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    assert '"bits": 64' in json.dumps(shown)
    metrics = json.loads((root / "build/evaluate/metrics.json").read_text())
    assert metrics["bits"] == 64 and np.load(root / "build/encode/codes.npz")["codes"].shape[1] == 8
    decision = json.loads((root / "build/promote/decision.json").read_text())
    assert not decision["challenger"] and not decision["champion"] and decision["version"] == str(versions + 1)
    assert client.get_model_version_by_alias("adalabelhash", "champion").version == champion  # untouched
    assert client.get_model_version("adalabelhash", decision["version"]).aliases == []
    run_id = json.loads((root / "build/evaluate/mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.run_name == "wide-codes"  # the name to find it by in the UI


def test_metrics_and_offline_plots(project, tmp_path):
    root, env = project["root"], project["env"]
    shown = run(["dvc", "metrics", "show"], root, env).stdout
    assert "mAP" in shown and "build/evaluate/metrics.json" in shown
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], root, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "vegaEmbed" in page and "<script src=" not in page and "cdn.jsdelivr" not in page


def test_retraining_on_new_data_replaces_the_champion_fairly(project):
    """The scheduled-retraining story: new data, a better model takes @champion because the old
    champion re-scored on the new data is worse; a weaker model trained afterwards does not."""
    root, env = project["root"], project["env"]
    client = MlflowClient(project["uri"], project["uri"])
    old = client.get_model_version_by_alias("adalabelhash", "champion")
    for class_dir in sorted((root / "data" / "digits").iterdir()):  # a tenth of each class removed
        for image in sorted(class_dir.iterdir())[::10]:
            image.unlink()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=10)
    params["promote"].update(min_map=0.5)  # the experiment before this test raised it
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["adalabelhash", "retrain", "--if-drift"], root, env).stdout  # what cron runs
    assert "RETRAIN (trigger: new data" in out and {"prepare", "train", "score_champion", "promote"} <= ran_stages(out)
    score = json.loads((root / "build/score_champion/score.json").read_text())
    metrics = json.loads((root / "build/evaluate/metrics.json").read_text())
    assert score["version"] == str(old.version) and score["dataset_fingerprint"] == metrics["dataset_fingerprint"]
    assert score["dataset_fingerprint"] != old.tags["dataset.fingerprint"]  # re-scored on the new data
    decision = json.loads((root / "build/promote/decision.json").read_text())
    assert decision["champion"] and metrics["mAP"] > score["value"], decision["reasons"]
    new = client.get_model_version_by_alias("adalabelhash", "champion")
    assert str(new.version) == decision["version"] != str(old.version)
    assert new.tags["gate.compared_with"] == str(old.version)
    assert float(new.tags["gate.champion_rescored"]) == pytest.approx(score["value"], abs=1e-6)
    run_tags = client.get_run(json.loads((root / "build/evaluate/mlflow_run.json").read_text())["run_id"]).data.tags
    assert run_tags["promote.decision"] == "champion" and run_tags["promote.compared_with"] == f"v{old.version}"
    assert run_tags["trigger_reason"] == "new data"
    assert json.loads((root / "build/monitor/drift.json").read_text())["new_data"] is True

    params["train"].update(epochs=2, seed=1)  # a weaker model on the same data
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], root, env)
    weaker = json.loads((root / "build/promote/decision.json").read_text())
    assert not weaker["champion"] and weaker["compared_with"]["version"] == str(new.version), weaker["reasons"]
    assert client.get_model_version_by_alias("adalabelhash", "champion").version == new.version


def multi_label_images(root: Path, count: int, seed: int, prefix: str) -> list[str]:
    """`count` 16 px PNGs, each showing 1-2 of 4 labels (label k: a bright quadrant k), as list lines."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        labels = np.zeros(4, int)
        labels[rng.choice(4, size=rng.integers(1, 3), replace=False)] = 1
        pixels = rng.integers(0, 40, (16, 16, 3))
        for k in np.flatnonzero(labels):
            pixels[(k // 2) * 8 : (k // 2) * 8 + 8, (k % 2) * 8 : (k % 2) * 8 + 8] += [200, 120 + 30 * k, 60]
        path = f"img/{prefix}{i:04d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / path)
        lines.append(f"{path} {' '.join(map(str, labels))}")
    return lines


def test_multi_label_listfile_end_to_end_with_unlabeled_lines_dropped(tmp_path):
    """prepare -> ... -> promote on a multi-label set from list files, by `dvc repro`; editing a list reruns prepare."""
    data = tmp_path / "multilabel"
    train = multi_label_images(data, 240, seed=0, prefix="t")
    queries = multi_label_images(data, 40, seed=1, prefix="q")
    (data / "img" / "blank.png").write_bytes((data / "img" / "t0000.png").read_bytes())
    unlabeled = "img/blank.png 0 0 0 0"  # NUS-WIDE and COCO lists have such lines
    (data / "train.txt").write_text("\n".join(train + [unlabeled]) + "\n")
    (data / "database.txt").write_text("\n".join(train + [unlabeled]) + "\n")
    (data / "query.txt").write_text("\n".join(queries) + "\n")
    (data / "classes.txt").write_text("sky\nsea\ncar\ntree\n")
    root = tmp_path / "repo"
    lists = {split: f"data/multilabel/{split}.txt" for split in ("train", "query", "database")}
    env = copy_project(root, {"data/multilabel": data}, {"epochs": 4, "threads": 2, "image_size": 16, "bits": 16,
                                                         "lr": 0.003},
                       prepare={"source": "listfile", "root": "data/multilabel", "list_files": lists,
                                "class_names": "data/multilabel/classes.txt", "val_size": 24, "unlabeled": "drop",
                                "query_per_class": None, "val_per_class": 10},
                       convert_onnx={"parity_images": 16})
    run(["dvc", "repro"], root, env)
    manifest = json.loads(run([sys.executable, "-c", "import json, sys; from adalabelhash.data.manifest import Manifest;"
                               "m = Manifest.load('build/prepare/manifest.parquet');"
                               "print(json.dumps({'info': m.info, 'sizes': m.split_sizes(), 'classes': m.classes}))"],
                              root, env).stdout)
    assert manifest["info"]["unlabeled_dropped"] == {"train": 1, "query": 0, "database": 1}
    assert manifest["sizes"] == {"train": 216, "val": 24, "query": 40, "database": 240}
    assert manifest["classes"] == ["sky", "sea", "car", "tree"]
    metrics = json.loads((root / "build/evaluate/metrics.json").read_text())
    assert metrics["queries"] == 40 and metrics["database"] == 240 and metrics["mAP"] > 0.6, metrics
    decision = json.loads((root / "build/promote/decision.json").read_text())
    assert decision["challenger"] and decision["champion"], decision
    assert json.loads((root / "build/validate/validation.json").read_text())["summary"]["success"] is True
    # a list file is a dependency of prepare: editing it makes prepare (and what follows) stale
    (root / "data/multilabel/query.txt").write_text("\n".join(queries[:-1]) + "\n")
    status = run(["dvc", "status", "prepare"], root, env).stdout
    assert "changed deps" in status and "data/multilabel" in status, status
    # the other policy refuses the unlabeled line, naming file and line
    text = (root / "params.yaml").read_text().replace("unlabeled: drop", "unlabeled: refuse")
    (root / "params.yaml").write_text(text)
    proc = run(["adalabelhash", "prepare", "--params", "params.yaml", "--out", str(tmp_path / "refused")], root, env,
               check=False)
    assert proc.returncode == 2 and not (tmp_path / "refused").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: data/multilabel/train.txt:241: img/blank.png has no label (1 such line(s) in this file); "
        "set prepare.unlabeled: drop to leave them out"]
