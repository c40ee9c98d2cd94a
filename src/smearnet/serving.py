"""MLflow pyfunc model (models-from-code: no pickle): base64 cell images in, classes and a smear call out.

Request rows: `image` (base64-encoded image bytes) and optional `smear_id`. Response rows, one per cell:
`smear_id, predicted, prob_<class>..., smear_share_positive, smear_call`, plus `error` for an image that
could not be decoded (reported, never fatal).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


class SmearnetPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a trained smearnet model directory (weights.safetensors + model.json + serving.json)."""

    def load_context(self, context) -> None:
        from smearnet.inference import load_trained

        model_dir = Path(context.artifacts["model_dir"])
        self.model = load_trained(model_dir)
        serving_file = model_dir / "serving.json"
        self.serving = json.loads(serving_file.read_text()) if serving_file.is_file() else {}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from PIL import Image, ImageOps

        from smearnet.inference import classify_images

        if "image" not in model_input:
            raise ValueError("request rows need an `image` column of base64-encoded image bytes")
        smear_ids = model_input["smear_id"].astype(str) if "smear_id" in model_input else pd.Series(["smear"] * len(model_input))
        images, errors = [], []
        for encoded in model_input["image"]:
            try:
                image = Image.open(io.BytesIO(base64.b64decode(encoded)))
                images.append(ImageOps.exif_transpose(image).convert("RGB"))
                errors.append("")
            except Exception as err:  # noqa: BLE001 - a bad image is reported in its row
                images.append(None)
                errors.append(f"undecodable image: {type(err).__name__}")
        return classify_images(self.model, images, list(smear_ids), self.serving, errors)


mlflow.models.set_model(SmearnetPyfunc())
