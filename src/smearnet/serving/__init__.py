"""Serving: the MLflow pyfunc model and `smearnet predict`."""
