"""`adalabelhash serve`, for real: a real `mlflow server` (registry, artifacts, webhooks), the
service as its own process under uvicorn on a loopback port, the digits run's ONNX model.

Registered versions (one logged ONNX model, four runs):
  v1  the full database, logged by `evaluate_tracked` itself (the pipeline's path)
  v2  the same encoder with the even-id half of the database: answers tell the versions apart
  v3  broken: its run has no database artifact
  v4  broken: its database holds 8-bit codes, the encoder gives 16
"""

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests

from adalabelhash import tracking
from adalabelhash.database import ARTIFACT_PATH, database_from_encoded, load_database, write_database
from adalabelhash.errors import UserError
from adalabelhash.metrics import hamming_distances
from adalabelhash.serving.app import ApiError, verify_signature
from adalabelhash.serving.index import CodeIndex, IndexParams
from tests.conftest import free_port

NAME, TOKEN, SECRET = "served", "s3cret-token", "webhook-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------------------- no server needed


def expected_answer(database, position_or_code, k):
    """Ids and distances of the k nearest, in the documented order (distance, then id), by numpy."""
    code = database.codes[position_or_code] if np.ndim(position_or_code) == 0 else position_or_code
    d = hamming_distances(np.asarray(code)[None], database.codes)[0]
    order = np.lexsort((database.ids, d))[:k]
    return database.ids[order].tolist(), d[order].tolist()


def test_index_ties_come_in_database_order_and_a_batch_answers_each_query_as_alone():
    from adalabelhash.serving.index import Query

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (3000, 1), dtype=np.uint8)  # 8 bits: ~12 codes per value, ties everywhere
    index = CodeIndex(codes)
    for row, (d, p) in enumerate(index.search(codes[:20], 50)):
        exact = hamming_distances(codes[row : row + 1], codes)[0]
        order = np.lexsort((np.arange(len(codes)), exact))[:50]
        assert p.tolist() == order.tolist() and d.tolist() == exact[order].tolist()
    ks = [1, 7, 50, 3, 200]  # one faiss call for the widest k: each answer is still its own first k
    batch = index.answer([Query(codes[row], k) for row, k in enumerate(ks)])
    for row, (k, (d, p, asym)) in enumerate(zip(ks, batch)):
        alone_d, alone_p = index.search(codes[row : row + 1], k)[0]
        assert asym is None and p.tolist() == alone_p.tolist() and d.tolist() == alone_d.tolist() and len(p) == k


def test_batcher_answers_what_queued_in_one_call_per_version_and_fails_only_its_own_version():
    from adalabelhash.serving.batcher import Batcher

    class Version:  # what the batcher uses of a ServedModel: encode + index
        def __init__(self, codes, broken=False):
            self.index, self.broken, self.encoded = CodeIndex(codes), broken, []

        def encode(self, pixels):
            if self.broken:
                raise RuntimeError("encoder failed")
            self.encoded.append(len(pixels))
            return np.where(pixels.reshape(len(pixels), -1)[:, :16] > 127, 0.9, -0.9).astype(np.float32)

    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, (500, 2), dtype=np.uint8)
    old, new, broken = Version(codes), Version(codes[::-1].copy()), Version(codes, broken=True)
    sizes = []
    batcher = Batcher(max_batch=64, on_batch=sizes.append)  # not started: run_once answers what queued
    pixels = rng.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8)

    async def requests():
        searches = [batcher.search(old, 2, code=codes[1]), batcher.search(old, 5, code=codes[0]),
                    batcher.search(new, 9, code=codes[0]), *[batcher.search(old, 3, pixels=p, rerank=20) for p in pixels],
                    batcher.search(broken, 5, pixels=pixels[0]), batcher.search(new, 4, pixels=pixels[1])]
        tasks = [asyncio.ensure_future(search) for search in searches]
        await asyncio.sleep(0)  # every request has queued its job
        tasks[0].cancel()  # a client that went away: the others are still answered
        await asyncio.sleep(0)
        answered = batcher.run_once(block=False)
        return answered, await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    answered, (gone, *results) = asyncio.run(requests())
    assert isinstance(gone, asyncio.CancelledError) and answered == 1 + len(results) and sizes == [answered]
    assert old.encoded == [4] and new.encoded == [1]  # the images of a version: one ORT call
    for (d, p, _), version, k in ((results[0], old, 5), (results[1], new, 9)):
        assert p.tolist() == version.index.search(codes[:1], k)[0][1].tolist()
    real = np.where(pixels.reshape(4, -1)[:, :16] > 127, 0.9, -0.9).astype(np.float32)
    from adalabelhash.codes import pack_codes
    from adalabelhash.serving.index import Query

    for (d, p, asym), r in zip(results[2:6], real):
        (_, alone_p, alone_asym), = old.index.answer([Query(pack_codes(r[None])[0], 3, r, 20)])
        assert p.tolist() == alone_p.tolist() and np.allclose(asym, alone_asym)
    assert isinstance(results[6], RuntimeError) and "encoder failed" in str(results[6])
    assert len(results[7][1]) == 4
    assert batcher.run_once(block=False) == 0


