"""Serving: the MLflow pyfunc model and `smearnet predict`.

- ``pyfunc``: the models-from-code pyfunc a registered version is served by (`mlflow models serve`).
- ``requests``: a served request checked against the version's limits, decoded and classified a batch at a time.
- ``batches``: cells classified a batch at a time (shared by predict and the served model).
- ``predict``: `smearnet predict` over a folder or a manifest, with its JSON, Markdown and HTML reports.
"""
