"""The Kubeflow pipeline: prepare -> validate -> score-champion -> monitor -> [retrain?] train ->
export-codewords -> convert-onnx -> encode (plan, ParallelFor over shards, merge) -> evaluate -> promote.

Training runs when the monitor step says so (drift, a new dataset version, or `force_retrain`),
so a scheduled run on unchanged data stops after its drift report. Pipeline parameters: one dict
per params.yaml step section (defaults: params.yaml, read at import), `data_root`,
`data_version` and `force_retrain`. How the pipeline is deployed (GPUs, scheduling,
retries, volumes, encode parallelism) is params.yaml `kfp:`, applied when it is compiled.
`python -m pipelines.pipeline` writes pipelines/adalabelhash_pipeline.yaml (committed; a test
recompiles and diffs it).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kfp import compiler, dsl, kubernetes

from adalabelhash.errors import UserError
from adalabelhash.params import load_params, parse_section
from adalabelhash.train_config import EXPECTED_GPUS_ENV
from components import kfp_components as steps
from components.train import check_processes_fit_gpus
from pipelines import config

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
PACKAGE = Path(__file__).with_name("adalabelhash_pipeline.yaml")
NAME = "adalabelhash"
STEP_SECTIONS = tuple(config.SECTIONS)
SHM_MOUNT = "/dev/shm"  # DataLoader workers hand batches over through it; the container default is 64 MB
DATA_MOUNT = "/mnt/data"  # where kfp.data_pvc is mounted in every pod that reads images
CHECKPOINT_MOUNT = "/mnt/checkpoints"  # where kfp.checkpoints_pvc is mounted in the train pod
TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}
# What an MLflow client may need in a pod: a server token, and the artifact store's keys when
# artifacts are not proxied through the server; the same keys (+ session token, region and an
# S3-compatible endpoint) let the steps read an s3:// data root.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL",
                      "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "FSSPEC_S3_ENDPOINT_URL")


@dataclass(frozen=True)
class KfpSettings:
    """params.yaml `kfp:` (documented there)."""

    train_gpus: int = 0
    encode_gpus: int = 0
    gpu_type: str = "nvidia.com/gpu"
    gpu_node_selector: dict = field(default_factory=dict)
    gpu_tolerations: list[dict] = field(default_factory=list)
    encode_parallelism: int = 4
    retries: int = 2
    retry_backoff: str = "60s"
    shm_size: str = "4Gi"
    data_pvc: Optional[str] = None
    checkpoints_pvc: Optional[str] = None
    mlflow_secret: Optional[str] = None
    mlflow_secret_keys: list[str] = field(default_factory=lambda: list(MLFLOW_SECRET_KEYS))

    def __post_init__(self):
        if min(self.train_gpus, self.encode_gpus, self.retries) < 0 or self.encode_parallelism < 1:
            raise ValueError("train_gpus, encode_gpus and retries must be >= 0, encode_parallelism >= 1")
        if not re.fullmatch(r"\d+(\.\d+)?([KMGT]i?)?", self.shm_size):
            raise ValueError(f"shm_size must be a Kubernetes quantity like '4Gi', got {self.shm_size!r}")
        if not self.retry_backoff.endswith("s") or not self.retry_backoff[:-1].isdigit():
            raise ValueError(f"retry_backoff must be seconds like '60s', got {self.retry_backoff!r}")
        for toleration in self.gpu_tolerations:
            if not isinstance(toleration, dict) or set(toleration) - TOLERATION_KEYS:
                raise ValueError(f"each gpu_tolerations entry is a mapping of {', '.join(sorted(TOLERATION_KEYS))}; "
                                 f"got {toleration!r}")


def defaults(params: dict) -> dict[str, dict]:
    """The pipeline's dict parameters from params.yaml (nulls left out: the steps default them)."""
    missing = [name for name in STEP_SECTIONS if name not in params]
    if missing:
        raise UserError(f"params: missing section(s) {', '.join(missing)} (the pipeline needs {', '.join(STEP_SECTIONS)})")
    return {name: config.to_parameter(name, params[name]) for name in STEP_SECTIONS}