def test_a_busy_worker_leaves_idle_workers_a_share_so_they_scan_side_by_side():
    from adalabelhash.serving.batcher import Batcher, batch_share

    assert [batch_share(8, 1, 32), batch_share(8, 0, 32), batch_share(100, 0, 32), batch_share(1, 3, 32),
            batch_share(9, 1, 4)] == [4, 8, 32, 1, 4]
    scans = []

    class SlowIndex:  # a scan that takes a while and releases the GIL, as faiss does
        def answer(self, queries):
            started = time.perf_counter()
            time.sleep(0.3)
            scans.append((threading.current_thread().name, len(queries), started, time.perf_counter()))
            return [(np.zeros(0, np.int64), np.zeros(0, np.int64), None)] * len(queries)

    class Version:
        index = SlowIndex()

    batcher = Batcher(max_batch=32, workers=2)
    batcher.start()
    deadline = time.monotonic() + 10
    while batcher._idle < 2 and time.monotonic() < deadline:  # both workers waiting for a job
        time.sleep(0.01)

    version = Version()

    async def eight_at_once():
        return await asyncio.gather(*(batcher.search(version, 1, code=np.zeros(1, np.uint8)) for _ in range(8)))

    try:
        assert len(asyncio.run(eight_at_once())) == 8
    finally:
        batcher.stop()
    assert sorted(size for _, size, _, _ in scans) == [4, 4], scans  # all eight queued before a worker woke
    (_, _, start_a, end_a), (_, _, start_b, end_b) = scans
    assert len({name for name, *_ in scans}) == 2 and max(start_a, start_b) < min(end_a, end_b), scans


def test_ivf_above_flat_max_and_rerank_orders_by_asymmetric_distance():
    from adalabelhash.codes import asymmetric_distances, pack_codes
    from adalabelhash.serving.index import Query

    rng = np.random.default_rng(1)
    centres = rng.integers(0, 2, (20, 32))
    bits = (centres[rng.integers(0, 20, 8000)] ^ (rng.random((8000, 32)) < 0.05)).astype(np.uint8)
    codes = np.packbits(bits, axis=1)
    ivf = CodeIndex(codes, IndexParams(flat_max=1000, nlist=64, nprobe=64))
    assert ivf.kind == "ivf64-nprobe64"
    d, p = ivf.search(codes[:1], 10)[0]
    assert d[0] == 0 and (np.diff(d) >= 0).all()  # all 64 lists probed: exact distances
    real = np.tanh(rng.normal(size=(3, 32))).astype(np.float32)
    flat = CodeIndex(codes)
    reranked = flat.answer([Query(pack_codes(q[None])[0], 5, q, 200) for q in real])
    for q, (d, p, asym) in zip(real, reranked):
        candidates = flat.search(pack_codes(q[None]), 200)[0][1]
        full = asymmetric_distances(q[None], codes[candidates])[0]
        assert np.allclose(asym, np.sort(full)[:5]) and set(p) <= set(candidates)
    signs = np.where(bits[:4] > 0, 1.0, -1.0)  # a +-1 query: asymmetric distance is the Hamming distance
    assert np.allclose(asymmetric_distances(signs, codes[:50]), hamming_distances(codes[:4], codes[:50]))


