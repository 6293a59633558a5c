"""Data roots in an object store (`s3://...`), read through fsspec from a real S3-protocol server
(moto's, on loopback): the same manifest, gate and codes as from the local copy of the images."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from adalabelhash.data.paths import DataRoot, is_url
from adalabelhash.errors import UserError
from tests.conftest import REPO, free_port

BUCKET = "adalabelhash-data"
PER_CLASS = 30  # images per digit uploaded: 300 objects keep every pass over the bucket short
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# --- without a store: URLs are not paths ------------------------------------------------------

def _data_root_actions(parser: argparse.ArgumentParser):
    """(parser, action) for every --data-root option of `parser` and of its subcommands."""
    for action in parser._actions:
        if "--data-root" in action.option_strings:
            yield parser, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _data_root_actions(sub)


def test_a_url_data_root_survives_every_cli_parser():
    from adalabelhash.cli import COMMANDS

    url = "s3://bucket/some/images"
    seen = []
    for command, (module_name, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=command)
        importlib.import_module(module_name).add_arguments(parser)
        for owner, action in _data_root_actions(parser):
            assert owner._get_value(action, url) == url, f"{command} {owner.prog}: --data-root mangles {url}"
            seen.append(owner.prog)
    # every step that reads images takes one (kfp: run-local, submit, schedule)
    assert {"validate", "train", "convert-onnx", "encode", "evaluate", "score-champion", "monitor"} <= set(seen)
    assert sum(prog.startswith("kfp ") for prog in seen) == 3


def test_kfp_passes_a_url_data_root_through():
    from pipelines.cli import pipeline_arguments
    from pipelines.pipeline import PARAMS

    params = yaml.safe_load(PARAMS.read_text())

    def data_root(remote: bool, root: str | None, *overrides: str) -> str:
        args = argparse.Namespace(overrides=["prepare.source=imagefolder", "mlflow.tracking_uri=http://mlflow:5000",
                                             *overrides], data_root=root, data_version="v1", force_retrain=False)
        return pipeline_arguments(args, params, remote=remote)["data_root"]

    assert data_root(True, "s3://bucket/raw") == data_root(False, "s3://bucket/raw") == "s3://bucket/raw"
    # a URL prepare.root is what a local run reads when no --data-root is given
    assert data_root(False, None, "prepare.root=s3://bucket/raw/") == "s3://bucket/raw/"
    assert data_root(False, None) == str(REPO / "data" / "digits")  # local roots as before


def test_pods_get_the_object_store_credentials_from_the_mlflow_secret():
    from pipelines.pipeline import MLFLOW_SECRET_KEYS, PARAMS

    keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
            "FSSPEC_S3_ENDPOINT_URL"}
    assert keys <= set(MLFLOW_SECRET_KEYS)
    assert yaml.safe_load(PARAMS.read_text())["kfp"]["mlflow_secret_keys"] == list(MLFLOW_SECRET_KEYS)


def test_a_url_root_refuses_paths_that_leave_it():
    root = DataRoot("s3://bucket/data/")
    assert root.resolve("cat/1.png") == "s3://bucket/data/cat/1.png"
    for path, why in [("../other/1.png", "'..'"), ("/etc/passwd", "absolute"), ("cat/../../x.png", "'..'"),
                      ("cat//1.png", "not normalised")]:
        with pytest.raises(UserError, match=why):
            root.resolve(path)
    assert is_url("gs://b/x") and is_url("s3://b") and not is_url("data/digits") and not is_url("/mnt/s3:/x")


def test_list_files_must_lie_under_a_url_root():
    from components.prepare import PrepareParams, _require_under_root

    def params(train):
        return PrepareParams(source="listfile", root="s3://b/nus", list_files={
            "train": train, "query": "s3://b/nus/query.txt", "database": "s3://b/nus/database.txt"})

    _require_under_root(params("s3://b/nus/lists/train.txt"))
    for outside in ("s3://b/nus/../other/train.txt", "s3://b/nuswide/train.txt", "s3://c/nus/train.txt",
                    "lists/train.txt"):
        with pytest.raises(UserError, match="must be under prepare.root"):
            _require_under_root(params(outside))


# --- a real S3-protocol server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(tmp_path_factory, digits_root):
    """moto's S3 server on 127.0.0.1 holding `PER_CLASS` digits per class under s3://BUCKET/digits,
    with the same files in a local tree; this process and its children reach it through the
    environment (FSSPEC_S3_ENDPOINT_URL, as a pod would)."""
    import fsspec.config
    import requests
    from s3fs import S3FileSystem

    local = tmp_path_factory.mktemp("s3-local") / "digits"
    for folder in sorted(p for p in digits_root.iterdir() if p.is_dir()):
        (local / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:PER_CLASS]:
            shutil.copyfile(image, local / folder.name / image.name)

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(endpoint, timeout=2)
            break
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.3)
    saved = {key: os.environ.get(key) for key in [*S3_ENV, "FSSPEC_S3_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, FSSPEC_S3_ENDPOINT_URL=endpoint)
    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read the environment when it was imported
    S3FileSystem.clear_instance_cache()
    fs = S3FileSystem()
    fs.mkdir(BUCKET)
    files = sorted(p for p in local.rglob("*.png"))
    fs.put([str(p) for p in files], [f"{BUCKET}/digits/{p.relative_to(local).as_posix()}" for p in files])
    try:
        yield {"fs": fs, "local": local, "url": f"s3://{BUCKET}/digits", "endpoint": endpoint}
    finally:
        S3FileSystem.clear_instance_cache()
        fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=30)


def _prepare_params(root: str):
    from components.prepare import PrepareParams

    return PrepareParams(source="imagefolder", root=root, query_per_class=10, val_per_class=5)


@pytest.mark.slow
def test_the_pipeline_reads_a_bucket_as_it_reads_a_directory(s3, tmp_path):
    """prepare (the Kubeflow component) -> validate -> train -> convert-onnx -> encode -> evaluate, all on
    s3://; the manifest and the codes equal those of the local copy."""
    from kfp.dsl import Artifact, Dataset

    from adalabelhash.data.manifest import MANIFEST_NAME, Manifest
    from adalabelhash.train import TrainConfig
    from components import kfp_components
    from components.convert_onnx import ConvertOnnxParams, convert_onnx
    from components.encode import EncodeParams, encode
    from components.evaluate import EvaluateParams, evaluate
    from components.prepare import prepare
    from components.train import train
    from pipelines.config import image_root, to_parameter

    local, url = str(s3["local"]), s3["url"]
    prepare(_prepare_params(local), tmp_path / "local")
    dataset = Dataset(name="dataset", uri=str(tmp_path / "dataset"))
    kfp_components.prepare_dataset.python_func(prepare=to_parameter("prepare", {"source": "imagefolder",
                                               "query_per_class": 10, "val_per_class": 5}),
                                               data_root=url, data_version="v1", dataset=dataset)
    assert image_root(dataset.metadata) == url  # what every later Kubeflow step reads
    manifest_path = Path(dataset.path) / MANIFEST_NAME
    from_bucket, from_disk = Manifest.load(manifest_path), Manifest.load(tmp_path / "local" / MANIFEST_NAME)
    assert from_bucket.frame.equals(from_disk.frame) and len(from_bucket) == 10 * PER_CLASS
    assert from_bucket.fingerprint() == from_disk.fingerprint()

    report, docs = Artifact(name="report", uri=str(tmp_path / "report")), Artifact(name="docs", uri=str(tmp_path / "d.html"))
    assert kfp_components.validate_dataset.python_func(validate={}, dataset=dataset, report=report, data_docs=docs)

    config = TrainConfig(backbone="small_cnn", bits=16, image_size=16, lr=3e-3, epochs=1, batch_size=64, patience=0,
                         val_database_size=100, threads=2)
    train(config, manifest_path, url, tmp_path / "train")
    convert_onnx(ConvertOnnxParams(parity_images=16), tmp_path / "train" / "model.pt", manifest_path, url,
                 tmp_path / "onnx")
    codes = {}
    for name, root in [("bucket", url), ("disk", local)]:
        encode(EncodeParams(), tmp_path / "onnx" / "model.onnx", manifest_path, root, tmp_path / name / "shards",
               tmp_path / name / "encode")
        codes[name] = np.load(tmp_path / name / "encode" / "codes.npz")
    assert np.array_equal(codes["bucket"]["ids"], codes["disk"]["ids"]) and len(codes["bucket"]["ids"]) == len(from_disk)
    assert np.array_equal(codes["bucket"]["codes"], codes["disk"]["codes"])
    metrics = evaluate(EvaluateParams(topk=[50], precision_at=[10], examples=2, example_k=3), tmp_path / "bucket" / "encode",
                       manifest_path, url, tmp_path / "evaluate")
    assert 0.0 < metrics["mAP"] <= 1.0 and (tmp_path / "evaluate" / "examples.png").is_file()


