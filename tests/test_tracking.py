"""How a step's MLflow run ends when the step is stopped from outside."""

import signal
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from adalabelhash import tracking

REPO = Path(__file__).resolve().parents[1]

STEP = """
import sys, time
from adalabelhash import tracking
with tracking.step_status(tracking.RunRef.from_json(sys.argv[1])):
    print("running", flush=True)
    time.sleep(120)
"""


def test_a_step_stopped_by_sigterm_leaves_its_run_killed_not_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref = tracking.start_run(tracking.MlflowParams(experiment="stopped", tracking_uri=uri), {}, {}, "stopped-step")
    step = subprocess.Popen([sys.executable, "-c", STEP, ref.to_json()], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert step.stdout.readline().strip() == "running"
        assert MlflowClient(uri).get_run(ref.run_id).info.status == "RUNNING"
        step.send_signal(signal.SIGTERM)  # what Kubernetes sends a pod it stops
        assert step.wait(timeout=60) != 0
    finally:
        step.kill()
    assert MlflowClient(uri).get_run(ref.run_id).info.status == "KILLED"