def test_webhook_signature_is_mlflows_scheme():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps({"entity": "model_version_alias", "action": "created"})
    stamp = str(int(time.time()))
    good = {"x-mlflow-delivery-id": "d1", "x-mlflow-timestamp": stamp,
            "x-mlflow-signature": _generate_hmac_signature(SECRET, "d1", stamp, body)}
    verify_signature(SECRET, good, body.encode())
    for bad in ({**good, "x-mlflow-signature": _generate_hmac_signature("other", "d1", stamp, body)},
                {**good, "x-mlflow-timestamp": str(int(time.time()) - 3600),
                 "x-mlflow-signature": _generate_hmac_signature(SECRET, "d1", str(int(time.time()) - 3600), body)},
                {k: v for k, v in good.items() if k != "x-mlflow-signature"}):
        with pytest.raises(ApiError) as caught:
            verify_signature(SECRET, bad, body.encode())
        assert caught.value.status == 401
    with pytest.raises(ApiError):
        verify_signature(SECRET, good, body.encode() + b" ")  # tampered body


def test_database_round_trip_and_inconsistent_files_refused(trained, encoded, tmp_path):
    database = database_from_encoded(encoded, trained["manifest"])
    write_database(database, tmp_path / "db")
    back = load_database(tmp_path / "db")
    assert np.array_equal(back.ids, database.ids) and np.array_equal(back.codes, database.codes)
    assert back.paths == database.paths and back.labels == database.labels and back.bits == 16
    assert len(back) == 1697 and set(back.labels) == {str(c) for c in range(10)}
    np.savez(tmp_path / "db" / "codes.npz", ids=database.ids[:-1], codes=database.codes[:-1])
    with pytest.raises(UserError, match="do not match"):
        load_database(tmp_path / "db")


