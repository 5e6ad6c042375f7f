# syntax=docker/dockerfile:1
# connproxy container image: the proxy (default) and the on-premise connector share it.
#
#   docker build -t connproxy:0.1.0 .          (BuildKit: RUN --mount; podman/buildah 1.28 needs --no-cache, as it
#                                               cannot bind-mount a stage that came from its layer cache)
#   proxy:     docker run connproxy:0.1.0 --config /etc/connproxy/config/connectivity-proxy-config.yml
#   connector: docker run --entrypoint twistd connproxy:0.1.0 -n --pidfile= connproxy-connector --config FILE
#
# Stage 1 builds wheels for connproxy and every dependency. Stage 2 installs only those wheels (no index, no
# compiler, no build tools) into /opt/venv, writes Twisted's plugin cache while still root, makes the install
# tree read-only and runs as the fixed non-root UID 10001, so the pod can use readOnlyRootFilesystem.
# scripts/build-steps.sh carries out the same steps outside a container (CI has no image builder).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY connproxy ./connproxy
COPY twisted ./twisted
RUN python3 -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# The wheels are bind-mounted from the first stage, so no layer of this image holds them. Twisted's plugin cache
# (dropin.cache) is written here, as root; at run time the tree is read-only. Twisted rewrites the cache when a
# plugin module is not older than it, and image layers keep modification times in whole seconds only, so the cache
# is dated one second after everything installed (else every start logs "Unable to write to plugin cache").
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links=/wheels /wheels/connproxy-*.whl \
    && /opt/venv/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    && cache="$(/opt/venv/bin/python -c 'import os, twisted.plugins; print(os.path.dirname(twisted.plugins.__file__))')/dropin.cache" \
    && test -s "$cache" \
    && touch -d "@$(($(date +%s) + 1))" "$cache" \
    && chmod -R a-w /opt/venv \
    && groupadd --system --gid 10001 connproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin connproxy
USER 10001:10001
WORKDIR /tmp
# 8042 connector tunnels (TLS) and GET /healthcheck, 20003 HTTP proxy, 20004 SOCKS5, 9494 /metrics.
EXPOSE 8042 20003 20004 9494
ENTRYPOINT ["twistd", "-n", "--pidfile=", "connproxy"]
CMD ["--config", "/etc/connproxy/config/connectivity-proxy-config.yml"]
