# syntax=docker/dockerfile:1
# One image for every pipeline step (DVC users run the same CLI; Kubeflow uses it as base_image).
# `make image` / `make image-check` build it with docker or podman (tools/image.sh, README "Container image").
#   CPU (default):  docker build -t adalabelhash:0.1.0 .
#   GPU:            docker build --build-arg DEVICE=gpu -t adalabelhash:0.1.0-gpu .
#   extra CA (TLS-intercepting proxy), build time only:  --secret id=extra_ca,src=/path/to/ca.pem
# The GPU image holds PyPI's torch 2.14.1+cu130 (CUDA 13 wheels): its hosts need an NVIDIA driver >= 580
# (`make image` adds the label io.adalabelhash.nvidia-driver-min=580 to every image whose torch is a CUDA build).
# The tag Kubeflow runs is set in one place: pipelines/config.py (see README, "Kubeflow").
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
# On every build step too: `make image-clean` finds the cached steps by it.
LABEL org.opencontainers.image.title="adalabelhash" \
      org.opencontainers.image.description="AdaLabelHash pipeline steps: DVC / Kubeflow / MLflow"

# cpu: onnxruntime; gpu: onnxruntime-gpu (pyproject.toml extras); both get the s3 extra (s3:// data roots)
ARG DEVICE=cpu
# Where torch and torchvision come from, and only from there (no silent fallback to another index).
# auto: PyTorch's CPU wheels (https://download.pytorch.org/whl/cpu) for DEVICE=cpu, PyPI for gpu.
# Empty: PyPI, whose torch is the CUDA 13 build (a ~7 GB image).
ARG TORCH_INDEX=auto

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DVC_NO_ANALYTICS=1 \
    MPLBACKEND=Agg

# git: MLflow records the commit of a run's checkout (and warns on every call without git); DVC uses it too.
RUN apt-get update && apt-get install -y --no-install-recommends git && apt-get clean && rm -rf /var/lib/apt/lists/* && \
    useradd --create-home --uid 1000 adalabelhash
WORKDIR /opt/adalabelhash

# Dependencies before the code, so this (the one heavy layer) is rebuilt only when they change.
# extra_ca is appended to the CA bundle inside each pip RUN only: it never lands in a layer.
COPY tools/extra_ca.sh /usr/local/lib/extra_ca.sh
COPY pyproject.toml constraints.txt ./
RUN --mount=type=secret,id=extra_ca \
    set -eu; . /usr/local/lib/extra_ca.sh; \
    if [ "$TORCH_INDEX" = auto ]; then \
        TORCH_INDEX=$([ "$DEVICE" = cpu ] && echo https://download.pytorch.org/whl/cpu || true); \
    fi; \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['$DEVICE'] + p['optional-dependencies']['s3']))" \
        > /tmp/requirements.txt; \
    if [ -n "$TORCH_INDEX" ]; then \
        pip install --retries 2 --timeout 30 --no-deps --index-url "$TORCH_INDEX" -c constraints.txt torch torchvision || \
            { echo "error: torch could not be installed from TORCH_INDEX=$TORCH_INDEX (unreachable?); build with" \
                   "--build-arg TORCH_INDEX= for PyPI's torch (CUDA build, ~7 GB image)" >&2; exit 1; }; \
    fi; \
    pip install -c constraints.txt -r /tmp/requirements.txt; \
    rm -f /tmp/requirements.txt; \
    python -c "import torch; cuda = torch.version.cuda; \
print(f'adalabelhash image: DEVICE=$DEVICE holds torch {torch.__version__} (' + (f'CUDA {cuda}' if cuda else 'CPU only') \
+ ') from ' + ('$TORCH_INDEX' or 'PyPI')); \
cuda and '$DEVICE' == 'cpu' and print(f'warning: DEVICE=cpu image holds the CUDA build of torch ({torch.__version__}, ~7 GB): ' \
'PyPI has no CPU-only torch; the default TORCH_INDEX (PyTorch CPU index), where reachable, gives a small image'); \
assert cuda or '$DEVICE' == 'cpu', 'DEVICE=gpu needs CUDA torch: build with --build-arg TORCH_INDEX= (PyPI) or a cuXXX index'"

COPY README.md params.yaml dvc.yaml ./
COPY adalabelhash ./adalabelhash
COPY components ./components
COPY pipelines ./pipelines
RUN --mount=type=secret,id=extra_ca \
    set -eu; . /usr/local/lib/extra_ca.sh; \
    pip install --no-deps -c constraints.txt . && pip check && rm -rf build *.egg-info

# Declared last: a new commit (REVISION) must not invalidate the cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      io.adalabelhash.device="${DEVICE}"

# `adalabelhash serve`: the retrieval service's port
EXPOSE 8000
USER adalabelhash
WORKDIR /home/adalabelhash
ENTRYPOINT ["adalabelhash"]
CMD ["--help"]
