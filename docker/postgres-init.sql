-- Runs once, when the postgres volume is first created: the Prefect server gets
-- the database named by POSTGRES_DB, MLflow gets its own beside it.
CREATE DATABASE mlflow;