@pytest.mark.slow
def test_the_gate_names_missing_and_corrupt_objects_by_url(s3, tmp_path):
    from components.prepare import prepare
    from components.validate import GateFailed, ValidateParams, validate

    fs, broken = s3["fs"], f"s3://{BUCKET}/broken"
    fs.copy(f"{BUCKET}/digits", f"{BUCKET}/broken", recursive=True)
    summary = prepare(_prepare_params(broken), tmp_path / "prepare")
    gone, corrupt = f"{broken}/3/{sorted(os.listdir(s3['local'] / '3'))[0]}", f"{broken}/7/{sorted(os.listdir(s3['local'] / '7'))[1]}"
    fs.rm(gone)
    fs.pipe(corrupt, b"\x89PNG\r\n\x1a\n not a png any more")
    with pytest.raises(GateFailed) as failed:
        validate(ValidateParams(), summary["manifest"], tmp_path / "validate")
    assert f"{gone}: file not found" in failed.value.details
    assert f"{corrupt}: " in failed.value.details and "sha256" in failed.value.details


@contextlib.contextmanager
def _s3_endpoint(url: str, restore: str):
    """This process's S3 endpoint set to `url` for a while (fsspec's config, fresh filesystems)."""
    import fsspec.config
    from s3fs import S3FileSystem

    fsspec.config.conf["s3"]["endpoint_url"] = url
    S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        fsspec.config.conf["s3"]["endpoint_url"] = restore
        S3FileSystem.clear_instance_cache()