def build_pipeline(params: dict):
    """The pipeline, with parameter defaults and deployment settings from `params` (params.yaml)."""
    settings = parse_section(KfpSettings, params.get("kfp"), "kfp")
    values = defaults(params)
    # kfp.train_gpus decides the DDP processes too: refuse a pipeline whose default disagrees (a
    # submit-time override is refused by the train step itself, which sees the same GPU count)
    check_processes_fit_gpus(values["train"].get("processes", 1), settings.train_gpus)

    def configure(task, gpus: int = 0, retry: bool = True, shm: bool = False, reads_images: bool = False):
        if reads_images and settings.data_pvc:  # images are read where they are, never copied into artifacts
            kubernetes.mount_pvc(task, settings.data_pvc, DATA_MOUNT)
        if settings.mlflow_secret:  # every step may log to MLflow
            # optional: a key the secret does not hold (a token where there is a password, no
            # session token) leaves its variable unset instead of keeping the pod from starting
            kubernetes.use_secret_as_env(task, settings.mlflow_secret, {k: k for k in settings.mlflow_secret_keys},
                                         optional=True)
        if retry and settings.retries:
            task.set_retry(settings.retries, backoff_duration=settings.retry_backoff, backoff_factor=2.0,
                           backoff_max_duration="3600s")
        if gpus:
            task.set_container_image(config.GPU_IMAGE).set_accelerator_type(settings.gpu_type).set_accelerator_limit(gpus)
            for key, value in settings.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, str(value))
            for toleration in settings.gpu_tolerations:
                kubernetes.add_toleration(task, **toleration)
            task.set_env_variable(EXPECTED_GPUS_ENV, str(gpus))  # device auto then fails rather than use the CPU
        if shm:
            kubernetes.empty_dir_mount(task, "dshm", SHM_MOUNT, medium="Memory", size_limit=settings.shm_size)
        return task

    @dsl.pipeline(name=NAME, description="AdaLabelHash: train learned binary hash codes, export their codewords and "
                  "ONNX model, encode and evaluate retrieval, gate promotion in the MLflow registry")
    def adalabelhash(
        prepare: dict = values["prepare"],
        validate: dict = values["validate"],
        train: dict = values["train"],
        export_codewords: dict = values["export_codewords"],
        convert_onnx: dict = values["convert_onnx"],
        encode: dict = values["encode"],
        evaluate: dict = values["evaluate"],
        promote: dict = values["promote"],
        monitor: dict = values["monitor"],
        mlflow: dict = values["mlflow"],
        data_root: str = "",
        data_version: str = "",
        force_retrain: bool = False,
    ):
        prepared = configure(steps.prepare_dataset(prepare=prepare, data_root=data_root, data_version=data_version),
                             reads_images=True)
        dataset = prepared.outputs["dataset"]
        gate = configure(steps.validate_dataset(validate=validate, dataset=dataset), reads_images=True)

        with dsl.If(gate.outputs["Output"] == True, name="data-gate-passed"):  # noqa: E712 (a KFP condition)
            # The champion re-scored on this data, then the drift report: they read the registry, so
            # they are never served from the cache. Training follows only when the report says so.
            scored = configure(steps.score_champion(promote=promote, encode=encode, evaluate=evaluate, mlflow=mlflow,
                                                    dataset=dataset), reads_images=True).set_caching_options(False)
            champion = scored.outputs["champion"]
            watched = configure(steps.monitor_data(monitor=monitor, dataset=dataset, champion=champion,
                                                   force_retrain=force_retrain),
                                reads_images=True).set_caching_options(False)

            with dsl.If(watched.outputs["Output"] == True, name="retrain"):  # noqa: E712
                # Multi-GPU: train.processes > 1 runs DDP under torchrun inside this pod, one process per
                # GPU (kfp.train_gpus, checked above). Several nodes: a PyTorchJob (README, "Distributed training").
                trained = configure(steps.train_model(
                    prepare=prepare, validate=validate, train=train, mlflow=mlflow, dataset=dataset,
                    validation=gate.outputs["report"],
                    checkpoint_dir=CHECKPOINT_MOUNT if settings.checkpoints_pvc else "",
                ), gpus=settings.train_gpus, shm=True, reads_images=True)
                if settings.checkpoints_pvc:
                    kubernetes.mount_pvc(trained, settings.checkpoints_pvc, CHECKPOINT_MOUNT)
                model = trained.outputs["model"]
                exported = configure(steps.export_codewords(export_codewords=export_codewords, model=model,
                                                            run=trained.outputs["Output"]))
                codewords = exported.outputs["codewords"]
                # the parity check runs on the execution provider the encode shards get: on a GPU too if they do
                converted = configure(steps.convert_onnx(convert_onnx=convert_onnx, monitor=monitor, model=model,
                                                         dataset=dataset, codewords=codewords,
                                                         run=exported.outputs["Output"]),
                                      gpus=min(settings.encode_gpus, 1), reads_images=True)
                onnx_model = converted.outputs["onnx_model"]
                plan = configure(steps.plan_shards(encode=encode, dataset=dataset))
                with dsl.ParallelFor(plan.output, parallelism=settings.encode_parallelism) as shard:
                    encoded_shard = configure(steps.encode_shard(encode=encode, onnx_model=onnx_model, dataset=dataset,
                                                                 shard=shard), gpus=settings.encode_gpus, shm=True,
                                              reads_images=True)
                merged = configure(steps.merge_shards(encode=encode, onnx_model=onnx_model, dataset=dataset,
                                                      shards=dsl.Collected(encoded_shard.outputs["shards"])))
                evaluated = configure(steps.evaluate_retrieval(
                    evaluate=evaluate, encoded=merged.outputs["encoded"], dataset=dataset, codewords=codewords,
                    run=converted.outputs["Output"]), reads_images=True)
                # The registry is a side effect: never served from the cache, never retried behind the user's back.
                configure(steps.promote_model(
                    promote=promote, evaluation=evaluated.outputs["evaluation"], champion=champion,
                    drift=watched.outputs["drift"], trigger_reason=watched.outputs["trigger_reason"],
                    run=evaluated.outputs["Output"]), retry=False).set_caching_options(False)

        with dsl.Else(name="data-gate-failed"):
            configure(steps.data_gate_failed(report=gate.outputs["report"]), retry=False)

    return adalabelhash


adalabelhash_pipeline = build_pipeline(load_params(PARAMS))


def compile_pipeline(path: Path = PACKAGE, pipeline=adalabelhash_pipeline) -> Path:
    compiler.Compiler().compile(pipeline, str(path))
    return path


if __name__ == "__main__":
    print(f"compiled -> {compile_pipeline()}")
