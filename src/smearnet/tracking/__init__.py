"""Tracking: MLflow runs, tags and pipeline grouping."""
