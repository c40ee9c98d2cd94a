"""Evaluation: cell metrics with intervals, calibration, plots, the benchmark and the report."""
