"""score-champion: the registered @champion re-scored on this run's data, against a real sqlite store."""

import json
import shutil

import pytest

from adalabelhash import tracking
from adalabelhash.errors import UserError
from components.encode import EncodeParams, encode
from components.evaluate import EvaluateParams, evaluate
from components.promote import PromoteParams, promote
from components.score_champion import resolve, score

DATASET = "c" * 64
EVALUATE = EvaluateParams(topk=[50], precision_at=[10], examples=0)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, trained):
    """A store where v1 of `champ` (the trained digits model, with codewords beside it) holds @champion."""
    work = tmp_path_factory.mktemp("score-champion")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    ref = tracking.start_run(tracking.MlflowParams(tracking_uri=uri, experiment="score"), {}, {}, "champion-run")
    ref = tracking.log_onnx_model(ref, trained["onnx"], [trained["codewords"] / "codewords.npy"], image_size=16)
    (work / "m.json").write_text(json.dumps({"mAP": 0.7, "bits": 16, "dataset_fingerprint": DATASET}))
    promote(PromoteParams(model_name="champ"), work / "m.json", ref, work / "p",
            {"version": None, "value": None, "dataset_fingerprint": DATASET})
    return {"uri": uri, "ref": ref, "work": work}


def test_the_champion_scores_what_evaluate_gives_its_own_encoder(registry, trained, tmp_path):
    found, note = resolve(PromoteParams(model_name="champ"), registry["uri"])
    assert found["version"] == "1" and found["recorded"] == 0.7 and found["recorded_dataset"] == DATASET
    assert note == "@champion is v1"
    result = score(EncodeParams(shard_size=500), EVALUATE, found, trained["manifest"], trained["root"],
                   tmp_path / "scored", registry["uri"])
    encode(EncodeParams(), trained["onnx"], trained["manifest"], trained["root"], tmp_path / "shards", tmp_path / "enc")
    direct = evaluate(EVALUATE, tmp_path / "enc", trained["manifest"], None, tmp_path / "eval")
    assert result["value"] == direct["mAP"] and result["metrics"]["mAP_at_50"] == direct["mAP_at_50"]
    assert result["dataset_fingerprint"] == direct["dataset_fingerprint"] != DATASET
    written = json.loads((tmp_path / "scored" / "score.json").read_text())
    assert written["version"] == "1" and written["value"] == result["value"]
    extra = tmp_path / "scored" / "champion_model" / "extra_files"
    assert (tmp_path / "scored" / "champion_model" / "model.onnx").is_file() and (extra / "codewords.npy").is_file()
    assert not (tmp_path / "scored" / "shards").exists()  # only the score and the model stay


def test_no_champion_and_own_model(registry, trained, tmp_path):
    none, note = resolve(PromoteParams(model_name="nobody"), registry["uri"])
    assert none == {"model_name": "nobody", "version": None} and note == "no current champion"
    result = score(EncodeParams(), EVALUATE, none, trained["manifest"], trained["root"], tmp_path / "s", registry["uri"])
    assert result["value"] is None and json.loads((tmp_path / "s" / "score.json").read_text())["version"] is None
    # the champion is this run's own model: compared with what it was compared with (nothing), stable
    own, note = resolve(PromoteParams(model_name="champ"), registry["uri"], registry["ref"].model_uri)
    assert own == none | {"model_name": "champ"} and "this run's own model" in note


def test_a_champion_that_cannot_be_scored_is_one_error_and_no_output(registry, trained, tmp_path):
    found, _ = resolve(PromoteParams(model_name="champ"), registry["uri"])
    with pytest.raises(UserError, match="MLflow at .*: downloading champion v1 .* failed"):
        score(EncodeParams(), EVALUATE, replace_uri(found, "models:/champ/7"), trained["manifest"], trained["root"],
              tmp_path / "missing", registry["uri"])
    dead = "http://127.0.0.1:9"
    with pytest.raises(UserError, match=f"MLflow at {dead}: reading @champion failed"):
        resolve(PromoteParams(model_name="champ"), dead)
    wrong_size = tmp_path / "other.parquet"  # images the champion cannot read: another dataset's manifest
    shutil.copy(trained["manifest"], wrong_size)
    with pytest.raises(UserError, match="champion v1 .* cannot be scored on this data"):
        score(EncodeParams(), EVALUATE, found, wrong_size, tmp_path / "no-images-here", tmp_path / "bad", registry["uri"])
    assert not (tmp_path / "missing").exists() and not (tmp_path / "bad").exists()


def replace_uri(found: dict, uri: str) -> dict:
    return {**found, "model_uri": uri}
