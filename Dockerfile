# One image for every Headway process: `headway operator`, `headway sidecar`
# and `headway simulate` (the chart runs the operator from it and the operator
# injects it as the sidecar). Build with `make image`.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the distribution needs (.dockerignore keeps the rest out), so
# editing tests or docs does not invalidate the install layer.
WORKDIR /src
COPY pyproject.toml ./
COPY contract/ contract/
COPY operator/ operator/
COPY sidecar/ sidecar/
COPY cli/ cli/
# pip compiles the .pyc files at install time, so a read-only root filesystem
# costs nothing at start.
RUN pip install . \
    && rm -rf /src

# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 headway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin headway
USER 10001:10001
WORKDIR /tmp

# Sidecar public and admin ports, simulator port (design section 2a).
EXPOSE 8080 9090 8000
ENTRYPOINT ["headway"]
CMD ["--help"]
