"""Mamba networks."""
