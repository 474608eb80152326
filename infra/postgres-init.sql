-- The two databases of team mode (infra/compose.yaml): Prefect's and MLflow's, owned by the user `digits`.
-- Run once on a new cluster: the postgres image runs it from /docker-entrypoint-initdb.d/; by hand,
-- `psql -h HOST -U digits -d postgres -f infra/postgres-init.sql`.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
