# syntax=docker/dockerfile:1
# The llm-gateway image. Build from the repository root:
#
#   docker build -t llm-gateway .
#   docker run --rm -p 8080:8080 -v "$PWD/gateway.yaml:/etc/llm-gateway/gateway.yaml:ro" llm-gateway
#
# The config is read from /etc/llm-gateway/gateway.yaml (mount yours there; ${VAR}s in it come
# from the container's environment, e.g. `-e OPENAI_API_KEY`). Without a config, run the
# built-in demo instead: `docker run --rm -p 8080:8080 llm-gateway llm-gateway serve --host 0.0.0.0`.
# The same image runs the simulator: `llm-gateway simulate --host 0.0.0.0 --port 8000`.

ARG PYTHON_IMAGE=python:3.11-slim

# Builder: a virtualenv with the project and the exact versions of constraints.txt.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
# With the [otel] extra: traces are one config section away (telemetry.traces).
RUN /opt/venv/bin/pip install -c constraints.txt '.[otel]'

# Final: the virtualenv on a clean slim image, run as an unprivileged user.
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    LLM_GATEWAY_HEALTH_URL=http://127.0.0.1:8080/healthz
COPY --from=builder /opt/venv /opt/venv
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/llm-gateway
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# No curl in the slim image: the check is Python. LLM_GATEWAY_HEALTH_URL points it elsewhere
# (the simulator: http://127.0.0.1:8000/v1/models).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['LLM_GATEWAY_HEALTH_URL'], timeout=2).close()"]
# --watch-config: an edit of the mounted config (or of its Kubernetes ConfigMap) reloads it.
CMD ["llm-gateway", "serve", "--config", "/etc/llm-gateway/gateway.yaml", "--host", "0.0.0.0", "--port", "8080", "--watch-config"]
