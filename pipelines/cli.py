"""`adalabelhash kfp <compile|run-local|submit|schedule>`: the Kubeflow pipeline from the command line.

Parameter values come from params.yaml, changed with `-S section.key=value` (a YAML value, as
in `dvc exp run -S`); every section is checked before anything runs or is sent.
"""

import argparse
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path

import yaml

from adalabelhash.errors import UserError

DEFAULT_LOCAL_ROOT = "build/kfp"
HEALTHZ = "/apis/v2beta1/healthz"
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
# second, minute, hour, day of month, month, day of week: (low, high, names)
CRON_FIELDS = (
    ("second", 0, 59, ()), ("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    values = argparse.ArgumentParser(add_help=False)
    values.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params.yaml value for this run (repeatable), e.g. -S train.epochs=20")
    values.add_argument("--data-root", help="raw images of a non-digits source, as a path the pods see "
                        "(on a cluster: under /mnt/data, the kfp.data_pvc mount) or a bucket URL (s3://bucket/dir)")
    values.add_argument("--data-version", help="dataset version in the cache key (default: data.dvc's md5)")
    values.add_argument("--force-retrain", action="store_true", help="train even when the drift report finds "
                        "nothing new (trigger_reason: forced)")
    remote = argparse.ArgumentParser(add_help=False, parents=[values])
    remote.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    remote.add_argument("--token", help="bearer token (default: $KFP_TOKEN)")
    remote.add_argument("--auth", action="store_true", help="the endpoint needs a token: fail early without one")
    remote.add_argument("--namespace", help="Kubernetes namespace of a multi-user deployment")
    remote.add_argument("--experiment", default="adalabelhash", help="KFP experiment (created if missing)")

    actions = parser.add_subparsers(dest="action", required=True, metavar="{compile,run-local,submit,schedule}")
    compile_ = actions.add_parser("compile", help="write the pipeline YAML")
    compile_.add_argument("--out", type=Path, help="default: pipelines/adalabelhash_pipeline.yaml")
    local = actions.add_parser("run-local", parents=[values], help="run the whole pipeline here (kfp.local)")
    local.add_argument("--pipeline-root", type=Path, default=Path(DEFAULT_LOCAL_ROOT), help="where task outputs go")
    submit = actions.add_parser("submit", parents=[remote], help="start a run on a KFP cluster")
    submit.add_argument("--run-name", help="default: adalabelhash-<UTC time>")
    submit.add_argument("--no-cache", action="store_true", help="run every step again, even with unchanged inputs")
    schedule = actions.add_parser("schedule", parents=[remote], help="create a recurring (retraining) run")
    schedule.add_argument("--cron", required=True, help="6 fields with seconds first, UTC, e.g. '0 0 2 * * *' (02:00 daily)")
    schedule.add_argument("--name", default="adalabelhash-retrain", help="recurring run name")


def run(args: argparse.Namespace) -> None:
    if args.action == "compile":
        from pipelines.pipeline import PACKAGE, compile_pipeline

        print(f"compiled -> {compile_pipeline(args.out or PACKAGE)}")
    elif args.action == "run-local":
        run_local(args)
    elif args.action == "submit":
        submit(args)
    else:
        schedule(args)


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """params with `section.key=value` overrides applied; unknown names and bad values are errors."""
    from pipelines.config import SECTIONS, section

    params = dict(params)
    for override in overrides:
        name, sep, text = override.partition("=")
        section_name, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise UserError(f"-S {override}: expected SECTION.KEY=VALUE, e.g. train.epochs=20")
        if section_name == "kfp":
            raise UserError(f"-S {override}: kfp.* is applied when the pipeline is compiled; edit params.yaml "
                            "`kfp:` and recompile instead")
        if section_name not in SECTIONS:
            raise UserError(f"-S {override}: unknown section '{section_name}' (known: {', '.join(SECTIONS)})")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"-S {override}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
        current = params.get(section_name) or {}
        params[section_name] = {**current, key: value} if isinstance(current, dict) else current
        section(section_name, params[section_name])
    return params


def pipeline_arguments(args: argparse.Namespace, params: dict, remote: bool) -> dict:
    """The run's parameter values: every section of `params` (+ overrides), data root and version."""
    from adalabelhash.data.paths import is_url
    from adalabelhash.tracking import data_dvc_md5
    from pipelines.pipeline import REPO, defaults

    params = apply_overrides(params, args.overrides)
    arguments = defaults(params)
    prepare, mlflow = arguments["prepare"], arguments["mlflow"]
    data_root = args.data_root
    if not remote:  # the local tasks see this machine's files; a URL is read where it is
        root = data_root or prepare.get("root", "data/digits")
        data_root = root if is_url(root) else str((Path(data_root) if data_root else REPO / root).resolve())
    if prepare.get("source", "digits") != "digits" and not data_root:
        raise UserError(f"prepare.source {prepare['source']} needs --data-root: the raw images as the pods see "
                        "them (mounted with params.yaml kfp.data_pvc, or a bucket URL such as s3://bucket/images)")
    if remote and mlflow.get("enabled", True) and not mlflow.get("tracking_uri"):
        raise UserError("mlflow.tracking_uri is null: every step runs in its own pod and needs a shared tracking "
                        "server; pass -S mlflow.tracking_uri=http://<mlflow-service>:5000")
    version = args.data_version if args.data_version is not None else data_dvc_md5(REPO / "data.dvc") or ""
    return {**arguments, "data_root": data_root or "", "data_version": version, "force_retrain": args.force_retrain}


def run_local(args: argparse.Namespace) -> None:
    """The whole pipeline in subprocesses of this Python (no cluster, no Docker).

    Without retries: kfp.local honours them, and a failure here is not a flaky node.
    """
    from kfp import local

    from adalabelhash.params import load_params
    from pipelines.pipeline import PARAMS, build_pipeline

    params = load_params(PARAMS)
    arguments = pipeline_arguments(args, params, remote=False)
    pipeline = build_pipeline({**params, "kfp": {**(params.get("kfp") or {}), "retries": 0}})
    root = args.pipeline_root.resolve()
    os.environ["TMPDIR"] = str(root / "tmp")  # the tasks' mktemp and kfp's temp dirs stay under the root
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=str(root / "workspace"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You may be attemping to run a task", RuntimeWarning)  # our image is Python
        try:
            pipeline(**arguments)
        except RuntimeError as exc:
            raise UserError(f"local run failed: {_plain(str(exc))}") from None
    print(f"kfp local run finished: outputs under {root}")


def endpoint(args: argparse.Namespace) -> tuple[str, str | None]:
    """(host, token) from the options, checked before anything slow happens."""
    token = args.token or os.environ.get("KFP_TOKEN")
    if args.auth and not token:
        raise UserError("--auth: no token; pass --token or set KFP_TOKEN")
    host = args.host.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", host):
        raise UserError(f"--host {args.host}: expected a URL such as http://localhost:8080")
    return host, token


def connect(host: str, token: str | None, namespace: str | None):
    """A kfp.Client for `host`, after a quick healthz of our own.

    kfp.Client's constructor calls healthz without a timeout, and retries an HTTP error for 25 s
    before saying only "TimeoutError"; the check here turns both into one clear line.
    """
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = requests.get(host + HEALTHZ, headers=headers, timeout=15)
    except requests.RequestException as exc:
        raise UserError(f"KFP API at {host} is unreachable ({_reason(exc)})") from None
    if answer.status_code in (401, 403):
        raise UserError(f"KFP API at {host} answered HTTP {answer.status_code}: " +
                        ("the token was refused" if token else "it needs a token; pass --token or set KFP_TOKEN"))
    if not answer.ok:
        raise UserError(f"KFP API at {host} answered HTTP {answer.status_code} at {HEALTHZ}: is it the KFP API endpoint?")
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with ... v2.0.0-beta.2 and later"
        try:
            return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")
        except Exception as exc:  # noqa: BLE001 - urllib3, ApiException, TimeoutError: all mean "cannot use it"
            raise UserError(f"KFP API at {host}: {_reason(exc)}") from None


def _params() -> dict:
    from adalabelhash.params import load_params
    from pipelines.pipeline import PARAMS

    return load_params(PARAMS)


def _compiled_package(tmp: str) -> str:
    from pipelines.pipeline import compile_pipeline

    return str(compile_pipeline(Path(tmp) / "pipeline.yaml"))


def submit(args: argparse.Namespace) -> None:
    import tempfile

    host, token = endpoint(args)
    arguments = pipeline_arguments(args, _params(), remote=True)
    client = connect(host, token, args.namespace)
    name = args.run_name or f"adalabelhash-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory() as tmp:
        result = _remote(lambda: client.create_run_from_pipeline_package(
            _compiled_package(tmp), arguments=arguments, run_name=name, experiment_name=args.experiment,
            namespace=args.namespace, enable_caching=False if args.no_cache else None), host, "starting the run")
    print(f"submitted run {result.run_id} ({name}) to experiment {args.experiment}")


def schedule(args: argparse.Namespace) -> None:
    """A recurring run that never overlaps itself or backfills missed slots.

    Caching is off for it: data_version is fixed when the schedule is made, so a cached prepare
    would hide new data under data_root. (kfp turns caching off on the top-level tasks, prepare
    among them; its new dataset artifact then misses every later step's cache too.)
    """
    import tempfile

    host, token = endpoint(args)
    cron = check_cron(args.cron)
    arguments = pipeline_arguments(args, _params(), remote=True)
    client = connect(host, token, args.namespace)
    experiment = _remote(lambda: client.create_experiment(args.experiment, namespace=args.namespace), host,
                         "creating the experiment")
    with tempfile.TemporaryDirectory() as tmp:
        recurring = _remote(lambda: client.create_recurring_run(
            experiment.experiment_id, args.name, cron_expression=cron, max_concurrency=1, no_catchup=True,
            params=arguments, pipeline_package_path=_compiled_package(tmp), enable_caching=False), host,
            "creating the recurring run")
    print(f"scheduled {args.name} ({recurring.recurring_run_id}): cron '{cron}' UTC, one run at a time, no catch-up")


def check_cron(expression: str) -> str:
    """KFP's cron (robfig/cron): 6 fields, seconds first, or a descriptor such as @daily."""
    expression = " ".join(expression.split())
    if expression in CRON_DESCRIPTORS:
        return expression
    fields = expression.split(" ")
    if len(fields) != 6:
        hint = " (KFP's cron has a seconds field first: '0 0 2 * * *' is 02:00 daily)" if len(fields) == 5 else ""
        raise UserError(f"--cron '{expression}': expected 6 fields, got {len(fields)}{hint}")
    for text, (name, low, high, names) in zip(fields, CRON_FIELDS):
        for part in text.split(","):
            if not _cron_part_ok(part.upper(), low, high, names, name in ("day of month", "day of week")):
                raise UserError(f"--cron '{expression}': bad {name} field '{text}' (values {low}-{high})")
    return expression


def _cron_part_ok(part: str, low: int, high: int, names: tuple[str, ...], question: bool) -> bool:
    if part == "?":
        return question
    base, slash, step = part.partition("/")
    if slash and not (step.isdigit() and int(step) >= 1):
        return False
    if base == "*":
        return True
    first, dash, last = base.partition("-")
    bounds = [_cron_value(v, low, names) for v in ([first, last] if dash else [first])]
    return all(v is not None and low <= v <= high for v in bounds) and bounds[0] <= bounds[-1]


def _cron_value(text: str, low: int, names: tuple[str, ...]) -> int | None:
    if text.isdigit():
        return int(text)
    return names.index(text) + low if text in names else None


def _remote(call, host: str, what: str):
    try:
        return call()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the KFP client raises ApiException, urllib3 and ValueError alike
        raise UserError(f"KFP API at {host}: {what} failed ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """The useful part of a client error: 'Connection refused', 'HTTP 500 ...', not a page of repr."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:
        return errno.group(1).strip()
    status = getattr(exc, "status", None)
    if status:
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip()
    first = _plain(text).strip().splitlines()[0] if text.strip() else exc.__class__.__name__
    return first[:200]


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