@pytest.fixture()
def requests_in_flight(s3):
    """A plain TCP relay in front of the store, made this process's S3 endpoint for the test, that
    records the most requests awaiting their response at once: reads one after another make it 1."""
    upstream = int(s3["endpoint"].rsplit(":", 1)[1])
    listener = socket.create_server(("127.0.0.1", 0))
    seen = {"waiting": 0, "peak": 0}
    lock = threading.Lock()

    def serve(client):
        server = socket.create_connection(("127.0.0.1", upstream))
        waiting = [False]  # this connection's request has been sent on, its response not yet come back

        def forward(source, target, is_request):
            try:
                while data := source.recv(1 << 16):
                    with lock:
                        if waiting[0] != is_request:
                            waiting[0] = is_request
                            seen["waiting"] += 1 if is_request else -1
                            seen["peak"] = max(seen["peak"], seen["waiting"])
                    target.sendall(data)
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        back = threading.Thread(target=forward, args=(server, client, False), daemon=True)
        back.start()
        forward(client, server, True)
        back.join(timeout=30)
        client.close()
        server.close()

    def accept():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with _s3_endpoint(f"http://127.0.0.1:{listener.getsockname()[1]}", s3["endpoint"]):
            yield seen
    finally:
        listener.close()


def test_read_many_fetches_objects_together_with_their_own_errors(s3, requests_in_flight):
    """Every object of the bucket, a missing one and a local file among them: the same bytes as one
    read at a time, each failure in its own place, and the objects' GETs in flight together."""
    from adalabelhash.data.paths import FETCH_WINDOW, read_bytes, read_many

    local = sorted(s3["local"].rglob("*.png"))
    urls = [f"{s3['url']}/{p.relative_to(s3['local']).as_posix()}" for p in local]
    assert len(urls) > FETCH_WINDOW  # more than one window
    missing, refused = f"{s3['url']}/3/missing.png", UserError("a path refused by the caller")
    paths = [*urls[:5], missing, str(local[1]), refused, *urls[5:], missing]
    results = list(read_many(paths))
    assert requests_in_flight["peak"] > 1, "the objects were fetched one after another"
    assert len(results) == len(paths)
    assert results[0] == local[0].read_bytes() and results[6] == local[1].read_bytes() and results[7] is refused
    assert isinstance(results[5], FileNotFoundError) and isinstance(results[-1], FileNotFoundError)
    assert [read_bytes(path) for path in urls] == results[:5] + results[8:-1]


def test_prepare_and_the_gate_keep_per_object_errors(s3, requests_in_flight):
    """hash_files and facts_for with a missing object and a refused path among the bucket's: the
    hashes and facts of the local copy, each failure named as one read at a time names it."""
    import hashlib

    from adalabelhash.data.images import facts_for
    from adalabelhash.data.paths import read_bytes
    from components.prepare import hash_files

    paths = sorted(p.relative_to(s3["local"]).as_posix() for p in s3["local"].rglob("*.png"))
    rows = [*paths[:40], "3/missing.png", "../outside.png", *paths[40:]]
    hashed, facts = hash_files(s3["url"], rows), facts_for(s3["url"], rows)
    assert requests_in_flight["peak"] > 1
    missing = f"{s3['url']}/3/missing.png"
    with pytest.raises(FileNotFoundError) as gone:
        read_bytes(missing)
    assert hashed[40] == (None, f"{missing}: cannot read ({gone.value.strerror or gone.value})")
    assert facts[40]["error"] == f"{missing}: file not found" and not facts[40]["found"]
    assert hashed[41][0] is None and facts[41]["error"] == hashed[41][1] and "'..'" in hashed[41][1]
    present = [i for i in range(len(rows)) if i not in (40, 41)]
    assert [digest for digest, _ in hashed[:40] + hashed[42:]] == \
        [hashlib.sha256((s3["local"] / rows[i]).read_bytes()).hexdigest() for i in present]
    assert facts_for(str(s3["local"]), paths) == facts[:40] + facts[42:]


