# rewardserve image. CPU by default (torch pinned by constraints.txt to the CPU build); for GPUs build
# with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 and run with --gpus all.
FROM python:3.11-slim AS runtime

ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 RS_HOST=0.0.0.0 RS_PORT=8000

WORKDIR /app
# g++ compiles the CPU attention kernel (kernels/attention_cpu.cpp) on first load, for the CPU it runs on;
# without it the service falls back to torch's SDPA (logged), about 8% slower end to end on CPU.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY kernels ./kernels
RUN if [ -n "$TORCH_INDEX" ]; then pip install --extra-index-url "$TORCH_INDEX" -c constraints.txt . ; \
    else pip install -c constraints.txt . ; fi \
 && useradd --create-home --uid 10001 rewardserve
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"]
ENTRYPOINT ["rewardserve", "serve"]
