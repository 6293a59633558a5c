"""`adalabelhash serve`: serve the version holding `--alias` of the registered model, and follow it.

Model name and tracking URI resolve as in the pipeline: params.yaml `promote.model_name`,
`mlflow.tracking_uri` (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).
Secrets come from the environment: ADALABELHASH_SERVE_TOKEN (bearer token for every endpoint
but /health) and ADALABELHASH_WEBHOOK_SECRET (the secret of the MLflow webhook pointed at
/webhook; unset: the webhook endpoint is off and polling alone follows the alias).
With --processes N, uvicorn runs N worker processes on the port, each with its own copy of the
version and its own follower; the one that receives a webhook wakes the others (SIGWINCH).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

TOKEN_ENV, WEBHOOK_SECRET_ENV = "ADALABELHASH_SERVE_TOKEN", "ADALABELHASH_WEBHOOK_SECRET"
OPTIONS_ENV = "ADALABELHASH_SERVE_OPTIONS"  # the parsed options, handed to each worker process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file; reads `promote:` and `mlflow:`")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--alias", default="champion", help="registry alias to serve and follow")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="how often the alias is re-read")
    parser.add_argument("--flat-max", type=int, default=2_000_000, help="codes up to this count: exact search; above: IVF")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query")
    parser.add_argument("--max-upload-mb", type=float, default=10.0)
    parser.add_argument("--max-k", type=int, default=1000)
    # one intra-op thread per search worker keeps a busy machine from stalling every call
    parser.add_argument("--max-batch", type=int, default=32, help="most queries answered by one search call")
    # one per core: idle workers cost nothing (a busy one leaves them a share of the queue); on 2 cores
    # two answered 15-30 % more image queries on 1M codes than one, as many id queries, and fewer of
    # both on the 1,597 digits, where the scan is not the cost (benchmarks/serve/README.md)
    parser.add_argument("--search-workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads running batched searches, each one ORT + one faiss thread (default: one per usable core)")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads per search call (0: its default)")
    # a process per core keeps the event loops off each other's GIL: on 2 cores, 2 processes with one
    # search thread each answered 0.69-0.71 of raw faiss's id queries on 1M codes, 1 process 0.52-0.59
    parser.add_argument("--processes", type=int, default=1,
                        help="service processes sharing the port (each loads the version: memory x N)")


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from adalabelhash.errors import UserError

    if args.processes < 1:
        raise UserError(f"--processes must be >= 1, got {args.processes}")
    options = {key: value for key, value in vars(args).items() if isinstance(value, (str, int, float, type(None)))}
    app = build_app(options)  # checks every option here, before any worker process starts
    if args.processes == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return
    os.environ[OPTIONS_ENV] = json.dumps(options)
    uvicorn.run("adalabelhash.serving.cli:app_in_worker", factory=True, workers=args.processes, host=args.host,
                port=args.port, log_level="warning")


def app_in_worker():
    """uvicorn's app factory in each worker process (--processes > 1)."""
    return build_app(json.loads(os.environ[OPTIONS_ENV]), in_worker=True)


def build_app(options: dict, in_worker: bool = False):
    from adalabelhash import tracking
    from adalabelhash.errors import UserError
    from adalabelhash.params import load_section
    from adalabelhash.serving.app import ApiSettings, create_app
    from adalabelhash.serving.batcher import Batcher
    from adalabelhash.serving.index import IndexParams
    from adalabelhash.serving.loader import Follower, load_version
    from components.promote import PromoteParams

    args = argparse.Namespace(**options)
    if args.poll_seconds <= 0 or args.max_upload_mb <= 0 or args.max_k < 1:
        raise UserError("--poll-seconds and --max-upload-mb must be > 0, --max-k >= 1")
    try:
        index_params = IndexParams(flat_max=args.flat_max, nlist=args.nlist, nprobe=args.nprobe)
        batcher = Batcher(max_batch=args.max_batch, workers=args.search_workers)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    name = load_section(PromoteParams, "promote", args.params).model_name
    uri = tracking.resolve_tracking_uri(load_section(tracking.MlflowParams, "mlflow", args.params))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a log, not a terminal
    follower = Follower(tracking.client(uri), name, args.alias, args.poll_seconds,
                        lambda version: load_version(uri, name, version, index_params, args.ort_threads or None))
    settings = ApiSettings(max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k,
                           token=os.environ.get(TOKEN_ENV) or None, webhook_secret=os.environ.get(WEBHOOK_SECRET_ENV) or None,
                           wake_siblings=in_worker)
    if not in_worker:
        logging.getLogger("adalabelhash.serve").info("serving %s@%s from %s on http://%s:%d (%d process%s)", name,
                                                     args.alias, uri, args.host, args.port, args.processes,
                                                     "es" if args.processes > 1 else "")
    return create_app(follower, settings, batcher)
