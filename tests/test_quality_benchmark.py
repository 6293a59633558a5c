"""benchmarks/quality/run.py: a data gate carried to another machine without its manifest
(train refuses a gate of another dataset version: tests/test_steps.py)."""

import importlib.util
import json
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


def test_table_lists_headline_rows_before_earlier_and_tuning_rows(quality_run, tmp_path, monkeypatch):
    recorded = json.loads((REPO / "benchmarks" / "quality" / "results.jsonl").read_text().splitlines()[0])
    tags = ["tune-m1", "cheap", "e4", "r128", "e16", "head", "e8", "r160"]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps({**recorded, "run": f"I-adalabelhash-48-cpu-{tag}"}) + "\n" for tag in tags))
    monkeypatch.setattr(quality_run, "RESULTS", results)

    results_table = quality_run.table().split("\n\n")[0]
    listed = [line.rsplit("-", 1)[-1].rstrip(" |") for line in results_table.splitlines()[2:]]
    assert listed == ["r160", "r128", "head", "e16", "e8", "e4", "cheap", "m1"]  # a tuning tag: last


def test_readme_tables_are_rewritten_between_their_markers_only(quality_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results table: cmd -->\nstale\n<!-- end results table -->\nmiddle\n"
                      "<!-- codewords table: cmd -->\nstale\n<!-- end codewords table -->\noutro\n")
    quality_run.write_readme_tables(readme)

    results, codewords = quality_run.table().split("\n\n")
    assert readme.read_text() == (f"intro\n<!-- results table: cmd -->\n{results}\n<!-- end results table -->\nmiddle\n"
                                  f"<!-- codewords table: cmd -->\n{codewords}\n<!-- end codewords table -->\noutro\n")


def test_readme_without_table_markers_is_refused_and_left_unchanged(quality_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results table: cmd -->\nstale\n<!-- end results table -->\n")
    with pytest.raises(SystemExit, match="codewords table"):
        quality_run.write_readme_tables(readme)
    assert readme.read_text() == "<!-- results table: cmd -->\nstale\n<!-- end results table -->\n"


def test_from_run_reuses_only_a_model_trained_with_the_same_settings(quality_run, tmp_path, digits_root):
    from adalabelhash.data.manifest import Manifest
    from adalabelhash.train_config import TrainConfig

    params = load_params(REPO / "params.yaml")
    params["prepare"]["root"] = str(digits_root)
    manifest, _ = quality_run.prepared(params, "digits")
    identity = TrainConfig(**params["train"]).identity(Manifest.load(manifest).fingerprint())
    source = tmp_path / "trained"
    (source / "checkpoints" / identity).mkdir(parents=True)
    (source / "checkpoints" / identity / "last.pt").write_bytes(b"weights")

    quality_run.reuse_checkpoints(params, manifest, source, tmp_path / "again")
    assert (tmp_path / "again" / "checkpoints" / identity / "last.pt").read_bytes() == b"weights"
    with pytest.raises(SystemExit, match="exists"):
        quality_run.reuse_checkpoints(params, manifest, source, tmp_path / "again")
    params["train"]["seed"] = 1  # other weights: refused, nothing copied
    with pytest.raises(SystemExit, match="not trained with these train settings"):
        quality_run.reuse_checkpoints(params, manifest, source, tmp_path / "other-seed")
    assert not (tmp_path / "other-seed").exists()
