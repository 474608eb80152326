# The one image of infra/compose.yaml (worker, Prefect and MLflow servers, Dask scheduler and workers): the
# locked dependency set (psycopg for MLflow on PostgreSQL included) and this checkout at
# /opt/digits (the working directory `prefect deploy` records, so flow runs load flows/pipeline.py here).
FROM python:3.11-slim
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /opt/digits
COPY requirements.lock pyproject.toml ./
RUN uv pip install --system --compile-bytecode -r requirements.lock
COPY . .
RUN uv pip install --system --no-deps -e .
