"""Prefect 3 orchestration of the medseg pipeline (see docs/orchestration.md). The library never imports this."""
