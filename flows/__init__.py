"""Prefect flows that train, check and compare cnncore networks, tracked in MLflow."""
