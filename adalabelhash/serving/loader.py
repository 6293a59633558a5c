"""Load a registered version as one unit (encoder + its database + index) and follow an alias.

A version's encoder is its registered ONNX model; its database is the `database/` artifact that
`evaluate` logged into the run the version points at. Both come through the MLflow client, so
the service needs only the tracking URI (and its credentials, from the usual MLflow variables).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from adalabelhash.database import ARTIFACT_PATH, Database, load_database
from adalabelhash.errors import UserError
from adalabelhash.serving.index import CodeIndex, IndexParams

log = logging.getLogger("adalabelhash.serve")


@dataclass(frozen=True)
class ServedModel:
    """Everything one answer needs, from one registered version."""

    name: str
    version: str
    run_id: str
    session: object  # onnxruntime.InferenceSession
    image_size: int
    database: Database
    index: CodeIndex

    def encode(self, images_nhwc: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3) -> real-valued codes (n, K), the tanh outputs."""
        from adalabelhash.preprocess import to_model_input

        return self.session.run(None, {self.session.get_inputs()[0].name: to_model_input(images_nhwc)})[0]

    def position(self, item_id: int) -> int | None:
        """Database position of a manifest row id (ids are ascending), None if not in the database."""
        at = int(np.searchsorted(self.database.ids, item_id))
        return at if at < len(self.database) and self.database.ids[at] == item_id else None


def load_version(uri: str, name: str, version: str, index_params: IndexParams, threads: int | None = None) -> ServedModel:
    """Download, open and check one version; raise UserError if any part is missing or inconsistent."""
    from mlflow.artifacts import download_artifacts

    from adalabelhash import tracking
    from adalabelhash.onnx_runtime import open_session

    client = tracking.client(uri)
    model_version = client.get_model_version(name, version)
    if not model_version.run_id:
        raise UserError(f"{name} v{version}: no run: cannot find its encoded database")
    work = Path(tempfile.mkdtemp(prefix=f"serve-v{version}-"))
    try:
        source = client.get_model_version_download_uri(name, version)
        model_dir = Path(download_artifacts(artifact_uri=source, dst_path=str(work / "model"), tracking_uri=uri))
        try:
            database_dir = client.download_artifacts(model_version.run_id, ARTIFACT_PATH, str(work))
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise UserError(f"{name} v{version}: run {model_version.run_id} has no '{ARTIFACT_PATH}/' artifact "
                            f"(logged by `evaluate`): {str(exc).splitlines()[0][:200]}") from None
        database = load_database(Path(database_dir))
        session = open_session(model_dir / "model.onnx", threads=threads, device="cpu")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the session and arrays are in memory now
    shape = session.get_inputs()[0].shape
    out_bits = session.get_outputs()[0].shape[-1]
    if out_bits != database.bits:
        raise UserError(f"{name} v{version}: the encoder gives {out_bits}-bit codes, its database holds {database.bits}")
    if len(database) == 0:
        raise UserError(f"{name} v{version}: the database is empty")
    return ServedModel(name, str(version), model_version.run_id, session, int(shape[2]), database,
                       CodeIndex(database.codes, index_params))


class Follower:
    """Keeps `current` on the version holding the alias: polls every `poll_seconds`, and at once
    when `wake()` is called (a verified webhook). A new version is loaded and checked off to the
    side, then swapped in with one assignment; a version that fails to load is logged, remembered
    (not retried while the alias stays on it; retried if the alias leaves and comes back) and the
    old one keeps serving."""

    def __init__(self, client, name: str, alias: str, poll_seconds: float,
                 load: Callable[[str], ServedModel], on_event: Callable[[str, dict], None] = lambda *_: None):
        self.client, self.name, self.alias, self.poll_seconds = client, name, alias, poll_seconds
        self.load, self.on_event = load, on_event
        self.current: ServedModel | None = None
        self.failed: dict[str, str] = {}  # version -> why it did not load
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alias-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def alias_version(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def check(self) -> None:
        """One look at the alias; load and swap if it points somewhere new."""
        try:
            version = self.alias_version()
        except Exception as exc:  # registry unreachable: keep serving what we have
            log.warning("reading %s@%s failed: %s", self.name, self.alias, str(exc).splitlines()[0][:300])
            return
        self.failed = {v: why for v, why in self.failed.items() if v == version}  # moved away: retry it later
        current = self.current
        if version is None or (current is not None and current.version == version) or version in self.failed:
            return
        started = time.perf_counter()
        try:
            model = self.load(version)
        except Exception as exc:  # any failure of a new version must leave the old one serving
            reason = str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__
            self.failed[version] = reason
            log.error("%s v%s did not load, still serving %s: %s", self.name, version,
                      f"v{current.version}" if current else "nothing", reason)
            self.on_event("load_failed", {"version": version, "error": reason})
            return
        self.current = model  # the swap: encoder, database and index change together
        log.info("now serving %s v%s (%d codes, %d bits, %s index) after %.1f s", self.name, version,
                 len(model.database), model.database.bits, model.index.kind, time.perf_counter() - started)
        self.on_event("swapped", {"version": version, "previous": current.version if current else None})

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
