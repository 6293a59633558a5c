"""DDP training with 2 CPU processes on the gloo backend, launched by torchrun, as on a multi-GPU node."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import synthetic_images
    from adalabelhash.train import TrainConfig, TrainData, fit

    tx, ty = synthetic_images(4, 24, seed=0)
    vx, vy = synthetic_images(4, 6, seed=1)
    data = TrainData(tx, ty, vx, vy, ["a", "b", "c", "d"], fingerprint="synthetic-v1")
    seen = []
    config = TrainConfig(backbone="small_cnn", bits=16, image_size=16, lr=3e-3, epochs=4, batch_size=8, patience=0,
                         val_database_size=64, threads=1, processes=2)
    result = fit(config, data, callbacks=(lambda e, m: seen.append(e),))
    torch.save({{"state": result.model.state_dict(), "history": result.history, "callbacks": seen}},
               os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
    """
)


def torchrun(args, env=None, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_gloo_processes_train_one_model(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    proc = torchrun([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0]["state"].items():  # DDP kept the replicas identical, codewords included
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["callbacks"] == [1, 2, 3, 4] and ranks[1]["callbacks"] == []  # rank 0 reports
    timeless = [[{k: v for k, v in h.items() if "seconds" not in k and "per_s" not in k} for h in r["history"]] for r in ranks]
    assert timeless[0] == timeless[1]  # all-reduced loss, same validation, hence the same decisions
    assert max(h["val_mAP"] for h in ranks[0]["history"]) > 0.8


@pytest.mark.slow
def test_train_step_launches_torchrun_for_processes(trained, tmp_path):
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["train"].update(image_size=16, bits=16, epochs=2, processes=2, threads=1)
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "adalabelhash.cli", "train", "--params", "params.yaml", "--manifest", trained["manifest"],
         "--data-root", trained["root"], "--validation", trained["work"] / "validate", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["bits"] == 16
    run = json.loads((tmp_path / "out" / "mlflow_run.json").read_text())
    from mlflow import MlflowClient

    client = MlflowClient(params["mlflow"]["tracking_uri"])
    assert client.get_run(run["run_id"]).data.params["train.processes"] == "2"
    assert len(client.search_runs([run["experiment_id"]])) == 1  # one run, from rank 0 only
