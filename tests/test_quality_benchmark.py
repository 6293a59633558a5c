"""benchmarks/quality/run.py: a data gate carried to another machine without its manifest
(train refuses a gate of another dataset version: tests/test_steps.py)."""

import importlib.util
from pathlib import Path

import pytest

from adalabelhash.params import load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quality_run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_run", REPO / "benchmarks" / "quality" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RUNS", tmp_path)
    return module


def test_a_gate_carried_without_its_manifest_gets_the_same_manifest_rebuilt(quality_run, digits_root):
    params = load_params(REPO / "params.yaml")
    params["prepare"]["root"] = str(digits_root)
    manifest, gate = quality_run.prepared(params, "digits")
    assert (gate / "validation.json").is_file()
    built = manifest.read_bytes()

    manifest.unlink()  # the gate report travelled alone: the same draw is rebuilt
    assert quality_run.prepared(params, "digits") == (manifest, gate)
    assert manifest.read_bytes() == built

