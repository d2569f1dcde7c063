-- bonn-sweep: the three databases of the compose deployment, created on the first start of the
-- postgres service (docker-entrypoint-initdb.d runs this once, on an empty data volume, through psql
-- as POSTGRES_USER, who then owns them).
--   studies  the study store        (BONN_SWEEP_STORE_URL)
--   optuna   Optuna's RDB storage   (BONN_SWEEP_OPTUNA_STORAGE)
--   mlflow   MLflow's backend store (mlflow server --backend-store-uri)
-- CREATE DATABASE cannot run inside a DO block; \gexec runs it only where the database is missing,
-- so the script also succeeds against a server where some of them exist already.
SELECT 'CREATE DATABASE studies' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'studies')\gexec
SELECT 'CREATE DATABASE optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')\gexec
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
