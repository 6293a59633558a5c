# One image for every pipeline step (DVC users run the same CLI; Kubeflow uses it as base_image).
#   CPU (default):  docker build -t adalabelhash:0.1.0 .
#   GPU:            docker build --build-arg DEVICE=gpu -t adalabelhash:0.1.0-gpu .
# The tag Kubeflow runs is set in one place: pipelines/ (see README, "Kubeflow").
FROM python:3.11-slim-bookworm

# cpu: PyTorch's CPU wheels (small) + onnxruntime; gpu: PyPI's CUDA wheels + onnxruntime-gpu
ARG DEVICE=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    MPLBACKEND=Agg

RUN useradd --create-home --uid 1000 adalabelhash
WORKDIR /opt/adalabelhash

COPY pyproject.toml constraints.txt README.md params.yaml dvc.yaml ./
COPY adalabelhash ./adalabelhash
COPY components ./components
COPY pipelines ./pipelines

RUN if [ "$DEVICE" = "cpu" ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi && \
    pip install -c constraints.txt ".[$DEVICE]"

USER adalabelhash
WORKDIR /home/adalabelhash
ENTRYPOINT ["adalabelhash"]
CMD ["--help"]
