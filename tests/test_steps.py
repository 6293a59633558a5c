"""The pipeline steps after validation, run for real on the embedded digits (tiny settings)."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from adalabelhash.codes import pack_codes
from adalabelhash.data.manifest import Manifest
from adalabelhash.errors import UserError
from adalabelhash.model import load_model
from adalabelhash.preprocess import load_images, to_model_input
from components.convert_onnx import ConvertOnnxParams, convert_onnx, parity_report
from components.encode import EncodeParams, encode, encode_shards, merge_shards
from components.evaluate import EvaluateParams, evaluate
from components.export_codewords import ExportCodewordsParams, export_codewords


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "adalabelhash.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_train_outputs_model_history_and_curves(trained):
    out = trained["work"] / "train"
    assert {p.name for p in out.iterdir()} == {"model.pt", "history.csv", "train_summary.json", "curves.png"}
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["monitor"] == "val_mAP" and 0 < summary["best_value"] <= 1
    assert re.fullmatch(r"cpu: .+, \d+ threads, \w+( \+ AMX)? kernels", summary["hardware"]), summary["hardware"]
    assert summary["precision"] == "fp32"  # precision auto on CPU
    # every epoch's time (history.csv) adds up to the total a resumed run reports
    epoch_seconds = [float(row.split(",")[-1]) for row in (out / "history.csv").read_text().splitlines()[1:]]
    assert summary["epoch_seconds_total"] == round(sum(epoch_seconds), 2) > 0
    loaded = load_model(trained["model"])
    assert loaded.class_names == [str(d) for d in range(10)] and loaded.image_size == 16
    assert len((out / "history.csv").read_text().splitlines()) == 4


def test_export_codewords_files_agree(trained, tmp_path):
    out = trained["codewords"]
    bits = np.load(out / "codewords.npy")
    assert bits.shape == (10, 16) and set(np.unique(bits)) <= {0, 1}
    readable = json.loads((out / "codewords.json").read_text())
    assert readable["codewords"]["3"] == "".join(map(str, bits[3]))
    rows = [line.split(",") for line in (out / "distances.csv").read_text().splitlines()]
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert np.array_equal(matrix, (bits[:, None, :] != bits[None, :, :]).sum(-1))
    summary = json.loads((out / "codeword_summary.json").read_text())
    first = summary["nearest_pairs"][0]
    assert first["distance"] == matrix[~np.eye(10, dtype=bool)].min() == summary["min_distance"]
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    groups = {"round": ["0", "6", "8", "9"], "straight": ["1", "4", "7"]}
    grouped = export_codewords(ExportCodewordsParams(groups=groups), trained["model"], tmp_path / "g")
    assert set(grouped["groups"]) == {"within_round", "within_straight", "across_groups"}
    with pytest.raises(UserError, match="unknown classes: ten"):
        export_codewords(ExportCodewordsParams(groups={"x": ["ten"]}), trained["model"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_onnx_is_one_file_with_symbolic_batch_and_bit_parity(trained):
    out = trained["onnx"].parent
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "parity.json"]  # no external .data file
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["bit_agreement"] >= 0.999 and report["confident_agreement"] == 1.0
    assert report["batch_dim"] and report["batch_of_one_matches"]
    assert report["provider"] == "CPUExecutionProvider"  # device auto, this onnxruntime has no CUDA provider

    import onnxruntime as ort

    session = ort.InferenceSession(str(trained["onnx"]), providers=["CPUExecutionProvider"])
    manifest = Manifest.load(trained["manifest"])
    paths = [trained["root"] / p for p in manifest.frame["path"][:7]]
    batch = to_model_input(load_images(paths, 16))
    with torch.no_grad():
        reference = load_model(trained["model"]).model(torch.from_numpy(batch)).numpy()
    for size in (1, 7):  # any batch size
        codes = session.run(None, {"images": batch[:size]})[0]
        assert np.array_equal(codes >= 0, reference[:size] >= 0)


def test_flip_average_onnx_encodes_an_image_and_its_mirror_alike(trained, tmp_path):
    import onnxruntime as ort

    report = convert_onnx(ConvertOnnxParams(parity_images=16, flip_average=True), trained["model"], trained["manifest"],
                          trained["root"], tmp_path / "onnx")
    assert report["passed"] and report["flip_average"]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    paths = [trained["root"] / p for p in Manifest.load(trained["manifest"]).frame["path"][:5]]
    batch = to_model_input(load_images(paths, 16))
    with torch.no_grad():
        model = load_model(trained["model"]).model
        expected = ((model(torch.from_numpy(batch)) + model(torch.from_numpy(batch).flip(3))) / 2).numpy()
    codes = session.run(None, {"images": batch})[0]
    mirrored = session.run(None, {"images": np.ascontiguousarray(batch[..., ::-1])})[0]
    np.testing.assert_allclose(codes, expected, atol=1e-5)
    np.testing.assert_allclose(mirrored, codes, atol=1e-5)  # a mirrored image gets the same code
    assert session.run(None, {"images": batch[:1]})[0].shape == (1, 16)


def test_parity_report_flags_disagreeing_bits():
    reference = np.array([[0.5, -0.5, 0.0005, -0.3]])
    assert parity_report(reference, reference + 1e-7, 1e-3)["bit_agreement"] == 1.0
    flipped = parity_report(reference, np.array([[0.5, 0.5, -0.0005, -0.3]]), 1e-3)
    assert flipped["bit_agreement"] == 0.5 and flipped["confident_agreement"] == pytest.approx(2 / 3)


def test_encode_in_shards_resumes_and_matches_pytorch(trained, tmp_path):
    params = EncodeParams(batch_size=50, shard_size=400, decode_threads=2)
    shards = tmp_path / "shards"
    partial = encode_shards(params, trained["onnx"], trained["manifest"], trained["root"], shards, only=[0, 2])
    assert {k: partial[k] for k in ("shards", "encoded", "skipped", "images")} == {"shards": 5, "encoded": 2, "skipped": 0, "images": 1797}
    with pytest.raises(UserError, match="shard 2/5 is missing"):
        merge_shards(params, trained["onnx"], trained["manifest"], [shards], tmp_path / "merged")
    summary = encode(params, trained["onnx"], trained["manifest"], trained["root"], shards, tmp_path / "encoded")
    assert (summary["encoded_shards"], summary["resumed_shards"]) == (3, 2)
    assert summary["queries"] == 100 and summary["database"] == 1697 and summary["bits"] == 16
    assert summary["providers"] == ["CPUExecutionProvider"]  # read back from the sessions, kept in each shard

    data = np.load(tmp_path / "encoded" / "codes.npz")
    manifest = Manifest.load(trained["manifest"])
    assert np.array_equal(data["ids"], np.arange(1797)) and data["codes"].shape == (1797, 2)
    sample = data["ids"][::97]
    images = to_model_input(load_images([trained["root"] / p for p in manifest.frame["path"].iloc[sample]], 16))
    with torch.no_grad():
        expected = pack_codes(load_model(trained["model"]).model(torch.from_numpy(images)))
    assert np.array_equal(data["codes"][::97], expected)

    import faiss

    index = faiss.read_index_binary(str(tmp_path / "encoded" / "database.faiss"))
    assert index.ntotal == 1697 and index.d == 16
    (shards / "shard-00001-of-00005.npz").write_bytes(b"damaged")  # re-encoded, not trusted
    again = encode_shards(params, trained["onnx"], trained["manifest"], trained["root"], shards)
    assert (again["encoded"], again["skipped"]) == (1, 4)


def test_evaluate_writes_sane_metrics_curves_and_examples(trained, encoded, tmp_path):
    params = EvaluateParams(topk=[100], precision_at=[10, 100], examples=3, example_k=5)
    metrics = evaluate(params, encoded, trained["manifest"], trained["root"], tmp_path / "ev",
                       trained["codewords"] / "codewords.npy")
    for key in ("mAP", "mAP_at_100", "P_at_10", "P_at_100", "P_radius_2", "mAP_stable", "query_codeword_accuracy"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["mAP"] > 0.3, "3 epochs on digits retrieve far better than chance (0.1)"
    assert 0 <= metrics["within_class_distance"] < metrics["across_class_distance"] <= 16
    assert 0 <= metrics["query_codeword_distance"] <= 16
    assert (metrics["queries"], metrics["database"], metrics["bits"]) == (100, 1697, 16)
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics
    pr = (tmp_path / "ev" / "pr_radius.csv").read_text().splitlines()
    assert pr[0] == "radius,precision,recall" and len(pr) == 18
    from PIL import Image

    grid = Image.open(tmp_path / "ev" / "examples.png")
    assert grid.size[1] > grid.size[0] / 6 * 3 - 20  # 3 rows of 1 query + 5 results
    with pytest.raises(UserError, match="do not fit 10 classes x 16 bits"):
        np.save(tmp_path / "cw.npy", np.zeros((10, 8), np.uint8))
        evaluate(params, encoded, trained["manifest"], None, tmp_path / "ev2", tmp_path / "cw.npy")
    assert not (tmp_path / "ev2").exists()


def test_search_cli_returns_nearest_database_images(trained, encoded):
    manifest = Manifest.load(trained["manifest"])
    db_row = int(np.flatnonzero(manifest.frame["database"])[5])
    image = trained["root"] / manifest.frame["path"].iloc[db_row]
    proc = cli("search", image, "-k", "4", "--json", "--onnx", trained["onnx"], "--encoded", encoded,
               "--manifest", trained["manifest"])
    assert proc.returncode == 0, proc.stderr
    (answer,) = json.loads(proc.stdout)
    distances = [hit["distance"] for hit in answer["results"]]
    assert len(distances) == 4 and distances == sorted(distances) and distances[0] == 0
    data = np.load(encoded / "codes.npz")
    code_of = dict(zip(data["ids"].tolist(), map(bytes, data["codes"])))
    for hit in answer["results"]:  # the distances are true Hamming distances to the query's own code
        assert hit["distance"] == np.unpackbits(np.frombuffer(bytes(a ^ b for a, b in zip(code_of[hit["id"]], code_of[db_row])), np.uint8)).sum()
        assert hit["labels"] == [str(np.flatnonzero(manifest.label_matrix()[hit["id"]])[0])]


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "missing index"])
def test_search_bad_input_is_one_error_line(trained, encoded, tmp_path, case):
    image, index_dir = tmp_path / "q.png", encoded
    if case == "corrupt image":
        image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "missing index":
        image = trained["root"] / Manifest.load(trained["manifest"]).frame["path"].iloc[0]
        index_dir = tmp_path
    proc = cli("search", image, "--onnx", trained["onnx"], "--encoded", index_dir, "--manifest", trained["manifest"])
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert {"missing image": "q.png", "corrupt image": "q.png", "missing index": "database.faiss"}[case] in lines[0]


def test_step_cli_with_a_missing_input_leaves_no_output(trained, tmp_path):
    (tmp_path / "params.yaml").write_text("export_codewords: {}\ntrain: {epochs: 0}\n")
    proc = cli("export-codewords", "--model", tmp_path / "nowhere", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2 and "nowhere/mlflow_run.json: no MLflow run reference" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    proc = cli("train", "--manifest", trained["manifest"], "--data-root", trained["root"], "--validation",
               tmp_path, "--out", tmp_path / "t", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: params train: epochs must be > 0, got 0"]
    assert not (tmp_path / "t").exists()


def test_train_refuses_a_gate_that_passed_on_another_dataset_version(trained, tmp_path):
    from components.prepare import PrepareParams, prepare

    other = prepare(PrepareParams(source="digits", root=str(trained["root"]), query_per_class=10, val_per_class=5,
                                  seed=1), tmp_path / "prepare")
    (tmp_path / "params.yaml").write_text("train: {epochs: 1}\nmlflow: {enabled: false}\n")
    proc = cli("train", "--manifest", other["manifest"], "--data-root", trained["root"], "--validation",
               trained["work"] / "validate", "--out", tmp_path / "t", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"the gate passed on dataset {Manifest.load(trained['manifest']).fingerprint()[:16]}, not on " \
           f"{other['fingerprint'][:16]}" in proc.stderr
    assert not (tmp_path / "t").exists()


def test_encode_keeps_query_real_codes_and_evaluate_reports_the_rerank_beside_hamming(trained, encoded, tmp_path):
    from components.encode import load_encoded, load_query_real

    ids, codes = load_encoded(encoded)
    real = load_query_real(encoded)
    is_query = Manifest.load(trained["manifest"]).frame["query"].to_numpy()[ids]
    assert real.dtype == np.float32 and real.shape == (is_query.sum(), 16)
    assert np.array_equal(pack_codes(real), codes[is_query])  # the same encoder pass as the bits
    params = EvaluateParams(topk=[100], precision_at=[10], examples=0)
    plain = evaluate(params, encoded, trained["manifest"], None, tmp_path / "plain")
    reranked = evaluate(replace(params, rerank=200), encoded, trained["manifest"], None, tmp_path / "rerank")
    assert {k: v for k, v in reranked.items() if not k.endswith("_rerank")} == plain  # headline unchanged
    assert 0.3 < reranked["mAP_rerank"] <= 1 and 0.3 < reranked["mAP_at_100_rerank"] <= 1
    np.savez(tmp_path / "codes.npz", ids=ids, codes=codes)  # an encode output from before query codes were kept
    with pytest.raises(UserError, match="no real-valued query codes: run the encode step again"):
        evaluate(replace(params, rerank=10), tmp_path, trained["manifest"], None, tmp_path / "old")
