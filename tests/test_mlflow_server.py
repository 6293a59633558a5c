"""A real `mlflow server` (mlflow/serve-local.sh, the `mlflow_server` fixture) on loopback: promote over
HTTP, and the UI in Chromium."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from adalabelhash import tracking

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


@pytest.mark.slow
def test_promote_step_over_http_read_back_through_rest(mlflow_server, trained, tmp_path):
    params = tracking.MlflowParams(experiment="over-http", tracking_uri=mlflow_server)
    ref = tracking.start_run(params, {"train": {"bits": 16}}, {"dataset.fingerprint": "d" * 64}, "http-run")
    ref = tracking.log_onnx_model(ref, trained["onnx"], [trained["codewords"] / "codewords.json"], image_size=16)
    ref.save(tmp_path / "run")
    (tmp_path / "metrics.json").write_text(json.dumps({"mAP": 0.81, "bits": 16, "dataset_fingerprint": "d" * 64}))
    (tmp_path / "params.yaml").write_text("promote: {model_name: served-model, min_map: 0.5}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "adalabelhash.cli", "promote", "--metrics", "metrics.json", "--run", "run", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": "file:///nowhere"},  # the run reference names the server
    )
    assert proc.returncode == 0, proc.stderr
    assert "served-model v1 -> champion" in proc.stdout

    api = f"{mlflow_server}/api/2.0/mlflow"
    alias = requests.get(f"{api}/registered-models/alias", params={"name": "served-model", "alias": "champion"}, timeout=30)
    assert alias.status_code == 200, alias.text
    version = alias.json()["model_version"]
    assert version["version"] == "1" and version["run_id"] == ref.run_id
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["mAP"] == "0.810000" and tags["gate.champion"] == "True" and tags["dataset.fingerprint"] == "d" * 64
    artifacts = requests.get(f"{api}/artifacts/list", params={"run_id": ref.run_id}, timeout=30).json()
    assert version["source"].startswith("models:/") or any(f["path"] == "model" for f in artifacts.get("files", []))


def chromium_driver():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_ui_compares_two_runs_side_by_side(mlflow_server):
    params = tracking.MlflowParams(experiment="compare-in-ui", tracking_uri=mlflow_server)
    refs = []
    for name, value in (("lite0-48bits", 0.8123), ("lite0-64bits", 0.7789)):
        ref = tracking.start_run(params, {"train": {"bits": int(name[-6:-4])}}, {}, name)
        tracking.log_metrics(ref, {"mAP": value, "mAP_at_1000": value + 0.05})
        refs.append(ref)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    runs = json.dumps([r.run_id for r in refs])
    url = f"{mlflow_server}/#/compare-runs?runs={runs}&experiments={json.dumps([refs[0].experiment_id])}"
    browser = chromium_driver()
    try:
        browser.get(url)
        WebDriverWait(browser, 120).until(lambda b: "0.8123" in b.find_element(By.TAG_NAME, "body").text)
        text = browser.find_element(By.TAG_NAME, "body").text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "mlflow-compare-runs.png"))
    finally:
        browser.quit()
    assert "mAP" in text and "0.8123" in text and "0.7789" in text
    assert "lite0-48bits" in text and "lite0-64bits" in text
