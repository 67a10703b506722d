# The Tollhouse image: one image for every program (`tollhouse metering`, `gateway`,
# `upstream-sim`, `migrate`, …); the command picks the program.
#
# The code stays at /app beside alembic/ and alembic.ini because `tollhouse migrate` reads
# the migrations from the repository root (services/metering/store/migrate.py resolves it
# from its own file). A plain `pip install .` would put the code in site-packages, where
# there is no alembic.ini (and where `alembic/` is the Alembic library itself), so the
# project is installed in editable mode: the `tollhouse` command and package metadata are
# installed, the code is imported from /app.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOLLHOUSE_DATA_DIR=/var/lib/tollhouse \
    TOLLHOUSE_LOG_FORMAT=json

# A fixed non-root uid/gid, so Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10001 tollhouse \
 && useradd --system --uid 10001 --gid tollhouse --home-dir /var/lib/tollhouse --no-create-home \
      --shell /usr/sbin/nologin tollhouse \
 && install -d -o tollhouse -g tollhouse -m 0750 /var/lib/tollhouse

WORKDIR /app

# Dependencies first (exact versions from the lock), so code changes reuse this layer.
COPY requirements.lock ./
RUN pip install --only-binary=:all: -r requirements.lock

COPY pyproject.toml README.md alembic.ini ./
COPY alembic/ alembic/
COPY services/ services/
RUN pip install --no-deps -e . \
 && python -m compileall -q services alembic

USER 10001:10001
# /var/lib/tollhouse (TOLLHOUSE_DATA_DIR) holds the gateway's usage spool: mount a volume
# there for the gateway. No VOLUME line, so other programs get no anonymous volumes.
EXPOSE 8080 8081 8090

# No HEALTHCHECK here: one image runs programs on different ports (and the one-shot
# `migrate`), so docker-compose.yml and the Kubernetes manifests probe each service.
ENTRYPOINT ["tollhouse"]
CMD ["--help"]
