# ApCM server image: CPU torch by default.
#   docker build -t apcm:cpu .
# CUDA: torch's CUDA wheels carry their own CUDA runtime, so the base stays the same;
# the host needs the NVIDIA driver and container toolkit (docker run --gpus all).
# Pick a cuXYZ index your driver supports and TORCH_VERSION is published for.
#   docker build -t apcm:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY wire/ wire/
# The package build generates the apcm.v1 stubs from proto/ (setup.py); the pinned
# torch above already satisfies the server extra, so pip keeps that build. The
# cluster extra (nats-py) lets the same image run cluster mode (docs/cluster.md).
RUN pip install --no-cache-dir "./[server,cluster]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APCM_HOST=[::] \
    APCM_GRPC_PORT=50051 \
    APCM_METRICS_PORT=9090 \
    APCM_MODEL=/opt/apcm/model_weights/text-minilm.safetensors \
    APCM_DEVICE=auto \
    APCM_DATA_DIR=/var/lib/apcm \
    NUMBA_CACHE_DIR=/tmp/numba-cache
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/apcm --no-create-home apcm \
    && mkdir -p /var/lib/apcm \
    && chown apcm:apcm /var/lib/apcm
COPY --from=build /opt/venv /opt/venv
COPY model_weights/ /opt/apcm/model_weights/
COPY deploy/healthcheck.py /opt/apcm/healthcheck.py
WORKDIR /opt/apcm
USER 10001:10001
VOLUME ["/var/lib/apcm"]
EXPOSE 50051 9090
# The model loads and a warm-up round trip passes before health says SERVING.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/apcm/healthcheck.py"]
ENTRYPOINT ["apcm"]
CMD ["serve"]
