# distbackprop container image (see deploy/README.md).
#
#   docker build -t distbackprop .
#   docker run --rm --shm-size=2g distbackprop train --local --out /tmp/run
#
# BASE: any Debian-like image with Python >= 3.11 and its venv module
# (python3-venv); the default is the official slim Python image.
#
# Behind a TLS-intercepting proxy, give pip the proxy's CA bundle as a build
# secret. It is mounted for the install step of the build stage only, so it is
# in no layer and no history entry of the image:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t distbackprop .
# (buildah/podman build take the same --secret flag.)
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# A package mirror or a directory of wheels, for this stage only
# (e.g. --build-arg PIP_INDEX_URL=https://mirror.example/simple).
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_FIND_LINKS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_FIND_LINKS=${PIP_FIND_LINKS}
RUN python3 -m venv /opt/distbackprop
COPY pyproject.toml README.md /src/
COPY distbackprop /src/distbackprop
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/distbackprop/bin/pip install /src \
    && /opt/distbackprop/bin/distbackprop --help > /dev/null

FROM ${BASE}
# runs/ exists in the image so that a volume mounted there (deploy/docker-compose.yml)
# starts out owned by the runtime user.
RUN useradd --no-log-init --uid 10001 --user-group --create-home \
        --home-dir /home/distbackprop --shell /usr/sbin/nologin distbackprop \
    && install -d -o 10001 -g 10001 /home/distbackprop/runs
COPY --from=build /opt/distbackprop /opt/distbackprop
ENV PATH=/opt/distbackprop/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    DISTBACKPROP_HEALTH_URL=http://127.0.0.1:9400/metrics
# Numeric, so that runtimes enforcing "run as non-root" can verify it.
USER 10001:10001
WORKDIR /home/distbackprop
# Compile the numba update kernels now, as the runtime user, into its cache
# (~/.cache/numba, writable: the install tree is root-owned), so a run loads them
# instead of compiling (on a CPU unlike the build host's, numba recompiles once).
RUN python -m distbackprop.kernels
# The coordinator's Prometheus endpoint (--metrics-port, --metrics-host).
EXPOSE 9400
# Healthy while the coordinator serves /metrics (train's default --metrics-port).
# Ray head and worker containers override this (deploy/docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['DISTBACKPROP_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["distbackprop"]
CMD ["--help"]
