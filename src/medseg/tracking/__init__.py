"""Tracking and registry: the MLflow store, registering a model version, and the guarded promotion of a
challenger to champion."""
