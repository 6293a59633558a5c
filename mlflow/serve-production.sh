#!/usr/bin/env bash
# Production MLflow tracking server: PostgreSQL backend + S3-compatible artifact store
# (AWS S3, MinIO, Ceph...), artifacts proxied through the server so clients need no
# bucket credentials. Configure with environment variables (see mlflow/production.env.example):
#   MLFLOW_BACKEND_STORE_URI     postgresql://mlflow:PASSWORD@db.internal:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION s3://mlflow-artifacts/
#   MLFLOW_S3_ENDPOINT_URL       https://minio.internal:9000   (omit for AWS S3)
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
#   MLFLOW_ALLOWED_HOSTS         the host names clients use, e.g. mlflow.example.com
# The server needs: pip install -c constraints.txt mlflow psycopg2-binary boto3
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
: "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS (the host names clients use)}"
exec mlflow server \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-4}"
