"""Prefect flows and tasks. They orchestrate `pipeline` stage functions and hold no ML logic."""
