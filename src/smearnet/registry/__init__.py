"""Registry: the promotion gate, packaging, and MLflow model-registry I/O."""