@pytest.mark.slow
def test_a_store_lost_during_a_file_pass_is_one_error(s3):
    """The GETs of prepare's hashing and of the gate fail to connect: one UserError naming an object,
    not one error per file and not the driver's exception (botocore retries for a few seconds)."""
    from adalabelhash.data.images import facts_for
    from components.prepare import hash_files

    rows = ["0/a.png", "1/b.png", "../outside.png"]
    with _s3_endpoint(f"http://127.0.0.1:{free_port()}", s3["endpoint"]):
        for file_pass in (hash_files, facts_for):
            with pytest.raises(UserError, match=f"^{s3['url']}/0/a.png: cannot read from the object store "
                                                r"\(EndpointConnectionError: "):
                file_pass(s3["url"], rows)


def test_list_files_are_read_from_the_bucket(s3, tmp_path):
    """source: listfile with the lists and class names next to the images in the bucket."""
    from components.prepare import PrepareParams, prepare

    fs, url = s3["fs"], f"s3://{BUCKET}/listed"  # its own copy: a lists/ folder is no class of the others
    fs.copy(f"{BUCKET}/digits", f"{BUCKET}/listed", recursive=True)
    classes = sorted(p.name for p in s3["local"].iterdir())
    lines = {split: [] for split in ("train", "query", "database")}
    for k, name in enumerate(classes):
        for i, image in enumerate(sorted((s3["local"] / name).iterdir())):
            line = f"{name}/{image.name} " + " ".join("1" if j == k else "0" for j in range(len(classes)))
            lines["query" if i < 3 else "train"].append(line)
            if i >= 3:
                lines["database"].append(line)
    for split, text in lines.items():
        fs.pipe(f"{url[5:]}/lists/{split}.txt", ("\n".join(text) + "\n").encode())
    fs.pipe(f"{url[5:]}/lists/classes.txt", ("\n".join(f"digit {c}" for c in classes) + "\n").encode())

    def params(**lists):
        return PrepareParams(source="listfile", root=url, class_names=f"{url}/lists/classes.txt", val_size=20,
                             list_files={split: f"{url}/lists/{split}.txt" for split in ("train", "query", "database")}
                             | lists)

    summary = prepare(params(), tmp_path / "prepare")
    assert summary["images"] == 10 * PER_CLASS and summary["sizes"]["query"] == 30 and summary["classes"] == 10
    with pytest.raises(UserError, match=f"^{url}/lists/nothing.txt: list file not found$"):
        prepare(params(train=f"{url}/lists/nothing.txt"), tmp_path / "missing")


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "adalabelhash.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _params_with_root(tmp_path: Path, root: str) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] = {"source": "imagefolder", "root": root}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def test_a_bucket_that_does_not_exist_is_one_error_line(s3, tmp_path):
    root = "s3://no-such-bucket/digits"
    _params_with_root(tmp_path, root)
    proc = _cli("prepare", "--params", "params.yaml", "--out", "prepared", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {root}: image folder not found (The specified bucket does not exist)\n"
    assert not (tmp_path / "prepared").exists()
    from components.prepare import prepare

    manifest = prepare(_prepare_params(s3["url"]), tmp_path / "ok")["manifest"]
    proc = _cli("validate", "--params", "params.yaml", "--manifest", manifest, "--data-root", root, "--out", "v",
                cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {root}: data root not found (The specified bucket does not exist)\n"


@pytest.mark.slow
def test_an_unreachable_store_is_one_error_line(tmp_path):
    """Nothing listens on the endpoint (botocore retries for ~8 s, then one line, no traceback)."""
    root = f"s3://{BUCKET}/digits"
    _params_with_root(tmp_path, root)
    proc = _cli("prepare", "--params", "params.yaml", "--out", "prepared", cwd=tmp_path, **S3_ENV,
                FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {root}: cannot read from the object store (EndpointConnectionError: ")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "prepared").exists()
