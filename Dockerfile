# One image for the stack's Python services: the Prefect worker that runs the
# flows, the MLflow server (it needs the Postgres driver that the upstream MLflow
# image lacks), and, with the `dask` profile, a Dask scheduler and workers.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /app

# Dependencies first, so a code change does not reinstall them; every one pinned
# by docker/constraints.txt to the versions tests/ops/test_image_pins.py installs.
COPY pyproject.toml README.md ./
COPY docker/constraints.txt ./docker/
RUN mkdir cnncore flows \
    && touch cnncore/__init__.py flows/__init__.py \
    && pip install ".[dask,postgres]" -c docker/constraints.txt \
    && pip uninstall -y cnncore

COPY cnncore ./cnncore
COPY flows ./flows
COPY prefect.yaml ./
RUN pip install --no-deps -e .

# /data: the dataset cache; /mlartifacts: the MLflow server's artifact volume.
RUN useradd --create-home --uid 1000 cnn \
    && mkdir -p /data /mlartifacts \
    && chown cnn /app /data /mlartifacts
USER cnn
ENV CNNCORE_DATA_DIR=/data

CMD ["cnnflow", "--help"]