def test_cluster_manifest_probes_health_and_reads_the_pipelines_mlflow_secret():
    import yaml

    from pipelines import config
    from pipelines.pipeline import MLFLOW_SECRET_KEYS

    deployment, service = yaml.safe_load_all((Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == config.IMAGE
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--host") + 1] == "0.0.0.0"
    assert container["ports"][0]["containerPort"] == int(args[args.index("--port") + 1])
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["envFrom"][0]["secretRef"]["name"] == "adalabelhash-mlflow"
    assert "MLFLOW_TRACKING_TOKEN" in MLFLOW_SECRET_KEYS
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # the image copies params.yaml into /opt/adalabelhash, where --params points: the model name comes from it
    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text().splitlines()
    copied_into = {line.split()[1] for line in dockerfile if line.startswith("WORKDIR")}
    assert args[args.index("--params") + 1] == "/opt/adalabelhash/params.yaml" and "/opt/adalabelhash" in copied_into
    assert any(line.startswith("COPY") and " params.yaml " in line for line in dockerfile)


# ---------------------------------------------------------------------------- registry + services


def set_alias(uri, alias, version):
    tracking.client(uri).set_registered_model_alias(NAME, alias, str(version))


@pytest.fixture(scope="module")
def registry(mlflow_server, trained, encoded, tmp_path_factory):
    from components.evaluate import EvaluateParams, evaluate_tracked

    client = tracking.client(mlflow_server)
    params = tracking.MlflowParams(experiment="serve", tracking_uri=mlflow_server)
    model_ref = tracking.log_onnx_model(tracking.start_run(params, {}, {}, "encoder"), trained["onnx"], [], image_size=16)
    client.create_registered_model(NAME)
    full = database_from_encoded(encoded, trained["manifest"])
    even = full.ids % 2 == 0
    half = replace(full, ids=full.ids[even], codes=full.codes[even], paths=[p for p, e in zip(full.paths, even) if e],
                   labels=[label for label, e in zip(full.labels, even) if e])
    narrow = replace(full, codes=full.codes[:, :1])
    work = tmp_path_factory.mktemp("versions")
    versions = {}
    for name in ("v1", "v2", "v3", "v4"):
        ref = replace(tracking.start_run(params, {}, {}, name), model_uri=model_ref.model_uri)
        if name == "v1":  # the pipeline's own path: evaluate logs the database into the run it was given
            evaluate_tracked(EvaluateParams(topk=[100], precision_at=[10], examples=0), encoded, trained["manifest"],
                             None, work / "evaluate", None, ref)
        elif name in ("v2", "v4"):
            write_database(half if name == "v2" else narrow, work / name / ARTIFACT_PATH)
            tracking.log_artifacts(ref, [work / name / ARTIFACT_PATH], ARTIFACT_PATH)
        model_id = model_ref.model_uri.split("/", 1)[1]
        versions[name] = client.create_model_version(NAME, model_ref.model_uri, run_id=ref.run_id, model_id=model_id).version
    assert list(versions.values()) == ["1", "2", "3", "4"]
    set_alias(mlflow_server, "champion", 1)
    return {"uri": mlflow_server, "databases": {"1": full, "2": half}, "trained": trained}


class Service:
    def __init__(self, tmp: Path, uri: str, *args: str, env: dict | None = None):
        (tmp / "params.yaml").write_text(f"promote: {{model_name: {NAME}}}\nmlflow: {{tracking_uri: '{uri}'}}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adalabelhash.cli", "serve", "--params", "params.yaml", "--port", str(self.port), *args],
            cwd=tmp, env={**os.environ, **(env or {})}, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while True:  # up once /health answers at all (503 until a version is loaded)
            try:
                requests.get(f"{self.url}/health", timeout=2)
                break
            except requests.RequestException:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.3)

    def version(self) -> str | None:
        answer = requests.get(f"{self.url}/health", timeout=10)
        return answer.json()["model_version"] if answer.status_code == 200 else None

    def wait_for(self, version: str, seconds: float) -> float:
        """Seconds until /health reports `version`; fails after `seconds`."""
        started = time.monotonic()
        while self.version() != version:
            assert time.monotonic() - started < seconds, f"still {self.version()}: {self.log.read_text()[-2000:]}"
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def service(registry, tmp_path_factory):
    """Follows @champion by polling every 0.5 s; every endpoint but /health needs the token."""
    svc = Service(tmp_path_factory.mktemp("service"), registry["uri"], "--poll-seconds", "0.5", "--max-upload-mb", "1",
                  env={"ADALABELHASH_SERVE_TOKEN": TOKEN})
    svc.wait_for("1", 120)
    yield svc
    svc.stop()


def query_image(trained, label: str) -> bytes:
    from adalabelhash.data.manifest import Manifest

    manifest = Manifest.load(trained["manifest"])
    frame = manifest.frame
    rows = np.flatnonzero(frame["query"].to_numpy() & (manifest.label_matrix()[:, manifest.classes.index(label)] == 1))
    return (trained["root"] / frame["path"].iloc[rows[0]]).read_bytes()


@pytest.mark.slow
def test_evaluate_logged_the_database_into_the_versions_run(registry, tmp_path):
    client = tracking.client(registry["uri"])
    run_id = client.get_model_version(NAME, "1").run_id
    logged = load_database(Path(client.download_artifacts(run_id, ARTIFACT_PATH, str(tmp_path))))
    full = registry["databases"]["1"]
    assert np.array_equal(logged.ids, full.ids) and np.array_equal(logged.codes, full.codes)
    assert logged.paths == full.paths and logged.labels == full.labels


@pytest.mark.slow
def test_image_and_id_queries_find_the_right_neighbours_in_stable_order(service, registry):
    set_alias(registry["uri"], "champion", 1)
    service.wait_for("1", 60)
    database = registry["databases"]["1"]
    answer = requests.post(f"{service.url}/search", params={"k": 20}, headers=AUTH,
                           files={"image": ("three.png", query_image(registry["trained"], "3"), "image/png")}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == "1" and len(body["results"]) == 20
    labels = Counter(r["label"] for r in body["results"])
    assert labels["3"] >= 12, labels  # a '3' finds mostly '3's
    distances = [r["distance"] for r in body["results"]]
    assert distances == sorted(distances)
    by_id = {int(i): p for i, p in zip(database.ids, database.paths)}
    assert all(by_id[r["id"]] == r["path"] for r in body["results"])
    # the same '3' as a 256 x 256 photo-sized upload: decoded in the threadpool, not on the event loop
    from PIL import Image

    large = io.BytesIO()
    Image.open(io.BytesIO(query_image(registry["trained"], "3"))).resize((256, 256), Image.Resampling.NEAREST).save(large, "PNG")
    answer = requests.post(f"{service.url}/search", params={"k": 20}, headers=AUTH,
                           files={"image": ("three.png", large.getvalue(), "image/png")}, timeout=30)
    assert answer.status_code == 200 and Counter(r["label"] for r in answer.json()["results"])["3"] >= 12, answer.text

    item = int(database.ids[40])
    answer = requests.get(f"{service.url}/search/{item}", params={"k": 50}, headers=AUTH, timeout=30).json()
    ids, dist = expected_answer(database, 40, 50)
    assert [r["id"] for r in answer["results"]] == ids and [r["distance"] for r in answer["results"]] == dist
    assert answer["results"][0]["distance"] == 0 and len(set(dist)) < 50  # ties present, and in id order

    reranked = requests.post(f"{service.url}/search", params={"k": 10, "rerank": 100}, headers=AUTH,
                             files={"image": ("three.png", query_image(registry["trained"], "3"))}, timeout=30).json()
    scores = [r["rerank_distance"] for r in reranked["results"]]
    assert scores == sorted(scores) and Counter(r["label"] for r in reranked["results"])["3"] >= 6


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image with one tiny data chunk: what a decompression bomb looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_every_bad_input_gets_its_status_and_a_json_error(service, registry):
    good = query_image(registry["trained"], "3")
    cases = [
        ("post", "/search", {"files": {"image": ("x.png", b"this is not an image")}}, 400, "not a recognised image"),
        ("post", "/search", {"files": {"image": ("x.png", good[: len(good) // 2])}}, 400, "truncated"),
        ("post", "/search", {"files": {"image": ("x.png", os.urandom(2 * 2**20))}}, 413, "over the limit"),
        ("post", "/search", {"files": {"image": ("bomb.png", png_claiming(30000, 30000))}}, 400, "decompression-bomb"),
        ("post", "/search", {"files": {"other": ("x.png", good)}}, 400, "'image'"),
        ("post", "/search", {"data": b"raw bytes"}, 400, "multipart"),
        ("post", "/search?k=0", {"files": {"image": ("x.png", good)}}, 422, "k must be in 1..1000"),
        ("post", "/search?k=5&rerank=-1", {"files": {"image": ("x.png", good)}}, 422, "rerank"),
        ("get", "/search/5?k=1001", {}, 422, "k must be in"),
        ("get", "/search/5?k=many", {}, 422, "k"),
        ("get", "/search/99999999", {}, 404, "not in the database"),
        ("get", "/search/not-an-id", {}, 422, "item_id"),
        ("get", "/nowhere", {}, 404, "Not Found"),
    ]
    for method, path, kwargs, status, words in cases:
        answer = getattr(requests, method)(f"{service.url}{path}", headers=AUTH, timeout=30, **kwargs)
        assert answer.status_code == status, (path, answer.text)
        assert answer.headers["content-type"] == "application/json" and words in answer.json()["error"], (path, answer.text)
    assert service.proc.poll() is None  # nothing crashed it
    assert service.version() == "1"
    metrics = requests.get(f"{service.url}/metrics", headers=AUTH, timeout=10).text  # counted per route template
    for endpoint, status in (("/search", 413), ("/search", 422), ("/search/{item_id}", 404), ("other", 404)):
        assert f'adalabelhash_requests_total{{endpoint="{endpoint}",status="{status}"}}' in metrics, metrics


@pytest.mark.slow
def test_with_a_token_every_endpoint_but_health_needs_it(service):
    assert requests.get(f"{service.url}/health", timeout=10).status_code == 200
    for path in ("/search/5", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = requests.get(f"{service.url}{path}", headers=headers, timeout=10)
            assert answer.status_code == 401 and "bearer token" in answer.json()["error"]
    assert requests.post(f"{service.url}/search", files={"image": ("x.png", b"x")}, timeout=10).status_code == 401
    assert requests.get(f"{service.url}/search/5", headers=AUTH, timeout=10).status_code in (200, 404)


@pytest.mark.slow
def test_alias_move_is_followed_by_polling_and_a_broken_version_leaves_the_old_serving(service, registry):
    uri = registry["uri"]
    set_alias(uri, "champion", 2)
    waited = service.wait_for("2", 15)  # poll interval 0.5 s: a few intervals plus the load (~2 s here)
    print(f"polling: v2 served {waited:.1f} s after the alias moved")
    item = int(registry["databases"]["2"].ids[3])
    answer = requests.get(f"{service.url}/search/{item}", params={"k": 30}, headers=AUTH, timeout=30).json()
    assert answer["model_version"] == "2" and all(r["id"] % 2 == 0 for r in answer["results"])
    for broken in (3, 4):
        set_alias(uri, "champion", broken)
        time.sleep(3)  # six poll intervals
        assert service.version() == "2"
        assert requests.get(f"{service.url}/search/{item}", headers=AUTH, timeout=30).json()["model_version"] == "2"
    metrics = requests.get(f"{service.url}/metrics", headers=AUTH, timeout=10).text
    log = service.log.read_text()
    assert "adalabelhash_load_failures_total 2.0" in metrics and "adalabelhash_model_version 2.0" in metrics, metrics
    assert 'adalabelhash_requests_total{endpoint="/search/{item_id}",status="200"}' in metrics, metrics
    assert "adalabelhash_request_seconds_bucket" in metrics
    assert "v3 did not load, still serving v2" in log and "no 'database/' artifact" in log, log
    assert "v4 did not load" in log and "16-bit codes, its database holds 8" in log, log
    set_alias(uri, "champion", 1)
    service.wait_for("1", 60)


@pytest.mark.slow
def test_swap_under_load_fails_no_request_and_every_answer_matches_its_version(service, registry):
    uri, databases = registry["uri"], registry["databases"]
    set_alias(uri, "champion", 1)
    service.wait_for("1", 60)
    half = databases["2"]
    queries = [int(i) for i in half.ids[::7][:40]]  # even ids: in both versions' databases
    expected = {v: {q: expected_answer(db, int(np.searchsorted(db.ids, q)), 10)[0] for q in queries}
                for v, db in databases.items()}
    answers, failures = [], []
    clients, cap = 4, 3000  # bounded: each client stops after the swaps, or at `cap` requests
    swapped = threading.Event()

    def client(worker: int):
        with requests.Session() as session:
            for n in range(cap):
                if swapped.is_set():
                    break
                item = queries[(worker + n * clients) % len(queries)]
                try:
                    reply = session.get(f"{service.url}/search/{item}", params={"k": 10}, headers=AUTH, timeout=30)
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                    continue
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {reply.text}")
                else:
                    answers.append((item, reply.json()))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for version in ("2", "1"):  # the alias moves twice while the queries run
        time.sleep(0.5)
        set_alias(uri, "champion", version)
        service.wait_for(version, 60)
    time.sleep(0.5)  # some answers from the last version too
    swapped.set()
    for t in threads:
        t.join(timeout=300)
    total = len(answers) + len(failures)
    assert not failures, failures[:3]
    assert total > 50 and not any(t.is_alive() for t in threads)
    seen = Counter(body["model_version"] for _, body in answers)
    assert set(seen) == {"1", "2"}, seen
    wrong = [(item, body["model_version"]) for item, body in answers
             if [r["id"] for r in body["results"]] != expected[body["model_version"]][item]]
    assert not wrong, wrong[:3]
    print(f"swap under load: {total} requests, versions {dict(seen)}, 0 failed")


@pytest.mark.slow
def test_webhook_moves_every_process_of_the_service_within_seconds_and_unsigned_calls_are_refused(registry, tmp_path):
    uri = registry["uri"]
    # two worker processes: the one that receives the webhook wakes the other (polling is 10 minutes away)
    svc = Service(tmp_path, uri, "--alias", "live", "--poll-seconds", "600", "--processes", "2", "--search-workers", "1",
                  env={"ADALABELHASH_WEBHOOK_SECRET": SECRET})
    client = tracking.client(uri)
    hook = client.create_webhook("serve-test", f"{svc.url}/webhook", events=["model_version_alias.created"], secret=SECRET)
    try:
        assert svc.version() is None  # no @live yet: 503, and polling is 10 minutes away
        assert requests.get(f"{svc.url}/health", timeout=10).json()["error"].startswith("no version")
        time.sleep(2)  # past the server's webhook-list cache (1 s in this fixture; 60 s by default)
        for version in ("1", "2"):
            set_alias(uri, "live", version)
            waited = svc.wait_for(version, 15)
            print(f"webhook: v{version} served {waited:.1f} s after the alias moved")
            seen, deadline = {}, time.monotonic() + 15
            while time.monotonic() < deadline:  # a new connection per request: both processes answer in turn
                health = requests.get(f"{svc.url}/health", timeout=10).json()
                if "process" in health:  # a process with no version yet answers 503 without it
                    seen[health["process"]] = health["model_version"]
                if len(seen) == 2 and set(seen.values()) == {version}:
                    break
            assert len(seen) == 2 and set(seen.values()) == {version}, seen
        forged = requests.post(f"{svc.url}/webhook", json={"entity": "model_version_alias", "data": {"name": NAME}},
                               headers={"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Delivery-Id": "x",
                                        "X-MLflow-Timestamp": str(int(time.time()))}, timeout=10)
        assert forged.status_code == 401 and "signature" in forged.json()["error"]
    finally:
        client.delete_webhook(hook.webhook_id)
        svc.stop()
