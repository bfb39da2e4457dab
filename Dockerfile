# Stitchwork: the control plane (`stitchwork up`) and its workers (`stitchwork worker`), one image.
#   docker build -t stitchwork .
#   docker run -d -p 127.0.0.1:8470:8470 -v stitchwork:/var/lib/stitchwork stitchwork
# compose.yaml runs it with NATS and two workers. Dependency versions come from requirements.lock, as in CI.
# The operator token is printed once on first start (docker logs) and kept in the volume (operator.token, 0600).

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/stitchwork \
 && /opt/stitchwork/bin/pip install -q -c requirements.lock setuptools wheel \
 && /opt/stitchwork/bin/pip install -q --no-build-isolation -c requirements.lock ".[server,nats]"

FROM python:3.11-slim-bookworm
# bubblewrap for bwrap:// sandboxes (they need user namespaces in the container); the default, wasm://, needs nothing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/stitchwork --shell /usr/sbin/nologin stitchwork \
 && mkdir -p /var/lib/stitchwork /var/cache/stitchwork \
 && chown stitchwork:stitchwork /var/lib/stitchwork /var/cache/stitchwork
COPY --from=build /opt/stitchwork /opt/stitchwork
ENV PATH=/opt/stitchwork/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STITCHWORK_STATE_DIR=/var/lib/stitchwork \
    XDG_CACHE_HOME=/var/cache/stitchwork
USER stitchwork
# Compile the wasm:// module (CPython on wasmtime) into the image: about 20 s here instead of at the first tool call.
RUN stitchwork sandbox prepare
VOLUME ["/var/lib/stitchwork"]
EXPOSE 8470
# Liveness without a token; `stitchwork doctor` inside the container tells which sandboxes work there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8470/healthz', timeout=4)"]
# 0.0.0.0 inside the container, so that a published port reaches it; publish it on loopback (127.0.0.1:8470:8470)
# unless a TLS proxy guards it: the API takes bearer tokens.
CMD ["stitchwork", "up", "--host", "0.0.0.0", "--port", "8470"]
