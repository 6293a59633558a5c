"""params.yaml is checked when it is read: finite floats in range, one `error:` line naming the key."""

import subprocess
import sys

import pytest
import yaml

from adalabelhash.errors import UserError
from adalabelhash.params import load_params, parse_section
from adalabelhash.train_config import TrainConfig
from components.convert_onnx import ConvertOnnxParams
from components.promote import PromoteParams
from components.validate import ValidateParams


@pytest.mark.parametrize("section, cls, key, value, message", [
    ("train", TrainConfig, "lr", ".inf", "params train.lr: must be a finite number, got inf"),
    ("train", TrainConfig, "weight_decay", ".nan", "params train.weight_decay: must be a finite number, got nan"),
    ("train", TrainConfig, "head_lr", "-.inf", "params train.head_lr: must be a finite number, got -inf"),
    ("train", TrainConfig, "margin", "0", "params train: margin must be > 0, got 0.0"),
    ("train", TrainConfig, "csq_quantization", "-1", "params train: csq_quantization must be >= 0, got -1.0"),
    ("train", TrainConfig, "shift", "0.5", "params train: shift must be in [0, 0.5), got 0.5"),
    ("validate", ValidateParams, "size_mostly", ".nan", "params validate.size_mostly: must be a finite number, got nan"),
    ("convert_onnx", ConvertOnnxParams, "confident_margin", "-0.1",
     "params convert_onnx: confident_margin must be >= 0, got -0.1"),
    ("promote", PromoteParams, "min_gain", ".inf", "params promote.min_gain: must be a finite number, got inf"),
])
def test_a_bad_float_is_one_line_naming_the_key(section, cls, key, value, message):
    values = yaml.safe_load(f"{key}: {value}")
    with pytest.raises(UserError) as info:
        parse_section(cls, values, section)
    assert str(info.value) == message


def test_dataclasses_refuse_non_finite_floats_built_in_code():
    with pytest.raises(ValueError, match="lr must be a finite number, got inf"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="weight_decay must be a finite number, got nan"):
        TrainConfig(weight_decay=float("nan"))
    assert TrainConfig(lr=1e-3, head_lr=None).lr == 1e-3  # a null optional float is fine


def test_a_params_file_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [0.1\n  epochs: 3\n")
    with pytest.raises(UserError) as info:
        load_params(path)
    assert len(str(info.value).splitlines()) == 1 and "not valid YAML" in str(info.value)
    assert "line " in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("train: {lr: .inf}\nmlflow: {enabled: true}\n", "error: params train.lr: must be a finite number, got inf"),
    ("train: {weight_decay: .nan}\nmlflow: {enabled: true}\n",
     "error: params train.weight_decay: must be a finite number, got nan"),
    ("train: {lr: [0.1\n", None),
])
def test_train_cli_refuses_before_any_run_cache_or_output(tmp_path, text, expected):
    (tmp_path / "params.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "adalabelhash.cli", "train", "--manifest", "m.parquet",
                           "--data-root", ".", "--validation", "v", "--out", "out", "--cache", "cache",
                           "--checkpoints", "ckpt"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    if expected:
        assert lines == [expected]
    else:
        assert lines[0].startswith("error: params.yaml: not valid YAML (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no mlflow.db, cache, checkpoint, output
