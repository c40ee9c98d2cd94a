"""MLflow model registry: log a trained model as a pyfunc version, aliases, and the promotion gate."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlflow

SERVING_CODE = Path(__file__).with_name("serving.py")
PACKAGE_DIR = Path(__file__).parent
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31", "lightning==2.6.6",
                    "torchmetrics==1.9.0", "mlflow==3.17.2", "safetensors", "pandas", "pillow", "scikit-learn",
                    "matplotlib", "tqdm", "psutil", "albumentations==2.0.8", "hydra-core==1.3.8"]


def log_model_version(model_dir: Path, registered_name: str, *, tags: Mapping[str, str] | None = None):
    """Log `model_dir` as a pyfunc model (models-from-code, weights as safetensors) in the active run,
    register it under `registered_name` and return the new ModelVersion."""
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"image": ["<base64 image bytes>"], "smear_id": ["smear-1"]})
    signature = infer_signature(example, pd.DataFrame({"smear_id": ["smear-1"], "predicted": ["x"],
                                                       "smear_share_positive": [0.0], "smear_call": ["negative"]}))
    info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_CODE),
                                   artifacts={"model_dir": str(model_dir)}, code_paths=[str(PACKAGE_DIR)],
                                   pip_requirements=PIP_REQUIREMENTS, signature=signature,
                                   registered_model_name=registered_name)
    client = mlflow.MlflowClient()
    version = client.get_model_version(registered_name, str(info.registered_model_version))
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version.version, key, str(value))
    return version
