#!/usr/bin/env bash
# Local MLflow tracking server and UI: sqlite backend + artifact store on disk, loopback only.
#   bash mlflow/serve-local.sh            -> http://127.0.0.1:5000
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 ; dvc repro   (the pipeline logs there)
# Settings (environment): MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1), MLFLOW_WORKERS (1),
# MLFLOW_STORE_DIR (mlflow/local: holds mlflow.db and artifacts/).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
store="${MLFLOW_STORE_DIR:-$here/local}"
mkdir -p "$store/artifacts"
exec mlflow server \
    --backend-store-uri "sqlite:///$store/mlflow.db" \
    --artifacts-destination "$store/artifacts" \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-127.0.0.1}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-1}"
