"""Registry: the promotion gate, packaging, and MLflow model-registry I/O, a module per job.

- ``gate``: the pure promotion rule (`PromotionCriteria`, `promotion_decision`) and the decision record and report.
- ``frozen``: the frozen evaluation set both models are judged on, and `evaluate_frozen`.
- ``package``: a version's serving.json (engine, smear rule, request limits), fingerprint, packaged folder,
  engine files with their sha256, input example and pip requirements.
- ``store``: MLflow registry I/O: log and register a version, find it by fingerprint, aliases, download.
- ``provenance``: the DVC revision (dvc.lock) of what is registered, as tags.
- ``register``: `register_and_gate`, the register stage's orchestration of the above.
"""
