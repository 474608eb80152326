-- The databases of team mode (infra/compose.yaml), owned by the user `digits`: Prefect's, MLflow's, and the
-- tune stage's Optuna studies (tune.storage=postgresql+psycopg://digits:digits@postgres:5432/optuna, so trials
-- on every machine share one study).
-- Run once on a new cluster: the postgres image runs it from /docker-entrypoint-initdb.d/; by hand,
-- `psql -h HOST -U digits -d postgres -f infra/postgres-init.sql`.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
