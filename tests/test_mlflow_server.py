"""A real `mlflow server` (mlflow/serve-local.sh, the `mlflow_server` fixture) on loopback: promote over
HTTP, a server killed at each request of a promotion, and the UI in Chromium."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
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
    (tmp_path / "score.json").write_text(json.dumps({"version": None, "value": None, "dataset_fingerprint": "d" * 64}))
    proc = subprocess.run(
        [sys.executable, "-m", "adalabelhash.cli", "promote", "--metrics", "metrics.json", "--run", "run",
         "--champion-score", "score.json", "--out", "out"],
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
    assert tags["mAP"] == "0.810000" and tags["gate.verdict"] == "champion" and tags["dataset.fingerprint"] == "d" * 64
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
def test_ui_walkthrough_from_the_home_page_to_compare_and_registry(mlflow_server, trained, tmp_path):
    """The README's walkthrough, clicked through as a user would in MLflow 3.17: its home page opens on
    the GenAI view; *Model training* -> *Experiments* -> the experiment -> tick two runs -> *Compare*;
    then *Model registry*, where the model shows its @champion."""
    from components.promote import PromoteParams, promote

    params = tracking.MlflowParams(experiment="compare-in-ui", tracking_uri=mlflow_server)
    refs = []
    for name, value in (("lite0-48bits", 0.8123), ("lite0-64bits", 0.7789)):
        ref = tracking.start_run(params, {"train": {"bits": int(name[-6:-4])}}, {}, name)
        tracking.log_metrics(ref, {"mAP": value, "mAP_at_1000": value + 0.05})
        refs.append(ref)
    ref = tracking.log_onnx_model(refs[0], trained["onnx"], [], image_size=16)
    (tmp_path / "m.json").write_text(json.dumps({"mAP": 0.8123, "bits": 48, "dataset_fingerprint": "f" * 64}))
    promote(PromoteParams(model_name="walkthrough-model"), tmp_path / "m.json", ref, tmp_path / "p",
            {"version": None, "value": None, "dataset_fingerprint": "f" * 64})

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as clickable
    from selenium.webdriver.support.ui import WebDriverWait

    def click(xpath: str):
        def found_and_clicked(driver) -> bool:  # MLflow's React lists re-render: a stale element is looked up again
            element = clickable.element_to_be_clickable((By.XPATH, xpath))(driver)
            if element:
                element.click()
            return bool(element)

        WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(found_and_clicked)

    def body() -> str:
        return browser.find_element(By.TAG_NAME, "body").text

    browser = chromium_driver()
    try:
        browser.get(mlflow_server)
        WebDriverWait(browser, 120).until(lambda b: "Model training" in body())
        click("//*[text()='Model training']")
        click("//a[.//text()='Experiments' or text()='Experiments']")
        click("//a[contains(., 'compare-in-ui')]")
        WebDriverWait(browser, 60).until(lambda b: "lite0-64bits" in body())
        for row in (0, 1):  # the grid's row checkboxes are styled, hidden inputs: click them as the page does
            box = [e for e in browser.find_elements(By.XPATH, f"//*[@row-index='{row}']//input[@type='checkbox']")
                   if e.rect["width"]][0]
            browser.execute_script("arguments[0].click()", box)
        click("//button[.//text()='Compare' or text()='Compare']")
        WebDriverWait(browser, 120).until(lambda b: "0.8123" in body())
        compared = body()
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "mlflow-compare-runs.png"))
        click("//a[.//text()='Model registry' or text()='Model registry']")
        WebDriverWait(browser, 60).until(lambda b: "walkthrough-model" in body())
        for dialog in browser.find_elements(By.XPATH, "//div[@role='dialog']//button"):  # the UI's one-time tip
            if dialog.is_displayed():
                dialog.click()
                break
        click("//a[contains(., 'walkthrough-model')]")
        WebDriverWait(browser, 60).until(lambda b: "champion" in body())
        registry = body()
        browser.save_screenshot(str(ARTIFACTS / "mlflow-registry.png"))
    finally:
        browser.quit()
    assert "Comparing 2 Runs" in compared and "0.8123" in compared and "0.7789" in compared
    assert "lite0-48bits" in compared and "lite0-64bits" in compared
    assert "Version 1" in registry and "champion" in registry and "challenger" in registry


class KillableProxy:
    """Loopback HTTP proxy in front of the real server that plays the server's death at request
    `kill_at`: that request is dropped unanswered ("before"), or handled by the server with its
    answer lost ("after"), and every later request finds nobody answering."""

    def __init__(self, upstream: str):
        import http.server

        self.upstream, self.kill_at, self.mode, self.count, self.dead = upstream, 0, "before", 0, False
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.count += 1
                    now = proxy.count == proxy.kill_at
                    drop = proxy.dead or (now and proxy.mode == "before")
                    proxy.dead = proxy.dead or now
                if not drop:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                    answer = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers,
                                              timeout=60)
                    if not (now and proxy.mode == "after"):
                        self.send_response(answer.status_code)
                        self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                        self.send_header("Content-Length", str(len(answer.content)))
                        self.end_headers()
                        self.wfile.write(answer.content)
                        return
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no answer: what a killed server gives

            do_GET = do_POST = do_PATCH = do_DELETE = relay

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arm(self, kill_at: int, mode: str) -> None:
        self.kill_at, self.mode, self.count, self.dead = kill_at, mode, 0, False


@pytest.mark.slow
def test_server_killed_at_each_request_of_a_promotion_leaves_no_false_claim(mlflow_server, trained, tmp_path,
                                                                              monkeypatch):
    """Kill the server at every request a promotion makes, before and after the server handled it:
    one clear error each time, @champion never on a version that did not earn it, no verdict tag
    that the aliases contradict, and running promote again completes it with one version."""
    from dataclasses import replace

    from mlflow import MlflowClient

    from adalabelhash.errors import UserError
    from components.promote import PromoteParams, promote

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails at once
    client = MlflowClient(mlflow_server, mlflow_server)
    params = tracking.MlflowParams(experiment="killed", tracking_uri=mlflow_server)
    proxy = KillableProxy(mlflow_server)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mAP": 0.9, "bits": 16, "dataset_fingerprint": "e" * 64}))
    score = {"version": "1", "value": 0.6, "dataset_fingerprint": "e" * 64, "champion": {"recorded": 0.8}}

    old, new = (tracking.log_onnx_model(tracking.start_run(params, {}, {}, name), trained["onnx"], [], image_size=16)
                for name in ("old", "new"))

    def new_model(name: str) -> tracking.RunRef:
        """A registered model `name` whose v1 (`old`) holds @champion; `new` is the model to promote over it."""
        promote(PromoteParams(model_name=name), metrics, old, tmp_path / "setup", {**score, "version": None})
        return new

    ref = new_model("killed-count")
    proxy.arm(0, "before")
    promote(PromoteParams(model_name="killed-count"), metrics, replace(ref, tracking_uri=proxy.url), tmp_path / "n", score)
    requests_made = proxy.count
    assert requests_made >= 8

    for kill_at in range(1, requests_made + 1):
        for mode in ("before", "after"):
            name = f"killed-{kill_at}-{mode}"
            ref = new_model(name)
            proxy.arm(kill_at, mode)
            with pytest.raises(UserError) as error:
                promote(PromoteParams(model_name=name), metrics, replace(ref, tracking_uri=proxy.url), tmp_path / name,
                        score)
            assert "\n" not in str(error.value) and str(error.value).startswith(f"MLflow at {proxy.url}:")
            assert not (tmp_path / name).exists()  # no decision.json for a promotion that did not finish
            champion = str(client.get_registered_model(name).aliases["champion"])
            for version in client.search_model_versions(f"name='{name}'"):
                verdict = version.tags.get("gate.verdict")
                if str(version.version) != "1":
                    assert verdict in (None, "champion"), (kill_at, mode, version.tags)
                    assert (verdict == "champion") <= (champion == str(version.version)), (kill_at, mode)
            # the server is back: promote again completes it, on the same version
            done = promote(PromoteParams(model_name=name), metrics, ref, tmp_path / name, score)
            versions = client.search_model_versions(f"name='{name}'")
            assert done["champion"] and len(versions) == 2, (kill_at, mode, done["reasons"])
            assert str(client.get_registered_model(name).aliases["champion"]) == done["version"] == "2"
            assert client.get_model_version(name, "2").tags["gate.verdict"] == "champion"
