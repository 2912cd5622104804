# syntax=docker/dockerfile:1
# One image runs the API (residual-serve, the default command) and the worker (residual-worker).
#   docker build --build-arg TARGET=cpu -t residual-serve:0.1.0-cpu .
#   docker build --build-arg TARGET=gpu -t residual-serve:0.1.0-gpu .
# TARGET=gpu installs PyPI's CUDA build of torch, which carries the CUDA runtime libraries itself (nvidia-*
# wheels); the node only needs the NVIDIA driver and container toolkit. TARGET=cpu takes the CPU-only build.
ARG BASE=python:3.11.11-slim-bookworm

# ---- build: a virtual environment with torch for the target and the project ------------------------------------
FROM ${BASE} AS build
ARG TARGET=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY residual ./residual
COPY service ./service
RUN if [ "$TARGET" = "gpu" ]; then \
      pip install "torch==2.14.1" "torchvision==0.29.1"; \
    else \
      pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.14.1" "torchvision==0.29.1"; \
    fi \
 && pip install ".[service]" \
 && python -c "import residual; residual.load_backbone('residual-tiny', device='cpu')" \
 && python -c "from service.api.routes.playground import STATIC_DIR as d; assert (d / 'playground.js').is_file(), d"

# ---- runtime: the venv only, non-root ---------------------------------------------------------------------------
FROM ${BASE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    RESIDUAL_ARTIFACT_DIR=/artifacts
RUN groupadd --system --gid 10001 residual \
 && useradd --system --uid 10001 --gid residual --home-dir /app --no-create-home residual \
 && mkdir -p /artifacts /app && chown residual:residual /artifacts /app
# the embedded model's weights and reference basis are package data of `residual` (residual/weights/)
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status != 200)"]
CMD ["residual-serve", "--host", "0.0.0.0", "--port", "8000"]
