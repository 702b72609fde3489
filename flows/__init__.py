"""Prefect flows (refresh, train launch, deployments) and the sftkit command line."""
